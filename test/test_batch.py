"""s4fusion-batch on a local Ray: the same bags as s4fusion-bag, segments, faults, resume."""

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import yaml
from rosbags.rosbag2 import CompressionFormat, CompressionMode, Reader, StoragePlugin, Writer

from s4fusion_ros import bagio, replay, settings
from s4fusion_ros.batch import cluster, work
from s4fusion_ros.batch.cluster import _previous_reports, fuse_bags, processes_with_home
from s4fusion_ros.bagio import BagError
from s4fusion_ros.cli import TimeWindow
from s4fusion_ros.batch.work import BatchError
from s4fusion_ros.tools import bag as bag_tool
from s4fusion_ros.tools import batch as batch_tool
from support import (IMAGE, START_NS, THERMAL_TOPIC, TYPESTORE, VISIBLE_TOPIC,  # noqa: F401
                     as_a_user, camera_messages, compact_params_file, damage_chunk, drifting,
                     exited, mcap_chunks, most_frames, one_torch_thread, params_file, read_bag,
                     reading, reference, wait_while_running, write_bag)

BATCH_TOOL = pathlib.Path(sys.executable).parent / 's4fusion-batch'


@pytest.fixture(scope='module')
def local_ray(ray_home):
    """One private Ray on loopback for the module: 2 CPUs and one logical GPU (no CUDA needed).

    Its idle task workers are kept between runs: Ray ends idle workers within a second while more
    workers than its soft limit live (by default its CPUs; a run's progress actor and a GPU
    test's actors count), so later tests started new ones, each loading torch and the model
    again (seconds of CPU; workers kept warm are what a long-lived cluster has)."""
    ray = pytest.importorskip('ray', reason='Ray (the [ray] extra) is not installed')
    ray.init(address='local', num_cpus=2, num_gpus=1, _node_ip_address='127.0.0.2',
             include_dashboard=False, _temp_dir=str(ray_home / 'local'), logging_level='warning',
             _system_config={'num_workers_soft_limit': 8})
    yield
    ray.shutdown()


@pytest.fixture(scope='module')
def long_bag(ivif_dir, params_file, tmp_path_factory):
    """A 30 s drifting MCAP bag, most visible frames with their camera_info, and s4fusion-bag's
    output for it."""
    folder = tmp_path_factory.mktemp('long')
    source = write_bag(folder / 'in' / 'long', drifting(camera_messages(ivif_dir, 30.0)), 'mcap',
                       visible_infos=most_frames)
    return source, reference(source, folder / 'reference', params_file)


def params_with_slop(params_file, slop, path):
    """A copy of the parameter file at ``path`` with another sync.slop."""
    values = yaml.safe_load(params_file.read_text())
    values['s4fusion_node']['ros__parameters']['sync']['slop'] = slop
    path.write_text(yaml.safe_dump(values))
    return path


def test_without_ray_or_ros_the_package_imports_and_says_what_to_install(tmp_path):
    # Ray and rclpy made unimportable: the batch modules still import, and a run says why not.
    code = ("import sys; sys.modules['ray'] = sys.modules['rclpy'] = None\n"
            'import s4fusion_ros.tools.batch as tool\n'
            f"sys.exit(tool.main(['{tmp_path}', '{tmp_path / 'out'}']))")
    (tmp_path / 'a.mcap').write_bytes(b'')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert 'needs Ray: pip install ray==2.60.0' in done.stderr, done.stderr
    assert not (tmp_path / 'out').exists()


def test_a_recording_without_its_metadata_is_one_bag_and_a_folder_of_bare_bags_is_not(tmp_path):
    # rosbag2 names a recording's files DIR_0.mcap, DIR_1.mcap, ... (rosbags: DIR.mcap); cut
    # off before its metadata.yaml it is one bag (which fails, as s4fusion-bag fails on it).
    # Bare bags that merely share the folder's name, with no first file, are bags each.
    for folder, names in (('rec', ['rec_0.mcap', 'rec_1.mcap.zstd']), ('solo', ['solo.db3']),
                          ('flights', ['flights_1.mcap', 'flights_2.mcap']),
                          ('mixed', ['mixed.mcap', 'other.mcap'])):
        (tmp_path / 'in' / folder).mkdir(parents=True)
        for name in names:
            (tmp_path / 'in' / folder / name).write_bytes(b'')
    jobs = work.find_bags([tmp_path / 'in'], tmp_path / 'out')
    assert sorted(str(job.input.relative_to(tmp_path / 'in')) for job in jobs) == [
        'flights/flights_1.mcap', 'flights/flights_2.mcap', 'mixed/mixed.mcap',
        'mixed/other.mcap', 'rec', 'solo']


def test_an_earlier_runs_outputs_beside_the_bags_are_not_searched(tmp_path):
    # bags/fused_v1 from the last run, bags/fused_v2 now: each of fused_v1's bags failed (no
    # camera topics), the run exited 1, and --resume repeated it.
    for bag in ('drive', 'fused_v1/drive'):
        (tmp_path / 'bags' / bag).mkdir(parents=True)
        (tmp_path / 'bags' / bag / 'metadata.yaml').write_text('rosbag2_bagfile_information: {}\n')
    (tmp_path / 'bags' / 'fused_v1' / work.MANIFEST).write_text('{}\n')
    jobs = work.find_bags([tmp_path / 'bags'], tmp_path / 'bags' / 'fused_v2')
    assert [job.input for job in jobs] == [tmp_path / 'bags' / 'drive']


def test_symlinks_in_a_bag_archive_find_each_bag_once_and_a_symlink_loop_none(tmp_path):
    # A fleet archive: `latest` links to the newest day, `all` in a day links back up to the
    # archive, and a link was left looping on itself. Each bag was found again under every
    # path through the links (41 times, to the kernel's link limit; with two such links the
    # search never ended), and the looping link was a RuntimeError traceback.
    archive = tmp_path / 'archive'
    for bag in ('day1/drive', 'day2/drive'):
        (archive / bag).mkdir(parents=True)
        (archive / bag / 'metadata.yaml').write_text('rosbag2_bagfile_information: {}\n')
    (archive / 'latest').symlink_to('day2')
    (archive / 'day1' / 'all').symlink_to('..')
    (archive / 'stale').symlink_to('stale')
    jobs = work.find_bags([archive], tmp_path / 'out')
    assert [(job.input, job.output) for job in jobs] == [
        (archive / bag, tmp_path / 'out' / bag) for bag in ('day1/drive', 'day2/drive')]


def test_a_folder_it_may_not_enter_is_a_bag_that_fails_not_a_traceback(tmp_path):
    # Another user's recording (mode 700) in the archive, or named: the search ended the run in
    # a PermissionError traceback, no bag fused. Taken for a bag, it fails as unreadable when
    # planned (test_a_corrupt_bag_fails_alone: the planning of each bag fails alone).
    archive = tmp_path / 'archive'
    for bag in ('day1/drive', 'day1/theirs', 'day2/drive'):
        (archive / bag).mkdir(parents=True)
        (archive / bag / 'metadata.yaml').write_text('rosbag2_bagfile_information: {}\n')
    (archive / 'day1' / 'theirs').chmod(0)
    (archive / 'day2').chmod(0o100)  # entered, not listed
    code = ('import pathlib, sys; from s4fusion_ros.batch import work; '
            'print([str(job.input) for job in work.find_bags('
            '[pathlib.Path(name) for name in sys.argv[2:]], pathlib.Path(sys.argv[1]))])')
    found = subprocess.run([*as_a_user(), sys.executable, '-c', code, str(tmp_path / 'out'),
                            str(archive), str(archive / 'day1' / 'theirs')],
                           capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    assert found.stdout == str([str(archive / bag) for bag in (
        'day1/drive', 'day1/theirs', 'day2', 'day1/theirs')]) + '\n'


def test_a_bag_named_as_the_current_folder_goes_under_its_own_name(tmp_path, monkeypatch):
    # '.' has no name: its output was the output folder itself, refused as existing.
    bag = tmp_path / 'fleet' / 'b1'
    bag.mkdir(parents=True)
    (bag / 'metadata.yaml').write_text('rosbag2_bagfile_information: {}\n')
    monkeypatch.chdir(bag)
    (job,) = work.find_bags([pathlib.Path('.')], tmp_path / 'out')
    assert job.output == tmp_path / 'out' / 'b1'


def test_warm_up_is_derived_from_the_parameters():
    values = settings.defaults()
    warm = work.warm_up(values)
    # Timeout 0.5 s + slop 0.05 s, doubled; 0.8 smoothing forgets the start in 330 pairs.
    assert warm.sync_ns == round(2 * (0.5 + 0.05) * 1e9)
    assert warm.pairs == 330 and 0.8 ** warm.pairs < 2.0 ** -100
    values.update({'sync.slop': 0.1, 'sync.thermal_offset': -0.06})
    assert work.warm_up(values).sync_ns == round(2 * (0.5 + 0.1 + 0.06) * 1e9)
    values['normalization.smoothing'] = 0.95
    assert work.warm_up(values).pairs > 1000
    for mode in ('minmax', 'fixed'):
        values['normalization.mode'] = mode
        assert work.warm_up(values).pairs == 0


def test_a_second_run_into_a_folder_in_use_is_refused(ivif_dir, tmp_path, capsys):
    # Another process's run holds the folder (an flock on it, as fuse_bags takes it): refused
    # before Ray starts, and the folder is left as it was.
    source = write_bag(tmp_path / 'in' / 'a', camera_messages(ivif_dir, 0.3), 'mcap')
    out = tmp_path / 'out'
    out.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', (
        'import fcntl, os, sys, time\n'
        f'fcntl.flock(os.open({str(out)!r}, os.O_RDONLY), fcntl.LOCK_EX)\n'
        'print("held", flush=True); time.sleep(60)\n')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        assert batch_tool.main([str(source), str(out)]) == 1
    finally:
        holder.kill()
        holder.wait()
    error = capsys.readouterr().err
    assert f'{out}: another s4fusion-batch run is writing into this folder' in error, error
    assert list(out.iterdir()) == []


def test_which_earlier_manifest_rows_a_run_keeps(tmp_path):
    # The folder's manifest as each kind of run finds it: what is kept, what refuses the run.
    manifest, out = tmp_path / 'out' / 's4fusion-batch-manifest.json', tmp_path / 'out'
    manifest.parent.mkdir()
    values = settings.defaults()
    other = {**values, 'sync.slop': 0.03}
    jobs = [work.BagJob(tmp_path / 'in' / 'c', out / 'c')]
    rows = {name: {'output': str(out / name), 'status': status}
            for name, status in (('a', 'done'), ('b', 'failed'), ('c', 'done'))}

    def keeps(recorded, names=('a', 'b', 'c'), resume=False, overwrite=False, transport=None):
        listed = {'bags': [rows[name] for name in names]}
        if transport:
            listed['transport'] = transport
        manifest.write_text(json.dumps(listed if recorded is None else
                                       {**listed, 'parameters': recorded}))
        kept = _previous_reports(manifest, values, 'raw', jobs, resume, overwrite)
        return sorted(pathlib.Path(output).name for output in kept)

    # Same parameters: a plain run or --overwrite keeps every row but its own bags' (a failed
    # bag stays listed with its error); --resume keeps them all and skips the finished ones.
    assert keeps(values) == keeps(values, overwrite=True) == ['a', 'b']
    assert keeps(values, resume=True) == ['a', 'b', 'c']
    # Other parameters, or none recorded: a finished other bag refuses a plain run, naming them;
    # --overwrite starts afresh; with only this run's own or unfinished bags nothing conflicts.
    with pytest.raises(BatchError, match=r'1 bag\(s\) .* other parameters \(sync\.slop\)'):
        keeps(other)
    with pytest.raises(BatchError, match='parameters its manifest does not record'):
        keeps(None)
    assert keeps(other, overwrite=True) == keeps(None, overwrite=True) == []
    assert keeps(other, names=('b', 'c')) == []
    with pytest.raises(BatchError, match=r'--resume: .* other parameters \(sync\.slop\)'):
        keeps(other, resume=True)
    # A manifest of a release before a parameter existed: that run had its default's behaviour.
    older = {name: value for name, value in values.items() if name != 'sync.clock_jump'}
    assert keeps(older, resume=True) == ['a', 'b', 'c'] and keeps(older) == ['a', 'b']
    # The transport is one of the folder's settings; before it was recorded, outputs were raw.
    assert keeps(values, transport='raw') == ['a', 'b']
    for resume in (False, True):
        with pytest.raises(BatchError, match=r'other parameters \(--transport\)'):
            keeps(values, resume=resume, transport='compressed')
    assert keeps(values, transport='compressed', overwrite=True) == []


def test_local_run_equals_s4fusion_bag_bag_by_bag(local_ray, ivif_dir, params_file, tmp_path,
                                                  capsys, monkeypatch):
    # A folder with bags of both formats, one in a subfolder, and a bag named directly.
    inputs = tmp_path / 'fleet'
    sources = {}
    for rel, storage, seconds, seed in (('a', 'mcap', 2.0, 1), ('b', 'sqlite3', 1.5, 2),
                                        ('day2/c', 'sqlite3', 2.5, 3)):
        events = drifting(camera_messages(ivif_dir, seconds, seed=seed), seed)
        sources[rel] = write_bag(inputs / rel, events, storage)
    extra = write_bag(tmp_path / 'single', camera_messages(ivif_dir, 1.0, seed=4), 'mcap')
    out = tmp_path / 'out'
    # The manifest rewritten as each bag ends (not only every MANIFEST_PERIOD s): as each unit
    # ends, it lists the bags that ended before it; and the pairs each task sent to the bar.
    monkeypatch.setattr(cluster, 'MANIFEST_PERIOD', 0)
    listed_done, sent = [], {}

    def unit_ended(result):
        bags = json.loads((out / 's4fusion-batch-manifest.json').read_text())['bags']
        listed_done.append(sum(bag['status'] == 'done' for bag in bags))

    def progress(label, ip, pairs):
        sent[label] = sent.get(label, 0) + pairs

    report = fuse_bags([inputs, extra], out, params=params_file, on_unit=unit_ended,
                       on_progress=progress)
    assert report.ok, report.bags
    assert listed_done == [0, 1, 2, 3]
    expected = {rel: reference(path, tmp_path / 'ref' / rel, params_file)
                for rel, path in [*sources.items(), ('single', extra)]}
    for rel, messages in expected.items():
        assert read_bag(out / rel) == messages, rel
        fused = len(messages['/s4fusion_node/fused'])
        row = next(b for b in report.bags if b.output == str(out / rel))
        assert (row.status, row.fused, row.pairs, row.error) == ('done', fused, fused, '')
        assert sent[row.input] == fused and row.nodes == ['127.0.0.2'], (sent, row)
    assert sorted(p.suffix for p in (out / 'b').iterdir()) == ['.db3', '.yaml']
    manifest = json.loads((out / 's4fusion-batch-manifest.json').read_text())
    assert [b['status'] for b in manifest['bags']] == ['done'] * 4
    error = capsys.readouterr().err
    assert error.count('s4fusion-batch: done ') == 4
    assert not list(out.rglob('.*'))  # no staging or partial directories left

    # The GPU path (one actor per GPU, here a logical one running on the CPU) writes the same.
    report = fuse_bags([inputs, extra], out, params=params_file, gpus_per_worker=1,
                       overwrite=True, device='cpu')
    assert report.ok, report.bags
    for rel, messages in expected.items():
        assert read_bag(out / rel) == messages, rel


def test_the_compressed_transport_is_written_as_s4fusion_bag_writes_it(local_ray, long_bag,
                                                                       params_file, tmp_path):
    # Segmented (the parts joined) and whole, as `s4fusion-bag --transport compressed`.
    source, _ = long_bag
    with one_torch_thread():
        assert bag_tool.main([str(source), str(tmp_path / 'ref'), '--params', str(params_file),
                              '--transport', 'compressed']) == 0
    expected = read_bag(tmp_path / 'ref')
    assert sorted(expected) == ['/s4fusion_node/camera_info', '/s4fusion_node/fused/compressed',
                                '/s4fusion_node/saliency/compressed']
    for minutes in (0.15, 0):
        out = tmp_path / f'out{minutes}'
        report = fuse_bags([source], out, params=params_file, segment_minutes=minutes,
                           transport='compressed', progress=False)
        assert report.ok and report.bags[0].units == (4 if minutes else 1), report.bags
        assert read_bag(out / 'long') == expected
        manifest = json.loads((out / 's4fusion-batch-manifest.json').read_text())
        assert manifest['transport'] == 'compressed'


@contextlib.contextmanager
def killing_the_fusing_gpu_worker(ray_home):
    """A thread, for the block, that SIGKILLs the first GPU worker of this session's Ray (HOME
    `ray_home`: not another run's on the machine) seen fusing once its `fusing` event is set
    (as the run's on_progress: its partial bag written); its `killed` event is set then. It
    ends with the block: left running after a run that failed, it would kill a later test's
    GPU worker."""
    fusing, killed, over = threading.Event(), threading.Event(), threading.Event()

    def kill():
        deadline = time.monotonic() + 120
        fusing.wait(timeout=120)
        while time.monotonic() < deadline and not over.is_set():
            for pid in processes_with_home(ray_home):
                with contextlib.suppress(OSError):
                    cmdline = pathlib.Path(f'/proc/{pid}/cmdline').read_bytes()
                    if cmdline.startswith(b'ray::_GpuWorker.fuse'):
                        os.kill(pid, signal.SIGKILL)
                        killed.set()
                        return
            time.sleep(0.05)

    killer = threading.Thread(target=kill)
    killer.fusing, killer.killed = fusing, killed
    killer.start()
    try:
        yield killer
    finally:
        over.set()
        fusing.set()
        killer.join()


def test_a_gpu_worker_killed_for_good_takes_no_more_bags(local_ray, ray_home, ivif_dir,
                                                         compact_params_file, tmp_path):
    # One GPU worker, no retries: killed while it fuses, the bag it had fails, and so do the
    # bags queued for it, with that reason (before, each was sent to the dead worker).
    inputs = tmp_path / 'fleet'
    for name in ('a', 'b', 'c'):
        write_bag(inputs / name, camera_messages(ivif_dir, 4.0), 'mcap')
    with killing_the_fusing_gpu_worker(ray_home) as killer:
        report = fuse_bags([inputs], tmp_path / 'out', params=compact_params_file,
                           gpus_per_worker=1, device='cpu', max_retries=0, progress=False,
                           on_progress=lambda *_: killer.fusing.set())
    assert killer.killed.is_set()
    errors = [bag.error for bag in report.bags if bag.status == 'failed']
    assert sum(error.startswith('ActorDiedError') for error in errors) == 1, errors
    assert sum('no GPU worker left' in error for error in errors) >= 1, errors
    assert len(errors) == 1 + sum('no GPU worker left' in error for error in errors), errors
    # Every bag has an end: each one queued when the worker died failed, none left pending.
    assert all(bag.status in ('done', 'failed') for bag in report.bags), report.bags
    # The killed attempt's partial bag was swept, its retries spent.
    assert not list((tmp_path / 'out').glob('.*.partial'))


def test_a_gpu_worker_killed_with_retries_left_is_restarted_and_loses_nothing(
        local_ray, ray_home, ivif_dir, compact_params_file, tmp_path):
    inputs = tmp_path / 'fleet'
    for name, seed in (('a', 1), ('b', 2)):
        write_bag(inputs / name, camera_messages(ivif_dir, 4.0, seed=seed), 'mcap')
    with killing_the_fusing_gpu_worker(ray_home) as killer:
        report = fuse_bags([inputs], tmp_path / 'out', params=compact_params_file,
                           gpus_per_worker=1, device='cpu', max_retries=1, progress=False,
                           on_progress=lambda *_: killer.fusing.set())
    assert killer.killed.is_set() and report.ok, report.bags
    for name in ('a', 'b'):
        assert read_bag(tmp_path / 'out' / name) == reference(
            inputs / name, tmp_path / 'ref' / name, compact_params_file), name
    assert sorted(os.listdir(tmp_path / 'out')) == ['a', 'b', 's4fusion-batch-manifest.json']


def test_gpu_workers_one_per_share_fuse_at_once_and_give_their_shares_back(
        local_ray, ivif_dir, compact_params_file, tmp_path):
    # Half a GPU per worker: two workers on the module's one GPU fuse the two bags at once (the
    # shares free sampled as the tasks report progress).
    import ray
    inputs = tmp_path / 'fleet'
    for name in ('a', 'b'):
        write_bag(inputs / name, camera_messages(ivif_dir, 4.0), 'mcap')
    free = []

    def progress(label, ip, pairs):
        free.append(ray.available_resources().get('GPU', 0))

    report = fuse_bags([inputs], tmp_path / 'out', params=compact_params_file,
                       gpus_per_worker=0.5, device='cpu', on_progress=progress, progress=False)
    assert report.ok and free and min(free) == 0, (report.bags, free)
    # A cluster outlives the run: every worker ended with it.
    deadline = time.monotonic() + 30
    while ray.available_resources().get('GPU', 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get('GPU', 0) == 1


def test_segments_equal_the_unsegmented_bag(local_ray, long_bag, params_file, tmp_path):
    source, expected = long_bag
    seen = []
    # 9 s segments: the second one's warm-up reaches the start, the third and fourth do not.
    report = fuse_bags([source], tmp_path / 'out', params=params_file, segment_minutes=0.15,
                       on_unit=seen.append, progress=False)
    assert report.ok, report.bags
    assert report.bags[0].units == 4 and sorted(r['index'] for r in seen) == [0, 1, 2, 3]
    assert read_bag(tmp_path / 'out' / 'long') == expected
    fused = len(expected['/s4fusion_node/fused'])
    assert len(expected['/s4fusion_node/camera_info']) == fused  # the parts' joined too
    assert report.bags[0].fused == report.bags[0].pairs == fused > 200

    # The warm-up is what makes it so: the last segment started cold differs.
    unit = work.plan_bag(work.BagJob(source, tmp_path / 'cold'),
                         settings.load_offline_params(params_file), round(0.15 * 60e9))[3]
    cold = replay.Span(unit.span.own_from, unit.span.own_from, None, 0, None)
    with one_torch_thread():
        assert not work.run_unit(unit)['error']
        assert not work.run_unit(dataclasses.replace(unit, span=cold,
                                                     output=tmp_path / 'cold'))['error']
    warm = read_bag(unit.output)['/s4fusion_node/fused']
    cold = read_bag(tmp_path / 'cold')['/s4fusion_node/fused']
    assert warm == expected['/s4fusion_node/fused'][-len(warm):]
    assert [m[0] for m in cold] == [m[0] for m in warm] and cold != warm

    # A warm-up planned too short (as after a gap in the recording) is lengthened until it has
    # its pairs, and gives the same bag.
    span = unit.span
    sync_ns = span.count_from - span.read_from
    short = dataclasses.replace(span, read_from=span.own_from - 10**9,
                                count_from=span.own_from - 10**9 + sync_ns)
    with one_torch_thread():
        result = work.run_unit(dataclasses.replace(unit, span=short, output=tmp_path / 'short'))
    assert not result['error']
    assert read_bag(tmp_path / 'short')['/s4fusion_node/fused'] == warm


def test_a_window_of_every_bag_is_fused_in_segments_as_s4fusion_bag_fuses_it(
        local_ray, ivif_dir, long_bag, params_file, tmp_path, capsys):
    # 8 s to 18 s of the 30 s bag in 4.5 s segments: the second's warm-up would reach far
    # before the window, the third's just before it (from 7.4 s; both read from the window's
    # start, as the window's run does). A 2 s bag that the window lies past the end of fails
    # alone, saying so.
    inputs = tmp_path / 'fleet'
    shutil.copytree(long_bag[0], inputs / 'long')
    short = write_bag(inputs / 'short', camera_messages(ivif_dir, 2.0), 'mcap')
    window = ['--start-offset', '8', '--playback-duration', '10']
    with one_torch_thread():
        assert bag_tool.main([str(inputs / 'long'), str(tmp_path / 'ref'), '--params',
                              str(params_file), *window]) == 0
    expected = read_bag(tmp_path / 'ref')
    fused = len(expected['/s4fusion_node/fused'])
    assert 0 < fused < len(long_bag[1]['/s4fusion_node/fused'])
    capsys.readouterr()
    out = tmp_path / 'out'
    assert batch_tool.main([str(inputs), str(out), '--params', str(params_file),
                            '--segment-minutes', '0.075', *window]) == 1
    error = capsys.readouterr().err
    assert read_bag(out / 'long') == expected
    manifest = json.loads((out / 's4fusion-batch-manifest.json').read_text())
    assert manifest['window'] == {'--start-offset': 8, '--playback-duration': 10}
    rows = {pathlib.Path(row['input']).name: row for row in manifest['bags']}
    assert (rows['long']['status'], rows['long']['units'], rows['long']['fused']) == (
        'done', 3, fused)
    with bagio.open_bag(short) as reader:
        span = (reader.end_time - 1 - reader.start_time) / 1e9
    assert rows['short']['status'] == 'failed' and rows['short']['error'] == (
        f'{short}: --start-offset 8 is past the end of the bag: its messages span {span:g} s')
    assert (f'1 of 2 bags fused now ({fused} pairs of the messages logged from 8 s to 18 s of '
            'each bag), 1 failed (above)') in error, error
    # The window is one of the folder's settings: a resume with another one is refused.
    with pytest.raises(BatchError, match=r'other parameters \(--start-offset\)'):
        fuse_bags([inputs], out, params=params_file, resume=True, window=TimeWindow(9.0, 10.0))


def test_the_bar_of_a_window_ends_on_its_thermal_frames_where_the_camera_started_late(
        local_ray, ivif_dir, params_file, tmp_path, capsys):
    # The total was the window's share of the bag's span times the bag's thermal frames: with
    # the thermal camera started 3 s into the recording, the bar of 3 s to 5 s ended at 200%
    # (and that of the first 3 s, with no thermal frame, at 0%). Each bag's share of the total
    # becomes the thermal frames its parts read, as s4fusion-bag counts its bar's total.
    events = camera_messages(ivif_dir, 6.0)
    first = events[0][0]
    late = [event for event in events if event[1] != THERMAL_TOPIC or event[0] >= first + 3e9]
    write_bag(tmp_path / 'in' / 'late', late, 'mcap')
    in_window = sum(event[1] == THERMAL_TOPIC and first + 3e9 <= event[0] < first + 5e9
                    for event in late)
    for out, segments in (('whole', '10'), ('segments', '0.02')):
        assert batch_tool.main([str(tmp_path / 'in'), str(tmp_path / out), '--params',
                                str(params_file), '--start-offset', '3', '--playback-duration',
                                '2', '--segment-minutes', segments]) == 0
        error = capsys.readouterr().err
        manifest = json.loads((tmp_path / out / 's4fusion-batch-manifest.json').read_text())
        # Past its total, tqdm shows a count alone ("18pair"): the last render must be n/total.
        last = re.findall(r'bags \d+/\d+:[^\r\n]*', error)[-1]
        assert re.search(r' (\d+)/(\d+) \[', last).groups() == (
            str(manifest['bags'][0]['fused']), str(in_window)), error
        assert manifest['bags'][0]['units'] == (1 if out == 'whole' else 2)


def test_the_segments_of_a_window_warm_up_over_as_many_pairs_as_those_of_the_whole_bag(
        ivif_dir, params_file, tmp_path):
    # The warm-up's length comes from the thermal rate; counting the whole bag's frames over the
    # window's span made a window of a third of the bag seem three times faster, its warm-up a
    # third as long: too few pairs, found by each segment's worker, which fused it again.
    source = write_bag(tmp_path / 'in', camera_messages(ivif_dir, 3.0), 'mcap')
    values = settings.load_offline_params(params_file)
    job = work.BagJob(source, tmp_path / 'out')

    def warm_up_ns(window):
        span = work.plan_bag(job, values, 5 * 10**8, window=window)[-1].span
        return span.own_from - span.read_from

    assert warm_up_ns(TimeWindow(1.0, 1.0)) == warm_up_ns(TimeWindow()) > 5 * 10**9
    # Cut into as many segments as cover the bag or window, the last one shorter; a window that
    # runs past the bag's end as far as the bag goes (not to the 100 s its duration names), one
    # that ends before it as far as the window goes (not on to the bag's end, reading nothing).
    assert len(work.plan_bag(job, values, 12 * 10**8)) == 3
    assert len(work.plan_bag(job, values, 15 * 10**8, window=TimeWindow(0.5, 100.0))) == 2
    assert len(work.plan_bag(job, values, 5 * 10**8, window=TimeWindow(0.5, 1.0))) == 2


def test_a_recording_cut_off_is_fused_in_segments_up_to_its_cut(local_ray, long_bag,
                                                                params_file, tmp_path, capsys):
    # Its metadata.yaml (as `ros2 bag reindex` or the recorder wrote it) spans the whole
    # recording, 30 s: segments of 9 s are cut from the some 12 s its file holds, not from that
    # (which made 4, two of them reading nothing, and a thermal rate 2.5 times too low).
    source = tmp_path / 'in' / 'long'
    shutil.copytree(long_bag[0], source)
    storage = source / 'long.mcap'
    storage.write_bytes(storage.read_bytes()[:storage.stat().st_size * 2 // 5])
    report = fuse_bags([source], tmp_path / 'out', params=params_file, segment_minutes=0.15,
                       progress=False)
    assert report.ok, report.bags
    assert report.bags[0].units == 2
    expected = reference(source, tmp_path / 'reference', params_file)
    assert read_bag(tmp_path / 'out' / 'long') == expected
    assert 0 < len(expected['/s4fusion_node/fused']) < len(long_bag[1]['/s4fusion_node/fused'])
    assert capsys.readouterr().err.count('long.mcap: cut off (no MCAP footer') == 2  # batch, bag
    # The manifest says so too: the bag is done, as far as its recording goes.
    [listed] = json.loads(report.manifest.read_text())['bags']
    assert listed['status'] == 'done' and len(listed['warnings']) == 1, listed
    assert listed['warnings'][0].startswith(f'{source}: long.mcap: cut off (no MCAP footer')


def test_a_warning_every_part_of_a_bag_finds_is_printed_once(local_ray, ivif_dir, params_file,
                                                             tmp_path, capsys):
    # Each part runs its own pipeline and found the half-size thermal camera again: one line
    # per part.
    events = [(*event[:4], event[4][::2, ::2]) if event[1] == THERMAL_TOPIC else event
              for event in camera_messages(ivif_dir, 4.0)]
    source = write_bag(tmp_path / 'in' / 'half', events, 'mcap')
    report = fuse_bags([source], tmp_path / 'out', params=params_file, segment_minutes=0.02,
                       progress=False)
    assert report.ok, report.bags
    assert report.bags[0].units >= 3, report.bags
    error = capsys.readouterr().err
    assert error.count('thermal and visible images differ in size') == 1, error
    # By the driver, not a worker's line that Ray forwards (with a prefix naming the worker)
    # and collapses with its repeats when they come close together.
    assert re.search(rf'^s4fusion-batch: {re.escape(str(source))}: thermal and visible images '
                     'differ in size', error, re.MULTILINE), error


def test_a_parts_clock_jump_is_reported_without_its_own_count(ivif_dir, params_file, tmp_path):
    # Each part counts its own jumps: "(1 time(s) so far)" from several parts, printed once
    # by the driver, would undercount the bag's.
    events = camera_messages(ivif_dir, 1.5)
    later = events[-1][0] + 10**8 - events[0][0]  # recorded again: the same stamps, later
    source = write_bag(tmp_path / 'in' / 'loop', events + [(event[0] + later, *event[1:])
                                                           for event in events], 'mcap')
    [unit] = work.plan_bag(work.BagJob(source, tmp_path / 'out' / 'loop'),
                           settings.load_offline_params(params_file), 0)
    with one_torch_thread():
        result = work.run_unit(unit)
    assert not result['error'], result
    assert result['warnings'] == [f'{source}: the input stamps jumped back (a looping bag, a '
                                  'restarted camera or clock): pairing restarted on the new '
                                  'timeline'], result['warnings']


def test_sqlite3_bags_under_paths_with_uri_characters_are_fused_whole(ivif_dir, params_file,
                                                                      tmp_path):
    # rosbags' sqlite3 storage read '#' in a path as a URI's fragment: the output's database went
    # to a stray file, the bag, metadata.yaml alone, was reported done; an input failed to open.
    plain = write_bag(tmp_path / 'plain' / 'day', camera_messages(ivif_dir, 1.0), 'sqlite3')
    source = shutil.copytree(plain, tmp_path / 'in#1' / 'day?')
    output = tmp_path / 'fused#2' / 'day?'
    [unit] = work.plan_bag(work.BagJob(source, output), settings.load_offline_params(params_file),
                           0)
    with one_torch_thread():
        result = work.run_unit(unit)
    assert not result['error'] and result['fused'], result
    expected = reference(plain, tmp_path / 'reference', params_file)
    with bagio.open_bag(output) as reader:
        assert {c.topic: c.msgcount for c in reader.connections} == {
            topic: len(messages) for topic, messages in expected.items()}
    assert sorted(path.name for path in tmp_path.iterdir()) == ['fused#2', 'in#1', 'plain',
                                                                'reference']


def test_a_file_compressed_bag_is_not_cut_into_segments(ivif_dir, params_file, tmp_path):
    # Recorded with --compression-mode file: every open unpacks the whole bag, so segments fused
    # in parallel would each unpack it. Message-compressed or plain bags are cut as usual.
    events = camera_messages(ivif_dir, 4.0)
    plain = write_bag(tmp_path / 'plain', events, 'sqlite3')
    packed = tmp_path / 'packed'
    writer = Writer(packed, version=9, storage_plugin=StoragePlugin.SQLITE3)
    writer.set_compression(CompressionMode.FILE, CompressionFormat.ZSTD)
    with writer, Reader(plain) as reader:
        connections = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=TYPESTORE)
                       for c in reader.connections}
        for connection, log_time, raw in reader.messages():
            writer.write(connections[connection.id], log_time, raw)
    values = settings.load_offline_params(params_file)
    units = {bag.name: work.plan_bag(work.BagJob(bag, tmp_path / 'out' / bag.name), values,
                                     10**9) for bag in (plain, packed)}
    assert len(units['plain']) == 4 and len(units['packed']) == 1
    assert units['packed'][0].output == tmp_path / 'out' / 'packed'


def test_topics_named_for_every_bag_settle_a_bag_with_two_cameras(local_ray, ivif_dir,
                                                                  params_file, tmp_path, capsys):
    # A second colour camera: detection cannot choose, and says so; named topics go to the units.
    plain = write_bag(tmp_path / 'plain', camera_messages(ivif_dir, 1.0), 'mcap')
    two = tmp_path / 'two'
    with Writer(two, version=9, storage_plugin=StoragePlugin.MCAP) as writer, \
            Reader(plain) as reader:
        connections = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=TYPESTORE)
                       for c in reader.connections}
        rear = writer.add_connection('/rear/color/image_raw', IMAGE, typestore=TYPESTORE)
        for connection, log_time, raw in reader.messages():
            writer.write(connections[connection.id], log_time, raw)
            if connection.topic == VISIBLE_TOPIC:
                writer.write(rear, log_time, raw)
    values = settings.load_offline_params(params_file)
    job = work.BagJob(two, tmp_path / 'out' / 'two')
    with pytest.raises(BagError, match='several topics could be the visible camera'):
        work.plan_bag(job, values, 0)
    (unit,) = work.plan_bag(job, values, 0, (None, '/rear/color/image_raw'))
    assert unit.topics == (THERMAL_TOPIC, '/rear/color/image_raw')
    command = [str(two), str(tmp_path / 'out'), '--params', str(params_file)]
    assert batch_tool.main(command) == 1
    assert batch_tool.main(command + ['--visible-topic', '/rear/color/image_raw']) == 0
    assert read_bag(tmp_path / 'out' / 'two')['/s4fusion_node/fused']
    # --resume keeps the finished bag only for the topics it names; naming none, it keeps it
    # without opening it (here detection could not even choose).
    capsys.readouterr()
    for topics, status in (((None, VISIBLE_TOPIC), 'done'), ((None, VISIBLE_TOPIC), 'skipped'),
                           ((None, None), 'skipped')):
        report = fuse_bags([two], tmp_path / 'out', params=params_file, resume=True,
                           progress=False, topics=topics)
        assert [(b.status, b.topics, b.fused > 0) for b in report.bags] == [
            (status, [THERMAL_TOPIC, VISIBLE_TOPIC], True)], report.bags
    assert (f'fusing {two} again: this run names {VISIBLE_TOPIC} instead of '
            '/rear/color/image_raw') in capsys.readouterr().err


def test_a_gap_in_the_recording_before_a_cut_changes_no_pair(ivif_dir, params_file, tmp_path):
    # Nothing recorded from a thermal frame at about 7.5 s to 10.5 s, across the cut at 9 s:
    # that frame is decided by the first message after the gap, in the next segment, whose
    # warm-up (1.1 s; a fixed thermal range needs no pairs) must reach back past the gap.
    params = tmp_path / 'params.yaml'
    values = yaml.safe_load(params_file.read_text())
    values['s4fusion_node']['ros__parameters'].update(
        sync={'slop': 0.05}, normalization={'mode': 'fixed'})
    params.write_text(yaml.safe_dump(values))
    events = drifting(camera_messages(ivif_dir, 20.0))
    before_gap = max(e[0] for e in events if e[1] == THERMAL_TOPIC
                     and (e[2] - START_NS) / 1e9 < 7.5)
    events = [e for e in events if not before_gap < e[0] < START_NS + round(10.5e9)]
    source = write_bag(tmp_path / 'in' / 'gap', events, 'mcap')
    expected = reference(source, tmp_path / 'reference', params)
    job = work.BagJob(source, tmp_path / 'out' / 'gap')
    units = work.plan_bag(job, settings.load_offline_params(params), 9 * 10**9)
    assert [u.span.own_from for u in units][1] - START_NS < 10.5e9 - 1.1e9  # the cut in the gap
    work.prepare_staging(job, units, False)
    with one_torch_thread():
        results = [work.run_unit(unit) for unit in units]
        assert not any(result['error'] for result in results)
        # Ray running a finished part again (its node lost before the result came) gets the
        # part's counts, not an 'exists' error.
        assert work.run_unit(units[1]) == results[1]
    work.commit(job, units)
    assert read_bag(job.output) == expected
    work.commit(job, units)  # Ray running the commit again: the bag is joined already
    assert read_bag(job.output) == expected and not job.staging.exists()


def test_the_parts_joined_are_the_bag_one_unit_writes_connection_for_connection(
        ivif_dir, params_file, tmp_path, monkeypatch):
    # A sqlite3 bag with its camera_info, written compressed at the parameters' QoS: read back,
    # the bags could be equal while the joined one is mcap, declares the raw topics too, offers
    # another QoS, has a connection per message or holds its parts in another order (a reader
    # sorts by log time; the file does not).
    params = tmp_path / 'params.yaml'
    values = yaml.safe_load(params_file.read_text())
    values['s4fusion_node']['ros__parameters']['qos'] = {
        'output': {'reliability': 'best_effort', 'depth': 10}}
    params.write_text(yaml.safe_dump(values))
    values = settings.load_offline_params(params)
    source = write_bag(tmp_path / 'in' / 'b', drifting(camera_messages(ivif_dir, 3.0)),
                       'sqlite3', visible_infos=most_frames)
    [whole] = work.plan_bag(work.BagJob(source, tmp_path / 'whole' / 'b'), values, 0,
                            transport='compressed')
    job = work.BagJob(source, tmp_path / 'out' / 'b')
    units = work.plan_bag(job, values, 10**9, transport='compressed')
    assert len(units) == 3
    work.prepare_staging(job, units, False)
    with one_torch_thread():
        expected = work.run_unit(whole)
        results = [work.run_unit(unit) for unit in units]
    assert not expected['error'] and not any(result['error'] for result in results)
    for name in ('pairs', 'fused', 'unpaired', 'dropped', 'failed'):
        assert sum(result[name] for result in results) == expected[name], name
    # An attempt that joined the bag and was lost before it removed the plan: joined again. A
    # commit killed while it removes the staging folder has joined the bag: its rerun keeps it
    # (the plan went first, while every part was there).
    shutil.copytree(units[0].output, job.output)
    remove = shutil.rmtree

    def killed_while_removing(path, *args, **kwargs):
        if pathlib.Path(path) != job.staging:  # create_bag's own
            return remove(path, *args, **kwargs)
        remove(job.staging / 'part-00001')
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(shutil, 'rmtree', killed_while_removing)
        with pytest.raises(KeyboardInterrupt):
            work.commit(job, units)
    work.commit(job, units)
    assert read_bag(job.output) == read_bag(whole.output)

    def connections(bag):
        with bagio.open_bag(bag) as reader:
            return sorted((c.topic, c.msgtype, repr(c.ext.offered_qos_profiles))
                          for c in reader.connections)

    assert connections(job.output) == connections(whole.output)
    for bag in (whole.output, job.output):
        assert sorted(path.suffix for path in bag.iterdir()) == ['.db3', '.yaml']
    [database] = job.output.glob('*.db3')
    with contextlib.closing(sqlite3.connect(database)) as db:
        written = [stamp for stamp, in db.execute('SELECT timestamp FROM messages ORDER BY id')]
    assert written == sorted(written)


def test_a_resume_keeps_the_finished_parts_of_the_same_plan_alone(ivif_dir, params_file,
                                                                  tmp_path):
    source = write_bag(tmp_path / 'in' / 'a', camera_messages(ivif_dir, 3.0), 'mcap')
    values = settings.load_offline_params(params_file)
    job = work.BagJob(source, tmp_path / 'out' / 'a')
    units = work.plan_bag(job, values, 10**9)
    assert work.prepare_staging(job, units, False) == units
    with one_torch_thread():
        assert not work.run_unit(units[1])['error']
    finished = tmp_path / 'finished'
    shutil.copytree(job.staging, finished)

    def staged(units, resume=True):
        """The indexes left to run of `units` planned where part 1 is finished, and whether
        anything of that part stays."""
        shutil.rmtree(job.staging)
        shutil.copytree(finished, job.staging)
        todo = work.prepare_staging(job, units, resume)
        part = work.part_path(job, 1)
        return [unit.index for unit in todo], part.exists() or part.with_suffix('.json').exists()

    assert staged(units) == ([0, 2], True)
    assert staged(units, resume=False) == ([0, 1, 2], False)
    # Other parameters, transport, cuts or window: the part is fused again.
    for other in (work.plan_bag(job, {**values, 'inference_size': [64, 48]}, 10**9),
                  work.plan_bag(job, values, 10**9, transport='compressed'),
                  work.plan_bag(job, values, round(1.2e9)),
                  work.plan_bag(job, values, 10**9, window=TimeWindow(0.1))):
        assert staged(other) == ([unit.index for unit in other], False)
    # The bag recorded again under its name (as large, a later time), or the part's bag lost.
    storage = source / 'a.mcap'
    os.utime(storage, ns=(storage.stat().st_atime_ns, storage.stat().st_mtime_ns + 10**9))
    assert staged(work.plan_bag(job, values, 10**9)) == ([0, 1, 2], False)
    units = work.plan_bag(job, values, 10**9)
    work.prepare_staging(job, units, False)
    with one_torch_thread():
        assert not work.run_unit(units[1])['error']
    shutil.rmtree(finished)
    shutil.copytree(job.staging, finished)
    shutil.rmtree(finished / 'part-00001')
    assert staged(units)[0] == [0, 1, 2]


def test_a_whole_bag_that_ray_runs_again_keeps_its_finished_output(ivif_dir, params_file,
                                                                   tmp_path):
    source = write_bag(tmp_path / 'in' / 'a', camera_messages(ivif_dir, 1.0), 'mcap')
    job = work.BagJob(source, tmp_path / 'out' / 'a')
    (unit,) = work.plan_bag(job, settings.load_offline_params(params_file), 0)
    with one_torch_thread():
        first = work.run_unit(unit)
        assert not first['error'] and first['fused'] > 0
        # Its counts in the staging folder (which the driver removes), not beside the bag.
        assert sorted(path.name for path in job.output.parent.iterdir()) == ['.a.s4batch', 'a']
        written = (job.output / 'metadata.yaml').stat().st_mtime_ns
        # Its node lost after the bag got its name: the rerun returns the recorded counts ...
        assert work.run_unit(unit) == first
        assert (job.output / 'metadata.yaml').stat().st_mtime_ns == written
        # ... or, lost between the rename and the record, fuses it again in its place.
        unit.record.unlink()
        again = work.run_unit(unit)
    assert not again['error'] and again['fused'] == first['fused']
    assert read_bag(job.output) == reference(source, tmp_path / 'reference', params_file)
    # A device no node has fails the bag, as a result: not an exception ending the worker.
    elsewhere = dataclasses.replace(unit, values={**unit.values, 'device': 'tpu'},
                                    output=tmp_path / 'out' / 'b')
    assert "unknown device 'tpu'" in work.run_unit(elsewhere)['error']


def test_a_bag_whose_parts_all_fail_is_reported_once(local_ray, long_bag, params_file,
                                                     tmp_path, capsys):
    # Each of its four parts fails alike (a device no node has): one failure, one line.
    report = fuse_bags([long_bag[0]], tmp_path / 'out', params=params_file, device='tpu',
                       segment_minutes=0.15, progress=False)
    [row] = report.bags
    assert (row.status, row.units) == ('failed', 4) and "unknown device 'tpu'" in row.error
    assert capsys.readouterr().err.count('s4fusion-batch: FAILED ') == 1
    assert not (tmp_path / 'out' / 'long').exists()


def test_an_attempt_alive_when_its_bag_was_retried_is_swept_when_the_bag_is_done(
        local_ray, ivif_dir, params_file, tmp_path):
    # A lost node's attempt at bag a may live on (its lock held) while Ray runs the bag again
    # elsewhere, which leaves its partial bag alone; once dead, the bag's end sweeps it.
    source = write_bag(tmp_path / 'in' / 'a', camera_messages(ivif_dir, 1.0), 'mcap')
    out = tmp_path / 'out'
    lost = out / '.a.0123abcd.partial'
    (lost / 'a').mkdir(parents=True)
    attempt = [os.open(lost, os.O_RDONLY)]
    fcntl.flock(attempt[0], fcntl.LOCK_EX)
    held = []

    def attempt_dies(result):
        held.append(lost.exists())
        os.close(attempt.pop())

    try:
        report = fuse_bags([source], out, params=params_file, on_unit=attempt_dies,
                           progress=False)
    finally:
        # Closed once: closed again, its number may be a Ray thread's file by then, which that
        # thread closes later under whatever took the number next (a cv2.imread of the next
        # test failed mid-file: 'libpng error: Read Error').
        for descriptor in attempt:
            os.close(descriptor)
    assert report.ok and held == [True], (report.bags, held)
    assert sorted(os.listdir(out)) == ['a', 's4fusion-batch-manifest.json']


def test_a_corrupt_bag_fails_alone(local_ray, ivif_dir, params_file, tmp_path, capsys):
    inputs = tmp_path / 'fleet'
    good = write_bag(inputs / 'good', camera_messages(ivif_dir, 1.0), 'mcap')
    # Cut off by a crash: fused up to its last whole record, as by s4fusion-bag, with a warning.
    truncated = write_bag(inputs / 'truncated', camera_messages(ivif_dir, 3.0), 'mcap')
    storage = truncated / 'truncated.mcap'
    storage.write_bytes(storage.read_bytes()[:storage.stat().st_size * 2 // 3])
    garbled = write_bag(inputs / 'garbled', camera_messages(ivif_dir, 1.0), 'mcap')
    (garbled / 'garbled.mcap').write_bytes(b'not an MCAP file' * 1000)
    garbage = write_bag(inputs / 'garbage', camera_messages(ivif_dir, 1.0), 'sqlite3')
    (garbage / 'garbage.db3').write_bytes(b'not a database' * 1000)
    # A recording cut off before its metadata.yaml: a bag that fails, not a folder of bare files.
    cut = write_bag(inputs / 'cut', camera_messages(ivif_dir, 1.0), 'mcap')
    (cut / 'metadata.yaml').unlink()
    # A file in a bag that cannot be looked at (a dangling link) ended the whole run in a
    # traceback, the other bags unfused, and the manifest said it ended cleanly.
    linked = write_bag(inputs / 'linked', camera_messages(ivif_dir, 1.0), 'mcap')
    (linked / 'notes.txt').symlink_to(tmp_path / 'gone')
    # A message in the middle that does not decode is dropped and counted, as live and by
    # s4fusion-bag: that bag is fused all the same.
    broken = write_bag(inputs / 'broken', camera_messages(ivif_dir, 2.0), 'sqlite3')
    with sqlite3.connect(broken / 'broken.db3') as db:
        db.execute("UPDATE messages SET data = x'0001000004' WHERE id = 30")
    seen = []
    report = fuse_bags([inputs], tmp_path / 'out', params=params_file, on_unit=seen.append)
    assert not report.ok
    rows = {pathlib.Path(b.input).name: b for b in report.bags}
    assert rows['good'].status == 'done'
    assert read_bag(tmp_path / 'out' / 'good') == reference(good, tmp_path / 'ref', params_file)
    assert rows['broken'].status == 'done' and rows['broken'].dropped == 1
    assert rows['truncated'].status == 'done'
    assert read_bag(tmp_path / 'out' / 'truncated') == reference(truncated, tmp_path / 'ref_cut',
                                                                 params_file)
    for name in ('garbled', 'garbage', 'cut', 'linked'):
        assert rows[name].status == 'failed' and str(inputs / name) in rows[name].error
        assert not (tmp_path / 'out' / name).exists()
    assert 'corrupt or truncated' in rows['garbled'].error
    assert 'no metadata.yaml' in rows['cut'].error
    # The others fail when planned, before any task.
    assert sorted(r['label'] for r in seen) == [str(broken), str(good), str(truncated)]
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == [
        'broken', 'good', 's4fusion-batch-manifest.json', 'truncated']
    error = capsys.readouterr().err
    assert error.count('s4fusion-batch: FAILED ') == 4
    assert 'bags 7/7' in error  # the bar's count of bags ended, failed ones among them
    assert f's4fusion-batch: {truncated}: truncated.mcap: cut off (no MCAP footer' in error
    assert bag_tool.main([str(good), str(tmp_path / 'x'), '--params', str(params_file)]) == 0


def test_a_task_larger_than_every_node_is_refused_before_any_work(local_ray, ivif_dir,
                                                                  params_file, tmp_path):
    # Ray would wait for a node with that many CPUs for ever.
    write_bag(tmp_path / 'in' / 'a', camera_messages(ivif_dir, 0.5), 'mcap')
    with pytest.raises(BatchError, match=r'--cpus-per-task 3: no node of the cluster has that '
                                         r'many CPUs \(at most 2\)'):
        fuse_bags([tmp_path / 'in'], tmp_path / 'out', params=params_file, cpus_per_task=3)
    with pytest.raises(BatchError, match=r'--gpus-per-worker 1.5: the cluster has 1 GPUs'):
        fuse_bags([tmp_path / 'in'], tmp_path / 'out', params=params_file, gpus_per_worker=1.5)
    assert not (tmp_path / 'out').exists()


def test_ray_addresses_that_cannot_be_joined_on_loopback_or_at_all_are_one_line(tmp_path):
    from s4fusion_ros.batch.cluster import _driver_address
    assert _driver_address('127.0.0.2:6379') == {'_node_ip_address': '127.0.0.2'}
    assert _driver_address('10.0.0.5:6379') == _driver_address('head.lan:6379') == {}
    for address in ('127.0.0.1:6379', 'LocalHost:6379'):  # Ray would join on the interface
        with pytest.raises(BatchError, match='start the cluster on another loopback address'):
            _driver_address(address)
    (tmp_path / 'in').mkdir()
    (tmp_path / 'in' / 'a.mcap').write_bytes(b'')
    for out, address, message in ((tmp_path / 'a_file', 'local', 'is not a folder'),
                                  (tmp_path / 'out', 'nonsense', '--ray nonsense: cannot join'),
                                  (tmp_path / 'out', '127.0.0.2:1', 'nothing answers there')):
        (tmp_path / 'a_file').write_text('')
        run = subprocess.run([str(BATCH_TOOL), str(tmp_path / 'in'), str(out), '--ray', address],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and message in run.stderr, run.stderr
        assert 'Traceback' not in run.stderr


def test_joining_a_cluster_that_asks_for_its_token_says_how_to_send_it(tmp_path):
    # The docs' set-up: a token made first, then `ray start --head`, which then asks for it. Ray
    # sends the token to an address given only under RAY_AUTH_MODE=token (found with `auto`, it
    # does by itself), and its reason was lost behind "Failed to connect to Ray cluster".
    home = pathlib.Path(tempfile.mkdtemp(prefix='s4r-'))  # short: Ray's socket paths are in it
    (home / '.ray').mkdir()
    (home / '.ray' / 'auth_token').write_text(secrets.token_hex(32))
    (home / 'ray_bootstrap_config.yaml').write_text('{}\n')  # see cluster.private_home
    environment = {name: value for name, value in os.environ.items() if name != 'RAY_AUTH_MODE'}
    environment.update(HOME=str(home), RAY_USAGE_STATS_ENABLED='0',
                       RAY_TMPDIR=str(home), RAY_NUM_REDIS_GET_RETRIES='1')
    with socket.socket() as probe:
        probe.bind(('127.0.0.4', 0))
        port = probe.getsockname()[1]
    address = f'127.0.0.4:{port}'
    (tmp_path / 'in').mkdir()
    (tmp_path / 'in' / 'a.mcap').write_bytes(b'')  # Ray is joined before any bag is read
    try:
        subprocess.run([str(BATCH_TOOL.parent / 'ray'), 'start', '--head', '--port', str(port),
                        '--node-ip-address', '127.0.0.4', '--num-cpus', '1',
                        '--include-dashboard=false', '--temp-dir', str(home / 'r')],
                       env=environment, check=True, capture_output=True, timeout=120)
        runs = [subprocess.run([str(BATCH_TOOL), str(tmp_path / 'in'), str(tmp_path / 'out'),
                                '--ray', address], env={**environment, **extra},
                               capture_output=True, text=True, timeout=120)
                for extra in ({}, {'RAY_AUTH_MODE': 'token', 'RAY_AUTH_TOKEN': '0' * 64})]
    finally:
        for pid in processes_with_home(home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)
    for run, reason in zip(runs, ('it asks for its token; run with RAY_AUTH_MODE=token',
                                  'it refused the token')):
        assert run.returncode == 1, run.stderr
        assert f'--ray {address}: cannot join that Ray cluster: {reason}' in run.stderr, run.stderr


def test_existing_outputs_need_a_flag_and_stale_partials_are_swept(
        local_ray, ivif_dir, params_file, tmp_path, capsys):
    # The command line in this process (it joins the module's Ray instead of starting one).
    source = write_bag(tmp_path / 'in' / 'a', camera_messages(ivif_dir, 0.5), 'mcap')
    out = tmp_path / 'out'
    command = [str(tmp_path / 'in'), str(out), '--params', str(params_file)]
    (out / 'a').mkdir(parents=True)
    assert batch_tool.main(command) == 1
    assert '1 output(s) exist' in capsys.readouterr().err and not any((out / 'a').iterdir())
    # A killed segmented run's staging folder (its finished parts) is one too.
    (out / '.a.s4batch').mkdir()
    assert batch_tool.main(command) == 1
    assert f'2 output(s) exist ({out / "a"}, {out / ".a.s4batch"})' in capsys.readouterr().err
    (out / '.a.s4batch').rmdir()
    assert batch_tool.main([str(tmp_path / 'in'), str(tmp_path)]) == 1
    assert 'inside the output folder' in capsys.readouterr().err
    jobs = work.find_bags([tmp_path], out)  # an output folder inside the input is not searched
    assert [(job.input, job.output) for job in jobs] == [(source, out / 'in' / 'a')]
    # What a killed attempt leaves: a staging directory with part of a bag in it.
    (out / 'a').rmdir()
    stale = out / '.a.0123abcd.partial'
    shutil.copytree(source, stale / 'a')
    assert batch_tool.main(command + ['--resume']) == 0
    assert not stale.exists() and read_bag(out / 'a') == reference(source, tmp_path / 'ref',
                                                                   params_file)
    error = capsys.readouterr().err
    assert '1 of 1 bags fused now' in error and str(out / 's4fusion-batch-manifest.json') in error
    assert batch_tool.main(command + ['--resume']) == 0  # nothing left to do
    assert 'nothing left to fuse: the 1 bag given was fused' in capsys.readouterr().err
    # Finished bags are kept as they are: a resume with other parameters is refused.
    other = params_with_slop(params_file, 0.03, tmp_path / 'other.yaml')
    assert batch_tool.main([str(tmp_path / 'in'), str(out), '--params', str(other),
                            '--resume']) == 1
    assert 'fused with other parameters (sync.slop)' in capsys.readouterr().err
    (source / 'a.mcap').write_bytes(b'garbage')
    assert batch_tool.main(command + ['--overwrite']) == 1  # a bag failed: exit status 1
    error = capsys.readouterr().err
    assert 'FAILED' in error and (out / 'a').exists()
    assert '0 of 1 bags fused now (0 pairs), 1 failed (above)' in error


def test_a_resume_with_nothing_left_to_fuse_says_so_without_starting_ray(
        local_ray, ivif_dir, params_file, tmp_path, capsys):
    # Every bag fused already: the resume found that only after starting a private Ray (seconds
    # for nothing). Its own process now neither imports Ray nor starts it, and says one line;
    # it still sweeps what a killed attempt left, and a second such resume finds the same.
    for name in ('a', 'b'):
        write_bag(tmp_path / 'in' / name, camera_messages(ivif_dir, 0.5), 'mcap')
    out = tmp_path / 'out'
    command = [str(tmp_path / 'in'), str(out), '--params', str(params_file), '--resume']
    assert batch_tool.main(command[:-1]) == 0
    capsys.readouterr()
    dead = out / '.a.0123abcd.partial'  # an attempt killed after the run
    (dead / 'a').mkdir(parents=True)
    without_ray = ('import sys; from s4fusion_ros.tools import batch; code = batch.main(); '
                   "print('ray imported' if 'ray' in sys.modules else 'no ray'); sys.exit(code)")
    run = subprocess.run([sys.executable, '-c', without_ray, *command],
                         capture_output=True, text=True, timeout=300)
    manifest = out / 's4fusion-batch-manifest.json'
    said = (f's4fusion-batch: nothing left to fuse: all 2 bags given were fused into {out} by '
            f'an earlier run (manifest: {manifest})')
    assert (run.returncode, run.stdout) == (0, 'no ray\n'), run.stderr
    assert run.stderr.splitlines() == [said]
    assert not dead.exists()
    written = json.loads(manifest.read_text())
    assert [bag['status'] for bag in written['bags']] == ['skipped', 'skipped']
    assert not written['interrupted'] and 'running' not in written
    assert batch_tool.main(command) == 0
    assert capsys.readouterr().err.splitlines() == [said]


def test_sweeping_dead_attempts_spares_a_neighbour_bag_and_restores_a_replaced_one(ivif_dir,
                                                                                   tmp_path):
    source = write_bag(tmp_path / 'in' / 'x', camera_messages(ivif_dir, 0.5), 'mcap')
    out = tmp_path / 'out'
    # An overwrite of x killed between its renames: its old bag waits in the staging directory.
    killed = out / '.x.0123abcd.partial'
    shutil.copytree(source, killed / 'replaced')
    legacy = out / '.x.k3_9zq1w.partial'  # an earlier release's tempfile name
    legacy.mkdir()
    neighbour = out / '.x.1.89abcdef.partial'  # bag x.1, being written beside it
    (neighbour / 'x.1').mkdir(parents=True)
    # A segmented x's staging folder: a finished part, and what killed attempts at a part and at
    # a part's record left.
    staging = out / '.x.s4batch'
    dead = [staging / '.part-00001.0123abcd.partial', staging / '.part-00001.json.tmp']
    shutil.copytree(source, dead[0] / 'part-00001')
    dead[1].write_text('{"label"')
    shutil.copytree(source, staging / 'part-00000')
    (staging / 'part-00000.json').write_text('{}')
    swept = work.sweep_partials(work.BagJob(source, out / 'x'))
    assert sorted(swept) == sorted([killed, legacy, *dead])
    assert sorted(path.name for path in staging.iterdir()) == ['part-00000', 'part-00000.json']
    assert not killed.exists() and not legacy.exists() and neighbour.is_dir()
    assert read_bag(out / 'x') == read_bag(source)


def test_resume_fuses_again_an_output_the_manifest_does_not_list(local_ray, ivif_dir,
                                                                 params_file, tmp_path, capsys):
    # Both bags fused with slop 0.02; then bag a alone again with --overwrite and slop 0.03 (the
    # manifest now lists a, with 0.03): b, from 0.02, must not be kept by a --resume at 0.03.
    inputs, out = tmp_path / 'in', tmp_path / 'out'
    for name, seed in (('a', 1), ('b', 2)):
        write_bag(inputs / name, camera_messages(ivif_dir, 0.5, seed=seed), 'mcap')
    assert fuse_bags([inputs], out, params=params_file, progress=False).ok
    other = params_with_slop(params_file, 0.03, tmp_path / 'other.yaml')
    fused_a = fuse_bags([inputs / 'a'], out, params=other, overwrite=True, progress=False)
    assert fused_a.ok
    report = fuse_bags([inputs], out, params=other, resume=True, progress=False)
    assert [(pathlib.Path(b.output).name, b.status) for b in report.bags] == [
        ('a', 'skipped'), ('b', 'done')]
    # A kept bag keeps its row's task seconds with its counts (they were zeroed).
    assert report.bags[0].seconds == fused_a.bags[0].seconds > 0
    assert read_bag(out / 'b') == reference(inputs / 'b', tmp_path / 'ref', other)
    # A resume given one bag keeps the other listed: a later resume of both redoes neither.
    fuse_bags([inputs / 'a'], out, params=other, resume=True, progress=False)
    report = fuse_bags([inputs], out, params=other, resume=True, progress=False)
    assert [b.status for b in report.bags] == ['skipped', 'skipped']
    # Bag b recorded again under its name: a resume fuses it again, and says why.
    shutil.rmtree(inputs / 'b')
    write_bag(inputs / 'b', camera_messages(ivif_dir, 0.5, seed=4), 'mcap')
    capsys.readouterr()
    report = fuse_bags([inputs], out, params=other, resume=True, progress=False)
    assert [b.status for b in report.bags] == ['skipped', 'done']
    assert (f'fusing {inputs / "b"} again: its files changed since it was fused'
            in capsys.readouterr().err)
    assert read_bag(out / 'b') == reference(inputs / 'b', tmp_path / 'ref_b', other)
    # Its row now records the new files: the next resume keeps it.
    report = fuse_bags([inputs], out, params=other, resume=True, progress=False)
    assert [b.status for b in report.bags] == ['skipped', 'skipped']
    # An output removed since, though listed as finished, is fused again.
    shutil.rmtree(out / 'a')
    report = fuse_bags([inputs], out, params=other, resume=True, progress=False)
    assert [b.status for b in report.bags] == ['done', 'skipped']
    assert read_bag(out / 'a') == reference(inputs / 'a', tmp_path / 'ref_a', other)


def test_a_plain_run_adds_its_bags_to_the_folder_manifest(local_ray, ivif_dir, params_file,
                                                          tmp_path):
    # Bag a fused first, then bag b into the same folder: the manifest lists both, so a resume
    # of both redoes neither. A plain run with other parameters would make one manifest
    # describe two sets: refused, naming them; --overwrite lists only its own bags.
    inputs, out = tmp_path / 'in', tmp_path / 'out'
    for name, seed in (('a', 1), ('b', 2)):
        write_bag(inputs / name, camera_messages(ivif_dir, 0.5, seed=seed), 'mcap')
    assert fuse_bags([inputs / 'a'], out, params=params_file, progress=False).ok
    assert fuse_bags([inputs / 'b'], out, params=params_file, progress=False).ok
    listed = json.loads((out / 's4fusion-batch-manifest.json').read_text())['bags']
    assert sorted(pathlib.Path(b['output']).name for b in listed) == ['a', 'b']
    report = fuse_bags([inputs / 'a', inputs / 'b'], out, params=params_file, resume=True,
                       progress=False)
    assert [b.status for b in report.bags] == ['skipped', 'skipped']
    other = params_with_slop(params_file, 0.03, tmp_path / 'other.yaml')
    write_bag(inputs / 'c', camera_messages(ivif_dir, 0.5, seed=3), 'mcap')
    with pytest.raises(BatchError, match=r'other parameters \(sync\.slop\).*--overwrite'):
        fuse_bags([inputs / 'c'], out, params=other, progress=False)
    assert not (out / 'c').exists()
    assert fuse_bags([inputs / 'c'], out, params=other, overwrite=True, progress=False).ok
    manifest = json.loads((out / 's4fusion-batch-manifest.json').read_text())
    assert manifest['parameters']['sync.slop'] == 0.03
    assert [pathlib.Path(b['output']).name for b in manifest['bags']] == ['c']


@pytest.mark.parametrize('stop, api', [('SIGTERM', False), ('SIGINT', False), ('SIGTERM', True)],
                         ids=['SIGTERM', 'SIGINT', 'SIGTERM to a program calling fuse_bags'])
def test_a_stop_while_ray_starts_leaves_nothing_running(ivif_dir, compact_params_file, tmp_path,
                                                        stop, api):
    # The command gets the signal a second after the private Ray's HOME appears: while ray.init
    # runs, which holds it until ray.init returns (cluster._starting), or soon after on a fast
    # machine. Either way no Ray process nor HOME is left, and it exits 130 (not 0, a stop lost
    # in an at-fork hook; nor -11, Ray's exit after a core worker cut short). A program of its
    # own (SIGTERM's default action: die at once) gets it once the run has begun (its manifest
    # is written), and its Ray is cleaned up too.
    # 20 s of recording: on a loaded machine Ray can take seconds to come up after its HOME,
    # and a bag fused before the signal lands would exit 0.
    source = write_bag(tmp_path / 'in' / 'a', camera_messages(ivif_dir, 20.0), 'mcap')
    # Its own temporary folder holds its one private HOME: other pytest-xdist workers start Rays
    # of their own in the shared one meanwhile (a short name, for Ray's socket paths).
    temporary = pathlib.Path(tempfile.mkdtemp(prefix='s4t'))
    homes = temporary.glob
    command = ([sys.executable, '-c', 'import sys; from s4fusion_ros.batch.cluster import '
                'fuse_bags; fuse_bags(sys.argv[1:2], sys.argv[2], params=sys.argv[3], '
                'num_cpus=1)'] if api else [str(BATCH_TOOL), '--num-cpus', '1', '--params'])
    if api:
        command += [str(source), str(tmp_path / 'out'), str(compact_params_file)]
    else:
        command += [str(compact_params_file), str(source), str(tmp_path / 'out')]
    try:
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, 'TMPDIR': str(temporary)})
        with reading(proc, proc.stderr) as said:  # a failed check leaves no run fusing on
            wait_while_running(proc, lambda: list(homes('s4fusion-ray-*')), 60, said.text)
            [home] = homes('s4fusion-ray-*')
            if api:
                manifest = tmp_path / 'out' / 's4fusion-batch-manifest.json'
                wait_while_running(proc, manifest.exists, 60, said.text)
            else:
                time.sleep(1.0)
            proc.send_signal(getattr(signal, stop))
            assert exited(proc, 60), said.text()
        error = said.text()
        if not api:
            assert proc.returncode == 130, error
            assert 'interrupted' in error and 'Traceback' not in error, error
        assert not home.exists() and not processes_with_home(home)
        assert list(temporary.iterdir()) == []
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


# Ctrl-C, then Ctrl-C again and again while Ray stops (ros2 launch and `timeout` send a second
# stop signal): from the moment the private Ray is up, every 5 ms until its HOME is removed.
CTRL_C_WHILE_RAY_STOPS = '''
import os, pathlib, signal, tempfile, threading, time
from s4fusion_ros.batch.cluster import connected


def press_ctrl_c_while(home):
    while home.exists():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.005)


def ctrl_c(signum, frame):
    # Ctrl-C's, but a press sent just before the presser saw the HOME gone, landing after the
    # stop, is a press after the program's work: not the race this measures.
    if home is None or home.exists():
        raise KeyboardInterrupt


home = None
signal.signal(signal.SIGINT, ctrl_c)
try:
    with connected('local', num_cpus=1):
        [home] = pathlib.Path(tempfile.gettempdir()).glob('s4fusion-ray-*')
        presser = threading.Thread(target=press_ctrl_c_while, args=(home,))
        presser.start()
        time.sleep(60)
except KeyboardInterrupt:
    print('interrupted', flush=True)
presser.join()
print('home removed' if not home.exists() else 'home left', flush=True)
'''


def test_stop_signals_while_ray_stops_cut_nothing_short():
    # Its own temporary folder holds the one private HOME; a short name, as Ray's socket paths
    # (107 bytes at most) are made under it.
    temporary = pathlib.Path(tempfile.mkdtemp(prefix='s4t'))
    try:
        done = subprocess.run([sys.executable, '-c', CTRL_C_WHILE_RAY_STOPS], capture_output=True,
                              text=True, timeout=120, env={**os.environ, 'TMPDIR': str(temporary)})
        # Cut short, ray.shutdown left its exit hook to shut Ray down again: it wrote a session
        # folder into the removed HOME, or crashed (SIGSEGV).
        assert (done.returncode, done.stdout) == (0, 'interrupted\nhome removed\n'), done.stderr
        assert 'Exception ignored' not in done.stderr, done.stderr
        assert list(temporary.iterdir()) == []
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


# Inside a private Ray: who can read its token, and whether it asks for one; then inside the
# nodes s4fusion-bench batch starts, whether someone without the token can join them.
PRIVATE_RAY_ACCESS = '''
import os, pathlib, stat, subprocess, sys, tempfile
from s4fusion_ros.batch.bench import NODE_IPS, ray_nodes
from s4fusion_ros.batch.cluster import connected, private_home, stop_ray

with connected('local', num_cpus=1):
    [home] = pathlib.Path(tempfile.gettempdir()).glob('s4fusion-ray-*')
    print(oct(stat.S_IMODE(home.stat().st_mode)), (home / '.ray' / 'auth_token').is_file(),
          os.environ['RAY_AUTH_MODE'], flush=True)
print(os.environ['RAY_AUTH_MODE'], flush=True)
import ray
home = private_home()
try:
    with ray_nodes(ray, home, home / 'r', [1]):  # this process's second private Ray
        outsider = subprocess.run([sys.executable, '-c', f"""
import ray
ray.init(address='{ray.get_runtime_context().gcs_address}', _node_ip_address='{NODE_IPS[0]}')
"""], capture_output=True, timeout=60, env={**os.environ, 'HOME': str(home / 'outsider')})
        print('outsider joined' if outsider.returncode == 0 else 'outsider refused',
              os.environ['RAY_AUTH_MODE'], flush=True)
finally:
    stop_ray(ray, home)
print(os.environ['RAY_AUTH_MODE'], flush=True)
'''


def test_private_rays_keep_their_token_to_the_user_and_always_ask_for_it():
    # Ray made its temporary folder, which was the private HOME holding the token, writable and
    # readable by every user (0777), and an inherited RAY_AUTH_MODE=disabled (Ray's advice for
    # opting out) started it with no authentication, its servers listening on every interface.
    # The nodes of s4fusion-bench batch had no authentication at all (Ray turns it on only for
    # ray.init's own cluster), and a second private Ray in one process never started (Ray kept
    # the first one's token).
    temporary = pathlib.Path(tempfile.mkdtemp(prefix='s4t'))
    try:
        done = subprocess.run([sys.executable, '-c', PRIVATE_RAY_ACCESS], capture_output=True,
                              text=True, timeout=240, env={**os.environ, 'TMPDIR': str(temporary),
                                                           'RAY_AUTH_MODE': 'disabled'})
        assert (done.returncode, done.stdout) == (
            0, '0o700 True token\ndisabled\noutsider refused token\ndisabled\n'), done.stderr
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def test_a_private_ray_has_the_cpus_the_process_may_run_on():
    # Under taskset (a container's cgroup v2 cpuset, systemd's CPUAffinity) the private Ray
    # counted the machine's CPUs and ran a task, with its model, per CPU of the machine on the
    # one CPU allowed.
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip('this process may run on one CPU: no smaller affinity to give Ray')
    temporary = pathlib.Path(tempfile.mkdtemp(prefix='s4t'))
    try:
        done = subprocess.run(
            [sys.executable, '-c', 'from s4fusion_ros.batch.cluster import connected\n'
             'with connected() as ray:\n    print(ray.cluster_resources()["CPU"])'],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, 'TMPDIR': str(temporary)},
            preexec_fn=lambda: os.sched_setaffinity(0, allowed[:1]))
        assert (done.returncode, done.stdout) == (0, '1.0\n'), done.stderr
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def test_a_private_ray_starts_under_a_long_temporary_folder(ivif_dir, params_file, tmp_path):
    # A TMPDIR of more than 19 bytes (a cluster job's scratch folder) put the private Ray's
    # socket paths past AF_UNIX's 107 bytes, and every local run was Ray's OSError traceback.
    scratch = tmp_path / 'scratch of job 4711 on the cluster'
    scratch.mkdir()
    write_bag(tmp_path / 'in' / 'a', camera_messages(ivif_dir, 0.5), 'mcap')
    done = subprocess.run([str(BATCH_TOOL), str(tmp_path / 'in'), str(tmp_path / 'out'),
                           '--params', str(params_file), '--num-cpus', '1'],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, 'TMPDIR': str(scratch)})
    assert done.returncode == 0, done.stderr
    assert (tmp_path / 'out' / 'a' / 'metadata.yaml').is_file()
    assert list(scratch.iterdir()) == []  # its HOME went elsewhere, and went when Ray stopped


@pytest.mark.parametrize('length', [19, 20])
def test_a_private_rays_home_stays_in_tmpdir_while_its_sockets_fit(length, monkeypatch):
    # The rule's edge: 19 bytes of TMPDIR still hold the home with room for Ray's longest
    # socket path, 20 bytes do not and the home goes to /tmp.
    folder = tempfile.mkdtemp(prefix='s4f', dir='/tmp')
    scratch = folder + '/' + 'x' * (length - len(folder) - 1)
    os.mkdir(scratch)
    monkeypatch.setattr(tempfile, 'tempdir', scratch)
    try:
        home = cluster.private_home()
        assert len(os.fsencode(home)) <= cluster.LONGEST_HOME
        assert str(home.parent) == (scratch if length <= 19 else '/tmp')
        shutil.rmtree(home)
    finally:
        shutil.rmtree(folder)


def test_interrupted_run_resumes_with_only_what_was_missing(local_ray, ivif_dir, long_bag,
                                                            compact_params_file, tmp_path):
    # One CPU works through a small bag, the long one's four segments, then two more small bags;
    # at the compact network's pace the stop lands before the long bag's last parts have ended.
    inputs = tmp_path / 'fleet'
    shutil.copytree(long_bag[0], inputs / 'long')
    for name, seed in (('a', 1), ('m', 2), ('n', 3)):
        write_bag(inputs / name, camera_messages(ivif_dir, 2.0, seed=seed), 'mcap')
    out = tmp_path / 'out'
    proc = subprocess.Popen([str(BATCH_TOOL), str(inputs), str(out), '--params',
                             str(compact_params_file), '--num-cpus', '1', '--segment-minutes',
                             '0.15'],
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    with reading(proc, proc.stderr) as said:  # a failed check leaves no run fusing on
        wait_while_running(proc, lambda: (out / 'a').exists() and len(
            list(out.glob('.long.s4batch/part-*.json'))) >= 2, 240, said.text)
        # Mid-run the manifest already records the parameters: a run killed outright (SIGKILL,
        # out of memory) still tells a later --resume what its bags were fused with.
        running = json.loads((out / 's4fusion-batch-manifest.json').read_text())
        assert running['running'] and running['parameters']['sync.slop'] == 0.02
        # SIGTERM, as `kill` and service managers stop it: the clean-up of Ctrl-C, not Ray's
        # crash handler (which ray.init would install).
        proc.send_signal(signal.SIGTERM)
        assert exited(proc, 60), said.text()
    error = said.text()
    assert proc.returncode == 130, error
    assert 'interrupted' in error and 'Traceback' not in error
    assert 'Token authentication' not in error  # Ray's notice on each start: no news here
    assert json.loads((out / 's4fusion-batch-manifest.json').read_text())['interrupted']
    assert not list(out.rglob('.*.partial'))
    # Its private Ray's session folder went with its HOME: none named for its process (Ray
    # names them session_<time>_<pid>) is left in Ray's default place.
    assert not list(pathlib.Path(tempfile.gettempdir(), 'ray').glob(f'session_*_{proc.pid}'))
    finished = {p.name for p in out.iterdir() if not p.name.startswith('.')} - {
        's4fusion-batch-manifest.json'}
    parts = {p.stem for p in (out / '.long.s4batch').glob('part-*.json')}
    assert finished and parts and 'long' not in finished, (finished, parts)
    stamps = {name: (out / name).stat().st_mtime_ns for name in finished}

    seen = []
    report = fuse_bags([inputs], out, params=compact_params_file, segment_minutes=0.15,
                       resume=True, on_unit=seen.append)
    assert report.ok, report.bags
    redone = {(pathlib.Path(r['label'].split(' ')[0]).name, r['index']) for r in seen}
    expected_redo = {(name, 0) for name in ('a', 'm', 'n') if name not in finished}
    expected_redo |= {('long', i) for i in range(4) if f'part-{i:05d}' not in parts}
    assert redone == expected_redo
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == stamps
    for row in report.bags:
        name = pathlib.Path(row.input).name
        assert row.status == ('skipped' if name in finished else 'done')
        assert row.fused > 0
    for name in ('long', 'a', 'm', 'n'):
        assert read_bag(out / name) == reference(inputs / name, tmp_path / 'ref' / name,
                                                 compact_params_file)


def test_a_bag_with_a_damaged_chunk_fails_naming_the_damage(ivif_dir, params_file, tmp_path):
    # s4fusion-bag writes what reads of it and exits 1; a batch read the others, committed the
    # bag and called it done, the lost messages only in a warning.
    source = write_bag(tmp_path / 'in' / 'a', camera_messages(ivif_dir, 4.0), 'mcap',
                       zstd_chunks=True)
    damage_chunk(source / 'a.mcap', mcap_chunks(source / 'a.mcap')[3], 'bit flip')
    job = work.BagJob(source, tmp_path / 'out' / 'a')
    (unit,) = work.plan_bag(job, settings.load_offline_params(params_file), 0)
    with one_torch_thread():
        result = work.run_unit(unit)
    assert re.fullmatch(rf'{re.escape(str(source))}: not fused, as a batch keeps no partial bag '
                        r'\(s4fusion-bag fuses what reads of it\) \(.+: a\.mcap: 1 damaged '
                        r'chunk skipped .+ lost; the others were read\)', result['error']), result
    assert not job.output.exists()
