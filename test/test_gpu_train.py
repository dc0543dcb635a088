"""scripts/gpu_train.py as far as a CPU runs it: data packing, resumable training under a time
budget, what a device call brings back under $OUT, and unpacking for the next call."""

import collections
import hashlib
import importlib.util
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time

import cv2
import pytest
import torch

from s4fusion_ros.model.scan import numba_scan_fn, scan_backend
from s4fusion_ros.training.data import IVIF_DATA_NOTE, pair_key, training_data_note, training_pairs
from support import stop_once_logged

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'scripts' / 'gpu_train.py'


def script(*args, env=None, check=True):
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                            text=True, timeout=600, env={**os.environ, **(env or {})})
    if check:
        assert result.returncode == 0, result.stderr
    return result


def run_record(run):
    """The JSON of the weights in a run folder (the compact recipe trains on the plain base,
    which is no preset's configuration: s4fusion_custom.json)."""
    (path,) = run.glob('s4fusion_*.json')
    return json.loads(path.read_text())


@pytest.fixture(scope='module')
def gpu_train():
    """The script as a module, for its functions."""
    spec = importlib.util.spec_from_file_location('gpu_train', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def packed_data(tmp_path, pair_folder):
    """Two real MSRS pairs packed as the device call gets them."""
    script('pack-data', '--data', pair_folder, '--to', tmp_path / 'data')
    return tmp_path / 'data'


def test_pack_data_writes_luminance_per_dataset(packed_data, ivif_dir):
    files = sorted(p.relative_to(packed_data).as_posix() for p in packed_data.rglob('*.jpg'))
    assert files == ['pairs-train/ir/00004N.jpg', 'pairs-train/ir/00055D.jpg',
                     'pairs-train/vi/00004N.jpg', 'pairs-train/vi/00055D.jpg']
    visible = cv2.imread(str(packed_data / 'pairs-train' / 'vi' / '00055D.jpg'),
                         cv2.IMREAD_UNCHANGED)
    original = cv2.imread(str(ivif_dir / 'msrs' / 'vi' / '00055D.png'))
    expected = cv2.cvtColor(original, cv2.COLOR_BGR2YCrCb)[:, :, 0]
    assert visible.shape == expected.shape  # one channel: the luminance
    assert abs(visible.astype(float) - expected).mean() < 1.5  # JPEG at quality 95
    assert training_data_note(packed_data) == ''  # a folder of pairs, not the ivif layout
    # Packing into a folder that holds something would mix its datasets (or marker) in.
    again = script('pack-data', '--data', packed_data, '--to', packed_data, check=False)
    assert again.returncode != 0 and 'not empty; remove it' in again.stderr


def test_pack_data_keeps_16_bit_images_as_training_reads_them(tmp_path, pair_folder):
    # Training reads a 16-bit image as value / 65535; JPEG holds 8 bits, and OpenCV's encoder
    # cast each value to uint8, saturating: the packed IR was white wherever it was above 255.
    for path in (pair_folder / 'ir').iterdir():
        cv2.imwrite(str(path), cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype('uint16') * 257)
    script('pack-data', '--data', pair_folder, '--to', tmp_path / 'data')
    packed = cv2.imread(str(tmp_path / 'data' / 'pairs-train' / 'ir' / '00004N.jpg'),
                        cv2.IMREAD_UNCHANGED)
    expected = cv2.imread(str(pair_folder / 'ir' / '00004N.png'), cv2.IMREAD_UNCHANGED) // 257
    assert abs(packed.astype(float) - expected).mean() < 1.5  # JPEG at quality 95


def test_pack_data_refuses_pairs_it_would_pack_as_one_file(tmp_path, pair_folder):
    # Packed by stem as .jpg: 00004N.png and a 00004N.jpg beside it were one file, the later
    # pair silently in place of the earlier, and a pair less trained.
    for side in ('ir', 'vi'):
        image = cv2.imread(str(pair_folder / side / '00055D.png'), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(pair_folder / side / '00004N.jpg'), image)
    packed = script('pack-data', '--data', pair_folder, '--to', tmp_path / 'data', check=False)
    assert packed.returncode != 0 and '00004N.jpg, 00004N.png' in packed.stderr
    assert not list((tmp_path / 'data').rglob('*.jpg'))


def test_packed_ivif_layout_trains_on_its_training_split(tmp_path, ivif_dir):
    # The whole layout, as the device call gets it: the same pairs per dataset, read back as a
    # folder of datasets (not as the ivif layout, whose splits the packed folder lacks).
    script('pack-data', '--data', ivif_dir, '--to', tmp_path / 'data')
    original, packed = training_pairs(ivif_dir), training_pairs(tmp_path / 'data')

    def per_dataset(pairs, root):
        names = collections.defaultdict(set)
        for pair in pairs:
            names[pair.dataset.relative_to(root).as_posix()].add(pathlib.Path(pair.name).stem)
        return names

    assert per_dataset(packed, tmp_path / 'data') == {
        f'{dataset.replace("/", "-")}-train': names
        for dataset, names in per_dataset(original, ivif_dir).items()}
    # Weights trained on the copy record the data that weights trained on the layout record,
    # and their pairs are the same pairs to the report's training-overlap notes.
    assert ({pair_key(pair.label) for pair in packed}
            == {pair_key(pair.label) for pair in original})
    assert training_data_note(ivif_dir) == IVIF_DATA_NOTE
    assert training_data_note(tmp_path / 'data') == (
        f'{IVIF_DATA_NOTE} (packed by scripts/gpu_train.py pack-data: luminance, JPEG quality 95)')
    # ... and a run on it records that note (one step of s4fusion-train, as a recipe runs it).
    subprocess.run([sys.executable, '-c', 'import sys; from s4fusion_ros.entry_points import '
                    'train; sys.exit(train())', '--preset', 'compact', '--data', tmp_path / 'data',
                    '--out', tmp_path / 'run', '--steps', '1', '--batch-size', '1', '--crop', '25',
                    '--threads', '1', '--device', 'cpu', '--no-progress'], check=True, timeout=600,
                   capture_output=True)
    deviation = run_record(tmp_path / 'run')['training']['deviation']
    assert deviation.endswith(f'; {training_data_note(tmp_path / "data")}.')


def test_train_packs_runs_that_resume_in_the_next_call(tmp_path, packed_data):
    tiny = ['--', '--steps', '4', '--batch-size', '1', '--crop', '25', '--threads', '1',
            '--keep-every', '2']
    runs, out = tmp_path / 'runs', tmp_path / 'out'
    # An earlier call's mamba-ssm build is checked before use: here, without CUDA, it fails.
    first = script('train', '--data', packed_data, '--runs', runs, '--minutes', '5',
                   '--recipes', 'compact', '--device', 'cpu', '--mamba-site', tmp_path,
                   *tiny, '--stop-at', '2', env={'OUT': str(out)})
    assert 'mamba-ssm scan check: failed' in first.stderr
    assert 'compact: ' in first.stderr and 'new run' in first.stderr
    summary = json.loads((out / 'gpu_train_summary.json').read_text())
    assert summary['recipes']['compact']['step'] == 2
    assert summary['recipes']['compact']['steps_per_s'] > 0
    # The device and the scan the run used (the CPU's, not the chunked CUDA fallback's), and
    # the seed of a run from scratch.
    assert summary['device'] == 'cpu' and summary['mamba_ssm'].startswith('failed')
    assert summary['recipes']['compact']['scan'] == scan_backend(torch.empty(0))
    assert summary['recipes']['compact']['seed'] == 0
    assert 'to be fitted to the time limit' in (runs / 'compact' / 'train_stderr.log').read_text()
    brought_back = sorted(p.name for p in out.iterdir())
    assert brought_back == sorted(summary['parts'] + ['gpu_train_summary.json'])  # one pack
    assert len(brought_back) <= 8 and all(p.stat().st_size <= 15 * 2**20 for p in out.iterdir())

    # The next call starts from what came back, not from the folder the last one trained in.
    shutil.rmtree(runs)
    script('unpack', out, '--runs', runs, '--travel-mib', '0')  # 0: no limit
    assert (runs / 'compact' / 'train_state.pt').exists()
    kept = 'checkpoints/s4fusion_custom-step000002.safetensors'  # the recipe's plain base
    assert (runs / 'compact' / kept).exists()  # the weights kept travel with the run
    out_again = tmp_path / 'out2'
    both = script('train', '--data', packed_data, '--runs', runs, '--out', out_again,
                  '--mamba-sdist', SCRIPT, '--mamba-site', tmp_path, check=False)
    assert both.returncode != 0 and 'not both' in both.stderr
    second = script('train', '--data', packed_data, '--runs', runs, '--out', out_again,
                    '--minutes', '5', '--recipes', 'compact', '--device', 'cpu', *tiny)
    assert 'resuming' in second.stderr
    log = (runs / 'compact' / 'train_log.jsonl').read_text().splitlines()
    assert [json.loads(line)['step'] for line in log] == [1, 2, 3, 4]
    weights = run_record(runs / 'compact')
    assert weights['config']['base'] == 'laplacian'
    assert weights['training']['steps_done'] == 4

    # A state that would not fit what the next call carries is left out; that run goes on from
    # its weights instead, and resumes as such in the call after.
    script('unpack', out_again, '--runs', runs, '--travel-mib', '0.001')
    assert not (runs / 'compact' / 'train_state.pt').exists()
    third = script('train', '--data', packed_data, '--runs', runs, '--out', tmp_path / 'out3',
                   '--minutes', '5', '--recipes', 'compact', '--device', 'cpu', *tiny,
                   '--stop-at', '1')
    assert 'from the last weights' in third.stderr
    summary = json.loads((tmp_path / 'out3' / 'gpu_train_summary.json').read_text())
    assert summary['recipes']['compact']['steps_per_s'] > 0  # the new run's first step
    # Its own draw of batches, from the weights it starts from: resumed, it keeps it.
    (start,) = (runs / 'compact' / 'init').glob('s4fusion_*.safetensors')
    seed = int(hashlib.sha256(start.read_bytes()).hexdigest()[:8], 16)
    assert summary['recipes']['compact']['seed'] == seed != 0
    continued = run_record(runs / 'compact')['training']
    assert continued['steps_done'] == 1
    assert continued['initialised_from']['training']['steps_done'] == 4
    assert list((runs / 'compact' / 'init').glob('s4fusion_*.json'))
    # The weights the first run kept stay with the run, out of the new run's way.
    earlier = runs / 'compact' / 'checkpoints-earlier' / 'start1' / pathlib.Path(kept).name
    assert earlier.exists() and not (runs / 'compact' / 'checkpoints').exists()
    shutil.rmtree(runs)
    # No travel limit: what this checkout's own .gpu holds must not decide the test.
    script('unpack', tmp_path / 'out3', '--runs', runs, '--travel-mib', '0')
    with open(runs / 'compact' / 'train_log.jsonl', 'a') as log:
        log.write('{"step": 2, "lo')  # torn by a kill: training drops it, and so does the summary
    fourth = script('train', '--data', packed_data, '--runs', runs, '--out', tmp_path / 'out4',
                    '--minutes', '5', '--recipes', 'compact', '--device', 'cpu', *tiny)
    assert 'resuming' in fourth.stderr
    summary = json.loads((tmp_path / 'out4' / 'gpu_train_summary.json').read_text())
    assert summary['recipes']['compact']['returncode'] == 0, fourth.stderr
    assert summary['recipes']['compact']['step'] == 4
    assert summary['recipes']['compact']['steps_per_s'] > 0  # of this call's 3 steps
    assert summary['recipes']['compact']['seed'] == seed
    continued = run_record(runs / 'compact')['training']
    assert continued['initialised_from']['training']['steps_done'] == 4

    def compact_call(out, *extra):
        """A call of the compact recipe with `extra` arguments: its stderr and summary."""
        result = script('train', '--data', packed_data, '--runs', runs, '--out', tmp_path / out,
                        '--minutes', '5', '--recipes', 'compact', '--device', 'cpu', *tiny,
                        *extra)
        summary = json.loads((tmp_path / out / 'gpu_train_summary.json').read_text())
        assert summary['recipes']['compact']['returncode'] == 0, result.stderr
        return result.stderr, summary['recipes']['compact']

    # A state from other settings is refused by s4fusion-train: the run goes on from its weights.
    stderr, summary = compact_call('out5', '--grad-weight', '2')
    assert ('its run finished its schedule in an earlier call; without its training state, '
            'or with other settings, it is trained again' in stderr)
    assert 'starting again from its weights' in stderr
    assert summary['steps_per_s'] > 0
    restarted = run_record(runs / 'compact')['training']
    assert restarted['loss']['grad_weight'] == 2.0
    assert restarted['initialised_from']['training']['steps_done'] == 4
    # Without its state the run will start again from its weights: its init/ copy stays here.
    script('unpack', tmp_path / 'out4', '--runs', runs, '--max-state-mib', '0')
    assert not (runs / 'compact' / 'init').exists()
    assert earlier.exists()  # what the run kept does not go with its starting weights
    assert list((runs / 'compact').glob('s4fusion_*.safetensors'))

    # A recipe of another network than the run's weights (here a detail gain) starts a new run;
    # starting from those weights would fail in every call.
    stderr, summary = compact_call('out6', '--detail-gain', '1.3')
    assert 'another network configuration; starting a new run' in stderr
    assert summary['step'] == 4 and summary['restarted'] == ['new run']
    new = run_record(runs / 'compact')
    assert new['config']['detail_gain'] == 1.3 and 'initialised_from' not in new['training']


def test_a_checkpoint_cut_short_is_not_packed(gpu_train, tmp_path):
    # A SIGKILL during a save leaves the temporary file of files.write_atomically: never
    # brought back, whatever its size (a 41 MB authors state would not travel).
    run = tmp_path / 'runs' / 'authors'
    run.mkdir(parents=True)
    for name in ('train_state.pt', '.train_state.pt.tmp', 's4fusion_authors.json'):
        (run / name).write_bytes(bytes(1000))
    gpu_train.pack(tmp_path / 'runs', tmp_path / 'out', {'recipes': {}}, max_state_mib=1)
    parts = b''.join(p.read_bytes() for p in sorted((tmp_path / 'out').glob('*runs.tar.part-*')))
    with tarfile.open(fileobj=io.BytesIO(parts)) as archive:
        packed = {pathlib.PurePath(name).name for name in archive.getnames()}
    assert packed == {'runs', 'authors', 'train_state.pt', 's4fusion_authors.json'}


def test_a_recipe_whose_own_init_weights_do_not_fit_fails_without_dropping_anything(
        tmp_path, packed_data):
    # The authors weights cannot start the compact network: that is the recipe's fault, not the
    # run's, so there is no new run to start; the call reports the failure and still packs.
    result = script('train', '--data', packed_data, '--runs', tmp_path / 'runs', '--out',
                    tmp_path / 'out', '--minutes', '5', '--recipes', 'compact', '--device', 'cpu',
                    '--', '--steps', '2', '--batch-size', '1', '--crop', '25', '--init-weights',
                    REPO / 's4fusion_ros' / 'weights' / 's4fusion_authors.safetensors')
    summary = json.loads((tmp_path / 'out' / 'gpu_train_summary.json').read_text())
    assert summary['recipes']['compact']['returncode'] != 0
    assert 'restarted' not in summary['recipes']['compact']
    assert 'starting a new run' not in result.stderr
    log = (tmp_path / 'runs' / 'compact' / 'train_stderr.log').read_text()
    assert 'its configuration differs from the one being trained' in log
    # ... and says why in the call's own output: it came back only inside the packed runs.
    assert 'compact: s4fusion-train exited 1; the end of its output:' in result.stderr
    assert 'its configuration differs from the one being trained' in result.stderr


def test_time_budget_and_arguments(tmp_path, packed_data):
    # No time left for training: the recipe is skipped, and what there is still gets packed.
    result = script('train', '--data', packed_data, '--runs', tmp_path / 'runs', '--out',
                    tmp_path / 'out', '--minutes', '0.1', '--pack-minutes', '0.5', '--recipes',
                    'compact', '--device', 'cpu')
    assert 'training on cpu' in result.stderr
    summary = json.loads((tmp_path / 'out' / 'gpu_train_summary.json').read_text())
    assert summary['recipes'] == {'compact': {'skipped': 'no time left'}}, result.stderr
    env = {k: v for k, v in os.environ.items() if k != 'OUT'}
    missing_out = subprocess.run([sys.executable, str(SCRIPT), 'train', '--data', packed_data,
                                  '--runs', tmp_path / 'r'], capture_output=True, text=True,
                                 env=env)
    assert missing_out.returncode != 0 and '--out is needed' in missing_out.stderr
    unknown = script('train', '--data', packed_data, '--runs', tmp_path / 'r', '--out',
                     tmp_path / 'o', '--recipes', 'huge', check=False)
    assert unknown.returncode == 2 and "invalid choice: 'huge'" in unknown.stderr
    # A call whose parts did not all come back is not unpacked over the runs there are.
    (tmp_path / 'out' / summary['parts'][0]).unlink()
    incomplete = script('unpack', tmp_path / 'out', '--runs', tmp_path / 'r', check=False)
    assert incomplete.returncode != 0 and 'parts missing' in incomplete.stderr
    assert not (tmp_path / 'r').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='with CUDA the sdist would be built')
def test_a_cpu_call_reports_mamba_ssm_as_not_built_not_as_failed(tmp_path, packed_data):
    # The documented call with --device cpu on a machine without CUDA: its summary said
    # "failed: its build or check" of a build never tried (the log said it was not built).
    script('train', '--data', packed_data, '--runs', tmp_path / 'runs', '--out',
           tmp_path / 'out', '--minutes', '0.1', '--pack-minutes', '0.5', '--recipes',
           'compact', '--device', 'cpu', '--mamba-sdist', tmp_path / 'mamba_ssm.tar.gz')
    summary = json.loads((tmp_path / 'out' / 'gpu_train_summary.json').read_text())
    assert summary['mamba_ssm'] == 'not built: no CUDA device'
    assert 'warning' not in summary


def test_a_call_stopped_from_outside_stops_its_run_and_brings_back_what_it_saved(
        tmp_path, packed_data):
    # SIGTERM to the script (a device call ended early) killed it at once with nothing under
    # $OUT, while its run, in a session of its own, went on training unseen.
    runs, out = tmp_path / 'runs', tmp_path / 'out'
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), 'train', '--data', str(packed_data), '--runs', str(runs),
         '--out', str(out), '--minutes', '5', '--recipes', 'compact', '--device', 'cpu', '--',
         '--steps', '2000', '--batch-size', '1', '--crop', '25', '--threads', '1'],
        stderr=subprocess.PIPE, text=True)
    log = runs / 'compact' / 'train_log.jsonl'
    stderr = stop_once_logged(proc, log, 2, 300, 120)
    assert proc.returncode == 130, stderr
    assert 'stopped: packing what the recipes saved' in stderr
    summary = json.loads((out / 'gpu_train_summary.json').read_text())
    assert summary['stopped'] and summary['parts']
    steps = run_record(runs / 'compact')['training']['steps_done']
    assert steps >= 2  # checkpointed on the SIGTERM passed on to it
    time.sleep(2)  # a run still going would log more steps
    assert len(log.read_text().splitlines()) == steps


def test_a_command_past_its_time_is_stopped_with_its_whole_process_group(tmp_path, gpu_train):
    # A training run past its limit gets SIGTERM (it checkpoints) and then SIGKILL; a build's
    # compilers (here a grandchild) must not outlive it.
    pid_file = tmp_path / 'grandchild.pid'
    code = ('import signal, subprocess, sys, time\n'
            'child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])\n'
            f'open({str(pid_file)!r}, "w").write(str(child.pid))\n'
            'signal.signal(signal.SIGTERM, lambda *_: (print("checkpoint", file=sys.stderr), '
            'sys.exit(3)))\n'
            'time.sleep(60)\n')
    begun = time.monotonic()
    returncode, stderr = gpu_train.run_group([sys.executable, '-c', code], dict(os.environ),
                                             timeout=2, stop_grace=10)
    assert (returncode, stderr.strip()) == (3, 'checkpoint')
    assert time.monotonic() - begun < 12
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pathlib.Path(f'/proc/{grandchild}').exists():
        status = pathlib.Path(f'/proc/{grandchild}/stat').read_text().split()[2]
        if status == 'Z':
            break  # killed, not yet reaped by its parent's parent
        time.sleep(0.1)
    else:
        assert not pathlib.Path(f'/proc/{grandchild}').exists()
    returncode, _ = gpu_train.run_group([sys.executable, '-c', code], dict(os.environ),
                                        timeout=1, stop_grace=0)
    assert returncode == -9  # a build gets no grace: killed at once


def test_a_hung_last_recipe_is_killed_in_time_to_pack_before_the_device_ends_the_call(
        gpu_train):
    # The defaults: the last recipe trains until the packing margin before the deadline.
    args = gpu_train.build_parser().parse_args(['train', '--data', 'd', '--runs', 'r'])
    left = 8 * 60 + 60 * args.pack_minutes
    timeout, grace = gpu_train.stop_times(8.0, left, args.pack_minutes)
    assert timeout == left  # SIGTERM at the deadline
    assert timeout + grace == left + 30 * args.pack_minutes  # SIGKILL with half the margin left
    # The call's budget and its packing margin stay under the device's 600 s a call.
    assert 60 * (args.minutes + args.pack_minutes) < 600
    # An earlier recipe, far from the deadline, keeps the whole grace past its own limit.
    assert gpu_train.stop_times(3.0, left, pack_minutes=0.5) == (3 * 60 + 60, 60)


def test_a_budget_past_the_calls_limit_is_cut_to_be_packed_within_it(
        tmp_path, packed_data, gpu_train):
    # --minutes 12 in a 10-minute call: the last run trained to minute 11.5 and the runs were
    # packed after it, by when the device had ended the call: nothing came back.
    args = gpu_train.build_parser().parse_args(['train', '--data', 'd', '--runs', 'r',
                                                '--minutes', '12'])
    assert args.call_minutes == 10  # the device's limit on a command
    assert gpu_train.call_budget(args.minutes, args.pack_minutes, args.call_minutes) == 9.5
    assert gpu_train.call_budget(9.0, 0.5, 10.0) == 9.0  # the documented call, as it is
    assert gpu_train.call_budget(12.0, 0.5, 0) == 12.0  # no limit
    result = script('train', '--data', packed_data, '--runs', tmp_path / 'runs', '--out',
                    tmp_path / 'out', '--minutes', '5', '--call-minutes', '0.55', '--recipes',
                    'compact', '--device', 'cpu')
    assert 'WARNING: --minutes 5 and --pack-minutes 0.5 pass the 0.55 minutes' in result.stderr
    assert 'training in 0.05 minutes instead' in result.stderr
    summary = json.loads((tmp_path / 'out' / 'gpu_train_summary.json').read_text())
    assert summary['recipes'] == {'compact': {'skipped': 'no time left'}}


@pytest.mark.skipif(numba_scan_fn() is None, reason='numba is not installed')
def test_the_scan_check_passes_a_kernel_that_agrees_forward_and_backward(gpu_train, capsys):
    # Without CUDA its code only ever ran to a failure, which a slip in it would give too: every
    # GPU call would then have trained with the chunked scan, several times slower. Here the
    # numba kernel stands in for mamba-ssm's, on the CPU; gradients included, as training
    # runs the backward kernel.
    assert gpu_train.check_scan(None, device='cpu', backend='numba')
    log = capsys.readouterr().err
    assert 'numba scan check: passed' in log and 'gradients of u, delta, A, B, C, D' in log


def test_a_build_replaces_the_one_an_earlier_call_left(tmp_path, gpu_train):
    # pip --target keeps what the folder holds: a second --mamba-sdist call on a warm machine
    # built for minutes and went on with the earlier call's build (exit 0).
    source, target = tmp_path / 'source', tmp_path / 'site'
    (source / 'tiny').mkdir(parents=True)
    (source / 'setup.py').write_text(
        'from setuptools import setup\nsetup(name="tiny", version="1", packages=["tiny"])\n')
    for version in (1, 2):
        (source / 'tiny' / '__init__.py').write_text(f'VERSION = {version}\n')
        shutil.rmtree(source / 'build', ignore_errors=True)
        returncode, stderr = gpu_train.install_into(source, target, dict(os.environ), 300)
        assert returncode == 0, stderr
        assert (target / 'tiny' / '__init__.py').read_text() == f'VERSION = {version}\n'


def test_a_command_that_cannot_start_is_a_failed_run(tmp_path, gpu_train):
    returncode, stderr = gpu_train.run_group([str(tmp_path / 'missing')], dict(os.environ),
                                             timeout=5, stop_grace=0)
    assert returncode == -1 and 'could not start' in stderr and 'missing' in stderr


def test_steps_per_second_counts_the_steps_a_resumed_run_did_again(tmp_path, gpu_train):
    # Killed at step 5 after a checkpoint at step 3: the resumed run keeps steps 1-3 of the log
    # and runs 4-8 again, all in this call.
    def write(records):
        (tmp_path / 'train_log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))

    before = [{'step': step, 'seconds': 1.0} for step in range(1, 6)]
    write(before)
    log_before = gpu_train.log_records(tmp_path)
    again = [{'step': step, 'seconds': 0.25 if step < 6 else 0.5} for step in range(4, 9)]
    write(before[:3] + again)
    summary = gpu_train.recipe_summary(tmp_path, 0, 10.0, log_before)
    assert summary == {'returncode': 0, 'step': 8, 'seconds': 10.0, 'steps_per_s': 2.5}


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_a_call_without_cuda_refuses_to_train_unless_the_cpu_is_asked_for(tmp_path):
    # It trained on the CPU for the whole call and its summary named the CUDA fallback scan.
    begun = time.monotonic()
    result = script('train', '--data', tmp_path / 'data', '--runs', tmp_path / 'runs', '--out',
                    tmp_path / 'out', '--recipes', 'compact', check=False)
    assert result.returncode == 1
    assert 'no CUDA device' in result.stderr and 'pass --device cpu' in result.stderr
    assert not (tmp_path / 'runs').exists() and not list((tmp_path / 'out').iterdir())
    assert time.monotonic() - begun < 60  # at once: no build, no data read


def test_the_device_is_read_as_s4fusion_train_reads_it(gpu_train, monkeypatch):
    # On a machine with one GPU (torch's answers here, as such a machine gives them): a device
    # s4fusion-train refuses (cuda:1) ended the call in a traceback of torch's, before any run.
    names = {0: 'NVIDIA H200'}
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'get_device_name',
                        lambda device=None: names[getattr(device, 'index', None) or 0])
    assert gpu_train.training_device('auto') == gpu_train.training_device('cuda:0') == names[0]
    assert gpu_train.training_device(' CPU') == 'cpu'
    with pytest.raises(SystemExit, match="train: device 'cuda:1' requested but only 1 CUDA"):
        gpu_train.training_device('cuda:1')
    with pytest.raises(SystemExit, match="train: unknown device 'gpu'"):
        gpu_train.training_device('gpu')


def test_a_run_that_ended_its_fitted_schedule_has_finished(tmp_path, gpu_train):
    recipe = ['--steps', '2500', '--lr', '4e-4']

    def finished(steps_done, steps):
        (tmp_path / 's4fusion_authors.json').write_text(json.dumps(
            {'training': {'steps_done': steps_done, 'steps': steps}}))
        return gpu_train.finished_run(tmp_path, recipe)

    assert finished(1000, 1000)  # fitted from 2500 to the time of its call, and done
    assert not finished(999, 1000)
    assert finished(2500, 2500) and not finished(2499, 2500)
    assert finished(2500, 3000)  # a longer run past the recipe's steps, as before


def test_the_packs_fit_what_a_device_call_brings_back(gpu_train):
    parts = -(-gpu_train.PACK_BYTES // gpu_train.PART_BYTES)
    assert parts + 1 <= gpu_train.OUT_FILES  # the parts and the summary
    assert gpu_train.PART_BYTES <= 16 * 2**20
    assert gpu_train.PACK_BYTES + 2**20 <= gpu_train.OUT_BYTES == 64 * 2**20


def test_kept_checkpoints_are_left_out_oldest_first_until_the_pack_fits(
        tmp_path, gpu_train, monkeypatch):
    # A run that kept many checkpoints packed more than a call brings back: unpack then refused
    # the parts that did not come back, the run's last weights with them.
    monkeypatch.setattr(gpu_train, 'PACK_BYTES', 100_000)  # 3 of 5 over
    run = tmp_path / 'runs' / 'authors'
    (run / 'checkpoints-earlier' / 'start1').mkdir(parents=True)
    (run / 'checkpoints').mkdir()
    files = [run / 'checkpoints-earlier' / 'start1' / 's4fusion_authors-step000500.safetensors',
             *(run / 'checkpoints' / f's4fusion_authors-step{step:06d}.safetensors'
               for step in (100, 200, 300, 400))]
    for age, weights in enumerate(reversed(files)):
        for path in (weights, weights.with_suffix('.json')):
            path.write_bytes(bytes(20_000 if path.suffix == '.safetensors' else 1000))
            os.utime(path, (1e9 - age, 1e9 - age))
    (run / 's4fusion_authors.safetensors').write_bytes(bytes(30_000))
    (run / 's4fusion_authors.json').write_text('{}')
    summary = {'recipes': {}}
    gpu_train.pack(tmp_path / 'runs', tmp_path / 'out', summary, max_state_mib=1)
    left_out = [str(path.relative_to(tmp_path / 'runs')) for weights in files[:3]
                for path in (weights, weights.with_suffix('.json'))]
    assert summary['left_out'] == sorted(left_out)
    brought_back = [tmp_path / 'out' / name for name in summary['parts']]
    assert sum(path.stat().st_size for path in brought_back) <= 100_000
    gpu_train.unpack(gpu_train.build_parser().parse_args(
        ['unpack', str(tmp_path / 'out'), '--runs', str(tmp_path / 'back'), '--travel-mib', '0']))
    back = tmp_path / 'back' / 'authors'
    assert (back / 's4fusion_authors.safetensors').stat().st_size == 30_000
    assert sorted(p.name for p in (back / 'checkpoints').iterdir()) == sorted(
        path.name for weights in files[3:] for path in (weights, weights.with_suffix('.json')))
    assert not list(back.glob('checkpoints-earlier/*/*'))

    # Weights that do not fit even alone: the call says so and keeps the pack it had.
    (run / 's4fusion_authors.safetensors').write_bytes(bytes(130_000))
    with pytest.raises(SystemExit, match='over the 0.1 MiB a device call brings back'):
        gpu_train.pack(tmp_path / 'runs', tmp_path / 'out', {'recipes': {}}, max_state_mib=1)
    kept = json.loads((tmp_path / 'out' / 'gpu_train_summary.json').read_text())
    assert kept['parts'] == summary['parts'] and all(path.exists() for path in brought_back)
