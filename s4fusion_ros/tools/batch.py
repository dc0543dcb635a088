"""s4fusion-batch: fuse many rosbag2 bags on a Ray cluster, or on this machine by default.

Every input bag (sqlite3 or MCAP; folders are searched) becomes the bag `s4fusion-bag` writes for
it, stamps and pixels, under OUT_DIR at the input's relative path. Bags longer than
--segment-minutes are fused in segments in parallel and joined. Each bag is renamed into place
only when complete; the run ends with OUT_DIR/s4fusion-batch-manifest.json and exits non-zero
when any bag failed. --start-offset and --playback-duration fuse the same window of every bag,
as s4fusion-bag fuses it (a bag the window lies past the end of fails).
"""

import argparse
import pathlib
import sys

from .. import settings
from ..cli import add_window_options, output_path, run_command, stop_on_signals, time_window
from ..batch.cluster import LOCAL, fuse_bags
from ..batch.work import BatchError
from ..replay import TRANSPORTS

PROG = 's4fusion-batch'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument('inputs', nargs='+', type=pathlib.Path, metavar='IN',
                        help='bags (directories, .db3 or .mcap files) or folders of bags')
    parser.add_argument('out_dir', type=output_path, metavar='OUT_DIR')
    parser.add_argument('--ray', default=LOCAL, metavar='ADDRESS|local',
                        help='a Ray cluster to join (e.g. 10.0.0.5:6379), or %(default)s: a '
                        'private Ray on this machine whose nodes send on loopback; like every '
                        "Ray 2.60, its servers listen on all interfaces, behind its token "
                        '(docs/batch.md) (default)')
    parser.add_argument('--num-cpus', type=int, metavar='N',
                        help='with --ray local: CPUs to use (default: those this process '
                        'may run on, within its CPU quota)')
    parser.add_argument('--cpus-per-task', type=int, default=1, metavar='C',
                        help='CPUs (torch/OpenCV/numba threads) of each CPU task '
                        '(default: %(default)s)')
    parser.add_argument('--gpus-per-worker', type=float, default=0.0, metavar='G',
                        help='run one actor per G GPUs, keeping the model loaded (default: '
                        'CPU tasks)')
    parser.add_argument('--segment-minutes', type=float, default=10.0, metavar='M',
                        help='fuse bags longer than this in segments of M minutes of recording '
                        '(0: never; default: %(default)s)')
    parser.add_argument('--params', type=pathlib.Path,
                        help="the node's parameter file (e.g. config/s4fusion.yaml)")
    parser.add_argument('--device', help='override the device parameter (auto, cpu, cuda:N)')
    parser.add_argument('--thermal-topic', help="every bag's thermal image topic (default: "
                        'detected per bag, as s4fusion-bag detects it)')
    parser.add_argument('--visible-topic', help="every bag's visible image topic (default: "
                        'detected per bag)')
    parser.add_argument('--transport', choices=TRANSPORTS, default='raw',
                        help='how the fused images and saliency maps are written, as with '
                        's4fusion-bag: raw (default), compressed (TOPIC/compressed, with the '
                        "--params file's fused.compressed.* and saliency.compressed.*) or both")
    add_window_options(parser, 'fuse')  # of every bag, as s4fusion-bag
    again = parser.add_mutually_exclusive_group()
    again.add_argument('--resume', action='store_true',
                       help='keep the bags and segments an earlier run finished')
    again.add_argument('--overwrite', action='store_true', help='replace existing outputs')
    parser.add_argument('--max-retries', type=int, default=3, metavar='K',
                        help='retries of a unit lost with its worker or node '
                        '(default: %(default)s)')
    args = parser.parse_args(argv)
    if args.num_cpus is not None and (args.num_cpus < 1 or args.ray != LOCAL):
        parser.error('--num-cpus must be >= 1 and goes with --ray local')
    if args.cpus_per_task < 1 or args.gpus_per_worker < 0 or args.max_retries < 0:
        parser.error('--cpus-per-task must be >= 1, --gpus-per-worker and --max-retries >= 0')
    if args.segment_minutes < 0:
        parser.error('--segment-minutes must be >= 0')
    return args


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0 when every bag is fused, 1 otherwise, 130 when interrupted."""
    args = parse_args(argv)
    stop_on_signals()
    return run_command(PROG, lambda: fuse_and_report(args), (BatchError, settings.SettingsError),
                       'interrupted; the cluster\'s work was cancelled and no partial bag was '
                       'left under a final name; --resume continues')


def fuse_and_report(args: argparse.Namespace) -> int:
    """Fuse the bags and print the summary: 0 when every bag is fused, 1 otherwise."""
    window = time_window(args)
    report = fuse_bags(args.inputs, args.out_dir, address=args.ray, num_cpus=args.num_cpus,
                       cpus_per_task=args.cpus_per_task, gpus_per_worker=args.gpus_per_worker,
                       segment_minutes=args.segment_minutes, params=args.params,
                       device=args.device, resume=args.resume, overwrite=args.overwrite,
                       max_retries=args.max_retries,
                       topics=(args.thermal_topic, args.visible_topic),
                       transport=args.transport, window=window)
    failed = [bag for bag in report.bags if bag.status == 'failed']
    kept = sum(bag.status == 'skipped' for bag in report.bags)
    if kept == len(report.bags):  # nothing was left: neither Ray nor a bar was started
        given = 'the 1 bag given was' if kept == 1 else f'all {kept} bags given were'
        print(f'{PROG}: nothing left to fuse: {given} fused into {report.manifest.parent} by '
              f'an earlier run (manifest: {report.manifest})', file=sys.stderr)
        return 0
    fused = sum(bag.status == 'done' for bag in report.bags)
    within = '' if window.whole else f' of the messages logged {window.describe()} of each bag'
    print(f'{PROG}: {fused} of {len(report.bags)} bags fused now ({report.fused} pairs{within})'
          + (f', {kept} kept as an earlier run fused them' if kept else '')
          + (f', {len(failed)} failed (above)' if failed else '')
          + f' in {report.seconds:.1f} s; manifest: {report.manifest}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':  # python -m, set up by its package's __init__
    from ..entry_points import run_tool
    sys.exit(run_tool(main))
