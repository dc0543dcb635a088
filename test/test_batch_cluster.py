"""s4fusion-batch on a two-node Ray cluster on loopback: a node lost mid-run costs nothing."""

import importlib.util
import os
import threading
import time

import pytest

from s4fusion_ros.batch.cluster import fuse_bags
from s4fusion_ros.batch.work import BatchError
from support import (camera_messages, compact_params_file, drifting, params_file,  # noqa: F401
                     read_bag, reference, write_bag)

# A mark, not a module-level importorskip: launch_testing's pytest plugin (present on a robot)
# imports every test module while collecting, and a skip raised there skips the whole folder.
pytestmark = pytest.mark.skipif(importlib.util.find_spec('ray') is None,
                                reason='Ray (the [ray] extra) is not installed')

HEAD_IP, WORKER_IP = '127.0.0.2', '127.0.0.3'
# A lost node is noticed within about a second instead of Ray's default 15 s.
FAST_HEALTH_CHECKS = {'health_check_initial_delay_ms': 0, 'health_check_period_ms': 300,
                      'health_check_failure_threshold': 3}


@pytest.fixture
def cluster(ray_home, monkeypatch, request):
    """A head node (127.0.0.2, with the driver) and a worker node (127.0.0.3), 1 CPU each (the
    worker: as many as an indirect parameter says)."""
    import ray
    from ray.cluster_utils import Cluster
    # Cluster writes the head's address into RAY_TMPDIR/ray, else /tmp/ray, which every user's
    # Ray shares and which may not exist (FileNotFoundError): this cluster's own, as in
    # batch.bench.ray_nodes.
    (ray_home / 'cluster' / 'ray').mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv('RAY_TMPDIR', str(ray_home / 'cluster'))
    cluster = Cluster(initialize_head=True, head_node_args={
        'num_cpus': 1, 'node_ip_address': HEAD_IP, 'temp_dir': str(ray_home / 'cluster'),
        'include_dashboard': False, '_system_config': FAST_HEALTH_CHECKS})
    worker = cluster.add_node(num_cpus=getattr(request, 'param', 1), node_ip_address=WORKER_IP)
    ray.init(address=cluster.address, _node_ip_address=HEAD_IP, logging_level='warning')
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def test_a_node_killed_mid_run_still_gives_complete_identical_bags(cluster, ivif_dir,
                                                                   compact_params_file, tmp_path):
    cluster, worker = cluster
    inputs = tmp_path / 'fleet'
    for name, seed in (('a', 1), ('b', 2), ('c', 3)):
        write_bag(inputs / name, drifting(camera_messages(ivif_dir, 5.0, seed=seed), seed),
                  'mcap' if seed % 2 else 'sqlite3')
    on_worker, results, outcome = threading.Event(), [], {}
    running_there = set()

    def progress(label, ip, pairs):
        if ip == WORKER_IP and not on_worker.is_set():
            running_there.add(label)
            on_worker.set()

    def run():
        try:
            outcome['report'] = fuse_bags([inputs], tmp_path / 'out', address=cluster.address,
                                          params=compact_params_file, on_unit=results.append,
                                          on_progress=progress, progress=False)
        except BaseException as error:  # noqa: BLE001 - shown by the assertion below
            outcome['error'] = error

    # A daemon: a run that hangs fails the test below, where the interpreter's exit would
    # wait for it for ever.
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    assert on_worker.wait(timeout=180), 'no unit ever ran on the worker node'
    cluster.remove_node(worker)  # kills its raylet and its workers mid-task
    runner.join(timeout=300)
    assert not runner.is_alive() and 'error' not in outcome, outcome
    report = outcome['report']
    assert report.ok, report.bags
    # The unit that was running on the lost node finished on the head node.
    lost = running_there.pop()
    assert [r['ip'] for r in results if r['label'] == lost] == [HEAD_IP]
    for name in ('a', 'b', 'c'):
        assert read_bag(tmp_path / 'out' / name) == reference(
            inputs / name, tmp_path / 'ref' / name, compact_params_file), name
    # The killed attempt's partial bag was swept when its bag finished.
    assert sorted(os.listdir(tmp_path / 'out')) == ['a', 'b', 'c', 's4fusion-batch-manifest.json']


@pytest.mark.parametrize('cluster', [2], indirect=True)
def test_a_task_that_one_node_can_take_runs_there_until_that_node_is_lost(
        cluster, ivif_dir, params_file, tmp_path):
    # Nodes are counted apart (the head's CPU and the worker's two make no three-CPU node), and
    # a lost node's CPUs take nothing: Ray would wait for them for ever.
    import ray
    cluster, worker = cluster
    inputs = tmp_path / 'in'
    write_bag(inputs / 'a', camera_messages(ivif_dir, 0.5), 'mcap')
    results = []
    report = fuse_bags([inputs], tmp_path / 'out', address=cluster.address, params=params_file,
                       cpus_per_task=2, on_unit=results.append, progress=False)
    assert report.ok and [r['ip'] for r in results] == [WORKER_IP], (report.bags, results)
    cluster.remove_node(worker)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(
            node['Alive'] for node in ray.nodes() if node['NodeManagerAddress'] == WORKER_IP):
        time.sleep(0.2)
    with pytest.raises(BatchError, match=r'--cpus-per-task 2: no node of the cluster has that '
                                         r'many CPUs \(at most 1\)'):
        fuse_bags([inputs], tmp_path / 'again', address=cluster.address, params=params_file,
                  cpus_per_task=2, progress=False)
