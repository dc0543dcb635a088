"""``s4fusion-bench batch``: pairs/s of a plain s4fusion-bag loop, s4fusion-batch on one Ray node
and on two, over the same bags, side by side in one run.

The nodes are real Ray nodes (raylet, object store, workers) on loopback addresses of this
machine, sharing its CPUs: two nodes of half the CPUs each show what splitting costs, not what a
second machine adds.
"""

import contextlib
import os
import pathlib
import shutil
import tempfile
import time

from ..bagio import open_bag

NODE_IPS = ('127.0.0.2', '127.0.0.3')


def add_command(commands) -> None:
    """Register the ``batch`` subcommand on s4fusion-bench's subparsers."""
    batch = commands.add_parser('batch', help='s4fusion-bag loop against s4fusion-batch on 1 '
                                'and 2 Ray nodes')
    batch.add_argument('--bag', type=pathlib.Path,
                       help='bag to fuse (default: the MSRS sample bag shipped in the package, 32 '
                            'pairs)')
    batch.add_argument('--copies', type=int, default=4, help='copies of it to fuse (default: '
                       '%(default)s)')
    batch.add_argument('--params', type=pathlib.Path, help="the node's parameter file")
    batch.add_argument('--cpus', type=int, default=len(os.sched_getaffinity(0)),
                       help='CPUs in all, split between the nodes; the s4fusion-bag loop runs '
                            'on as many threads, at most torch\'s default (default: '
                            '%(default)s)')
    batch.set_defaults(func=bench_batch, minimums={'copies': 1, 'cpus': 2})


def bench_batch(args) -> None:
    """Fuse the copies three ways and print pairs/s side by side."""
    import torch

    from ..runtime import cpu_threads
    from ..tools import bag as bag_tool
    from ..tools.bench import load_note
    from .cluster import _ray, fuse_bags, private_home, stop_ray

    source = args.bag or pathlib.Path(__file__).parents[1] / 'data' / 'msrs_sample'
    if not (source / 'metadata.yaml').is_file():  # s4fusion-batch takes folders of bags
        raise ValueError(f'--bag {source}: not a rosbag2 folder (with its metadata.yaml)')
    if args.params and not args.params.is_file():  # found before the copies and the loop
        raise ValueError(f'--params {args.params}: no such file')
    ray = _ray()
    os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
    scratch = pathlib.Path(tempfile.mkdtemp(prefix='s4bench-'))
    home = None
    try:
        home = private_home()
        inputs = scratch / 'in'
        for index in range(args.copies):
            shutil.copytree(source, inputs / f'bag{index:02d}')
        with open_bag(source) as reader:
            print(f'{args.copies} copies of {source} ({reader.duration / 1e9:.1f} s, '
                  f'{reader.message_count} messages); {args.cpus} CPUs; {load_note()}')
        extra = ['--params', str(args.params)] if args.params else []
        rows = []
        # The loop on the CPUs the Ray runs get (on the machine's by default, as s4fusion-bag
        # alone), so that 'vs loop' compares like with like when --cpus leaves some out.
        threads = min(args.cpus, torch.get_num_threads())
        with cpu_threads(threads):
            started = time.perf_counter()
            for bag in sorted(inputs.iterdir()):
                status = bag_tool.main([str(bag), str(scratch / 'loop' / bag.name), *extra])
                if status == 130:  # its Ctrl-C, handled and reported by s4fusion-bag: ours too
                    raise KeyboardInterrupt
                if status:
                    raise ValueError(f's4fusion-bag failed on {bag} (its error above)')
            seconds = time.perf_counter() - started
        loop_pairs = 0
        for bag in (scratch / 'loop').iterdir():
            with open_bag(bag) as reader:
                loop_pairs += reader.topics[bag_tool.DEFAULT_FUSED_TOPIC].msgcount
        rows.append((f's4fusion-bag loop ({threads} thread{"s" * (threads > 1)})', 1, seconds,
                     loop_pairs))
        for nodes in (1, 2):
            cpus = [args.cpus // nodes + (i < args.cpus % nodes) for i in range(nodes)]
            with ray_nodes(ray, home, scratch / f'ray{nodes}', cpus):
                started = time.perf_counter()
                report = fuse_bags([inputs], scratch / f'nodes{nodes}', params=args.params,
                                   progress=False)
                seconds = time.perf_counter() - started
            if not report.ok:  # each failed bag has had its line
                failed = sum(bag.status == 'failed' for bag in report.bags)
                raise ValueError(f's4fusion-batch failed on {failed} of {len(report.bags)} '
                                 'bags (their errors above)')
            rows.append((f's4fusion-batch, {nodes} node{"s" * (nodes > 1)} '
                         f'({"+".join(map(str, cpus))} CPUs)', nodes, seconds, report.fused))
        print(f'\n{"run":<36} {"pairs":>6} {"seconds":>8} {"pairs/s":>8} {"vs loop":>8}')
        for name, _, seconds, pairs in rows:
            rate = pairs / seconds
            print(f'{name:<36} {pairs:>6} {seconds:>8.1f} {rate:>8.2f} '
                  f'{rate / (loop_pairs / rows[0][2]):>7.2f}x')
        print('(each s4fusion-bag run and each Ray worker loads the model; the Ray times leave '
              f'out starting the nodes); load average at the end {os.getloadavg()[0]:.1f}, this '
              'run\'s own work included')
    finally:  # also after a stop while a Ray node starts: its processes keep the HOME
        stop_ray(ray, home)
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def ray_nodes(ray, home: pathlib.Path, temp_dir: pathlib.Path, cpus: list[int]):
    """This process connected, for the block, to a private Ray of one node per entry of `cpus`
    (that many CPUs each) on the loopback addresses NODE_IPS, with token authentication; its
    files in `temp_dir`."""
    from ray.cluster_utils import Cluster

    from .cluster import environment, token_authentication

    # Cluster also writes the head's address into Ray's default folder, RAY_TMPDIR/ray (else
    # /tmp/ray, shared by every user's Ray, and failing where it does not exist yet): this Ray's.
    (temp_dir / 'ray').mkdir(parents=True)
    with token_authentication(home), environment(RAY_TMPDIR=str(temp_dir)):
        with environment(HOME=str(home)):  # see private_home: nothing leaves loopback
            cluster = Cluster(initialize_head=True, head_node_args={
                'num_cpus': cpus[0], 'node_ip_address': NODE_IPS[0],
                'include_dashboard': False, 'temp_dir': str(temp_dir)})
            for ip, count in zip(NODE_IPS[1:len(cpus)], cpus[1:]):
                cluster.add_node(num_cpus=count, node_ip_address=ip)
            ray.init(address=cluster.address, _node_ip_address=NODE_IPS[0],
                     logging_level='warning')
        try:
            yield
        finally:
            ray.shutdown()
            cluster.shutdown()
