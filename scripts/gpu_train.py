#!/usr/bin/env python3
"""Turn one lent GPU call into trained weights: build mamba-ssm, check it, train, pack the runs.

Three steps, each a subcommand:

  pack-data   (here)      the training split of an ivif data folder as luminance images in one
                          folder per dataset (small enough to travel with a device call)
  train       (device)    optionally build mamba-ssm from a carried sdist for this GPU only
                          (or take an earlier call's build) and check its scan against the
                          project's in seconds (else the fastest scan there is), then train each
                          recipe within the time budget, resuming a run found in --runs, and
                          pack checkpoints and logs under --out
  unpack      (here)      put what a call brought back into --runs for the next call

Runs are resumable across calls: a recipe's train_state.pt continues (`s4fusion-train --resume`),
and a run whose state could not travel starts again from its last weights, kept in its ``init/``.
The packed parts are at most 15 MiB each so that they come back from a device call; they are
written after each recipe, so a call cut short still brings back what it finished.
Usage (docs/training.md, "Training on a lent GPU in one call"):
  python3 scripts/gpu_train.py pack-data --data IVIF_DIR --to .gpu/data
  python3 scripts/gpu_train.py train --data .gpu/data --runs .gpu/runs --out "$OUT" --minutes 9
  python3 scripts/gpu_train.py unpack FOLDER_BROUGHT_BACK --runs .gpu/runs
"""

import argparse
import collections
import contextlib
import hashlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# What a device call brings back from $OUT: at most 8 files of at most 16 MiB, 64 MiB in all.
OUT_FILES, OUT_BYTES = 8, 64 * 2**20
PART_BYTES = 15 * 2**20
PACK_BYTES = OUT_BYTES - 2**20  # the runs' archive; a MiB for the summary beside its parts
PART_PREFIX = 'runs.tar.part-'
SUMMARY = 'gpu_train_summary.json'
STATE = 'train_state.pt'
INIT = 'init'  # in a run folder: the weights a restarted run began from
KEPT = 'checkpoints'  # in a run folder: the weights s4fusion-train --keep-every kept
EARLIER = 'checkpoints-earlier'  # ... and those of its earlier starts, start1/, start2/, ...
PACKED_JPEG_QUALITY = 95  # pack-data's luminance JPEGs (docstring of pack_data)
STOP_GRACE_S = 60  # a training run past its time limit gets this long to checkpoint on SIGTERM
MIN_STOP_GRACE_S = 5  # ... and never less (a checkpoint takes about a second on a GPU)
TRAVEL_MIB = 64  # what travels with a device call: the working tree and the carried paths
# A device call's command is ended after this long, its training and packing with it: whatever
# is not under $OUT by then does not come back.
CALL_MINUTES = 10.0
RESUME_MISMATCH = 'resume needs the same'  # s4fusion-train refusing a state of other settings
# s4fusion-train refusing --init-weights of another network configuration than the recipe's
INIT_MISMATCH = 'its configuration differs from the one being trained'
# What a call can train, in order, and its share of the time left for training (one H200,
# mamba-ssm: authors 8.5-10 steps/s, compact 11-14; docs/training-history.md, "A second GPU
# call"). authors: the kind of run that improved it in both GPU calls (distillation from the
# shipped compact preset with the teacher term alone, from the shipped authors weights), comparing
# the teacher's edges by their signed components (they moved VIF and Qabf, the preset's gap to the
# pyramid, faster than magnitudes), its schedule sized to end within one 9-minute call after the
# 2-minute build. compact: the CPU default from scratch on the plain Laplacian base, gain and
# stretch set afterwards, as its shipped weights were trained; tried in the second call, it scored
# below the shipped CPU weights at every gain and stretch, as the first call's run with them in
# place did, so it trains only when named in --recipes.
SHIPPED = REPO / 's4fusion_ros' / 'weights'
RECIPES = {
    'compact': (0.5, ['--preset', 'compact', '--steps', '2000', '--batch-size', '32',
                      '--crop', '133', '--grad-weight', '16', '--dataset-balance', '0',
                      '--detail-gain', '1', '--base-contrast', '1']),
    'authors': (0.5, ['--preset', 'authors', '--steps', '2500', '--batch-size', '16',
                      '--crop', '145', '--lr', '4e-4', '--ssim-weight', '0',
                      '--l1-weight', '0', '--grad-weight', '0',
                      '--dataset-balance', '0', '--weights-dtype', 'int8',
                      '--init-weights', str(SHIPPED / 's4fusion_authors.safetensors'),
                      '--teacher', str(SHIPPED / 's4fusion_compact.safetensors'),
                      '--teacher-weight', '32', '--teacher-edges', 'components']),
}
DEFAULT_RECIPES = ['authors']


def log(message):
    # Its reader may be gone (the device call ended): the packing after it must still happen.
    with contextlib.suppress(OSError):
        print(f'[gpu_train {time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def pack_data(args):
    """Write the training split's luminance as one folder per dataset:
    ``TO/<dataset>-train/{ir,vi}``, ``<dataset>`` its path under DATA with '-' for '/'.

    The suffix keeps the packed folder from reading as the ivif layout (``training_pairs``
    refuses a folder with two or more of the ivif datasets' names but without their test-split
    file, which the packed training split lacks).
    Luminance only (what training reads), 8-bit as JPEG at quality 95: PNG would take 77 MiB
    and the files that travel with a device call are limited to 64 MiB; the validation and test
    pairs stay behind.
    """
    sys.path.insert(0, str(REPO))
    import cv2
    from s4fusion_ros.imaging.color import as_uint8
    from s4fusion_ros.training.data import (PACKED_FOLDER_SUFFIX, PACKED_IVIF_MARKER, data_layout,
                                            read_pair_images, shared_stems, training_pairs)

    if args.to.exists() and any(args.to.iterdir()):
        # Packed datasets or a marker left from another source would train and be recorded.
        raise SystemExit(f'{args.to}: not empty; remove it, or pack into a new folder')
    pairs = training_pairs(args.data)
    stills = collections.defaultdict(list)
    for pair in pairs:
        if pair.frame is None:
            stills[pair.dataset].append(pair)
    for dataset, found in stills.items():
        # Packed by stem: a.png and a.jpg would be one file, the later pair in the earlier's place.
        if shared := shared_stems(found):
            stem, names = next(iter(shared.items()))
            raise SystemExit(f'{dataset}: the pairs {", ".join(names)} would be packed as one '
                             f'file, {stem}.jpg: rename them apart')
    if data_layout(args.data) == 'ivif':  # the weights trained on the copy record its data
        args.to.mkdir(parents=True, exist_ok=True)
        (args.to / PACKED_IVIF_MARKER).write_text(
            f'packed by scripts/gpu_train.py pack-data: luminance, JPEG quality '
            f'{PACKED_JPEG_QUALITY}\n')
    jpeg_quality = [cv2.IMWRITE_JPEG_QUALITY, PACKED_JPEG_QUALITY]
    for pair, images in zip(pairs, read_pair_images(pairs)):
        # A video frame's name (<clip>_<frame>) has no extension to drop, whatever its dots.
        name = (pair.name if pair.frame is not None else pathlib.Path(pair.name).stem) + '.jpg'
        dataset = '-'.join(pair.dataset.relative_to(args.data).parts) or pair.dataset.name
        for side, image in zip(('ir', 'vi'), images):
            folder = args.to / f'{dataset}{PACKED_FOLDER_SUFFIX}' / side
            folder.mkdir(parents=True, exist_ok=True)
            # JPEG holds 8 bits: OpenCV's encoder would saturate a 16-bit image to white.
            if not cv2.imwrite(str(folder / name), as_uint8(image), jpeg_quality):
                raise OSError(f'{folder / name}: cannot write')
    size = sum(p.stat().st_size for p in args.to.rglob('*') if p.is_file())
    log(f'{len(pairs)} training pairs in {args.to} ({size / 2**20:.1f} MiB)')


def prepare_mamba(args):
    """(mamba-ssm's folder for the runs' PYTHONPATH or None, what the summary says of it): built
    from --mamba-sdist, or an earlier call's --mamba-site, and checked; anything about it that
    raises leaves the runs to the chunked scan."""
    if not (args.mamba_sdist or args.mamba_site):
        return None, 'not given'
    import torch  # only here: a CPU call without mamba-ssm starts its recipe seconds sooner

    if args.mamba_site is None and not torch.cuda.is_available():
        # Not a failure: a CPU call (--device cpu) has nothing to build for.
        log('no CUDA device: mamba-ssm is not built')
        return None, 'not built: no CUDA device'
    try:
        site = args.mamba_site or build_mamba(args.mamba_sdist, args.build_minutes)
        if site is not None and not check_scan(site):
            site = None
    except Exception as error:  # noqa: BLE001 - the call's training must not depend on it
        log(f'mamba-ssm: {error!r}')
        site = None
    return site, 'used' if site else 'failed: its build or check (see the log)'


def build_mamba(sdist, minutes):
    """Build mamba-ssm from ``sdist`` for this GPU's architecture only, into a folder put on
    PYTHONPATH; returns that folder, or None where the build fails.

    Its setup.py compiles for every architecture from sm_75 on (about 3 minutes for one on 16
    cores, many more for all), so the architecture list is cut down to this GPU's.
    """
    import torch

    major, minor = torch.cuda.get_device_capability()
    work = pathlib.Path('/tmp/mamba-build')
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        archive.extractall(work, filter='data')
    (source,) = [p.parent for p in work.glob('*/setup.py')]
    setup = source / 'setup.py'
    text = setup.read_text()
    arch = f'"-gencode", "arch=compute_{major}{minor},code=sm_{major}{minor}"'
    # One cc_flag list for this GPU instead of the appended list for every architecture.
    marker = 'cc_flag = []'
    if marker not in text:
        log(f'{setup}: no "{marker}" to patch; building for every architecture')
    else:
        text = text.replace(marker, f'cc_flag = [{arch}]\n    _all_archs = []', 1)
        text = text.replace('cc_flag.append(', '_all_archs.append(')
        setup.write_text(text)
    target = pathlib.Path('/tmp/mamba-site')
    env = {**os.environ, 'MAMBA_FORCE_BUILD': 'TRUE', 'MAX_JOBS': str(os.cpu_count() or 4)}
    returncode, stderr = install_into(source, target, env, 60 * minutes)
    if returncode != 0:
        log(f'mamba-ssm build failed (exit {returncode}): {stderr[-800:]}')
        return None
    return target


def install_into(source, target, env, timeout):
    """pip-install the source folder ``source`` (built here, offline, without its
    dependencies) into ``target``, replacing what it held; (exit code, stderr) as run_group."""
    # pip --target keeps what the folder already holds (an earlier call's build) and drops
    # what it built, with a warning and exit 0.
    shutil.rmtree(target, ignore_errors=True)
    command = [sys.executable, '-m', 'pip', 'install', '--no-build-isolation', '--no-deps',
               '--no-index', '--target', str(target), str(source)]
    return run_group(command, env, timeout, stop_grace=0)


def run_group(command, env, timeout, stop_grace):
    """Run ``command`` in its own process group; returns (exit code, stderr). Past ``timeout``
    seconds the group gets SIGTERM (a training run checkpoints on it) and ``stop_grace`` seconds
    more, then SIGKILL, so that a build's compilers or a run's workers cannot outlive it."""
    try:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
    except OSError as error:  # recorded like a failed run, so the packs go on
        return -1, f'could not start {command[0]}: {error}'
    # (the signal to send, how long to wait for the group to end after it)
    stages = [(None, timeout)]
    if stop_grace:
        stages.append((signal.SIGTERM, stop_grace))
    stages.append((signal.SIGKILL, None))
    for number, wait in stages:
        if number is not None:
            signal_group(process, number)
        try:
            stderr = process.communicate(timeout=wait)[1]
            return process.returncode, stderr
        except subprocess.TimeoutExpired:
            if number is None:
                log(f'{" ".join(command[:4])} ... ran past {timeout:.0f} s: stopping it')
        except KeyboardInterrupt:  # this script was stopped: its own session's group with it
            stop_group(process, stop_grace)
            raise


def stop_group(process, stop_grace):
    """SIGTERM to the group (a training run checkpoints on it), ``stop_grace`` seconds for it to
    end, then SIGKILL: in a session of its own, it would otherwise outlive the call."""
    if stop_grace:
        signal_group(process, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=stop_grace)
            return
    signal_group(process, signal.SIGKILL)
    process.communicate()


def signal_group(process, number):
    try:
        os.killpg(process.pid, number)
    except ProcessLookupError:  # the group has ended
        pass


# Run by check_scan in a process of its own: ``backend`` against the chunked PyTorch scan on
# ``device`` (argv), forward and backward, on inputs shaped and passed as SS2D passes them (B and
# C in 4 groups, D and a dt bias, softplus, float32): training runs the backward kernel too.
SCAN_CHECK = '''
import sys
import torch
from s4fusion_ros.model.scan import selective_scan
device, backend = sys.argv[1:3]
g = torch.Generator(device=device).manual_seed(0)


def randn(*shape, scale=1.0):
    return scale * torch.randn(*shape, device=device, generator=g)


inputs = [randn(2, 64, 500), randn(2, 64, 500, scale=0.5),
          -(torch.rand(64, 8, device=device, generator=g) + 0.5), randn(2, 4, 8, 500),
          randn(2, 4, 8, 500), randn(64), randn(64, scale=0.1)]
weight = randn(2, 64, 500)
results = []
for name in (backend, 'torch'):
    leaves = [t.clone().requires_grad_() for t in inputs]
    u, delta, A, B, C, D, bias = leaves
    y = selective_scan(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True, backend=name)
    (y * weight).sum().backward()
    results.append([y.detach()] + [t.grad for t in leaves])
errors = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*results)]
print('largest error of y, then of the gradients of u, delta, A, B, C, D, delta_bias, relative '
      'to the largest value:', ' '.join(f'{error:.1e}' for error in errors))
assert errors[0] < 1e-4 and max(errors[1:]) < 1e-3
'''


def check_scan(site, device='cuda', backend='mamba'):
    """Compare mamba-ssm's kernel (``backend``) with the chunked PyTorch scan on the GPU
    (``device``), forward and backward, in a fresh process with ``site`` on its path; True when
    it is importable and agrees."""
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [
        str(REPO), str(site or ''), os.environ.get('PYTHONPATH', '')]))}
    result = subprocess.run([sys.executable, '-c', SCAN_CHECK, device, backend], env=env,
                            capture_output=True, text=True, timeout=120)
    name = 'mamba-ssm' if backend == 'mamba' else backend
    log(f'{name} scan check: {"passed" if result.returncode == 0 else "failed"} '
        f'{(result.stdout + result.stderr).strip()[-300:]}')
    return result.returncode == 0


def training_device(device):
    """The name of the device the recipes train on (``--device``); SystemExit without CUDA
    unless the CPU is asked for by name: a call's minutes on a CPU train next to nothing."""
    if device.strip().lower() == 'cpu':  # as s4fusion-train reads it
        return 'cpu'
    import torch
    sys.path.insert(0, str(REPO))
    from s4fusion_ros.runtime import DeviceError, resolve_device

    if not torch.cuda.is_available():
        raise SystemExit(f'train: no CUDA device (torch {torch.__version__}, CUDA '
                         f'{torch.version.cuda}): not training on the CPU; pass --device cpu to '
                         f'train there all the same')
    try:  # s4fusion-train's reading of it: a device it would refuse stops the call here
        return torch.cuda.get_device_name(resolve_device(device))
    except DeviceError as error:
        raise SystemExit(f'train: {error}') from None


def train(args):
    """Build and check mamba-ssm (optional), train the recipes in the budget, pack the runs
    after each recipe."""
    started = time.monotonic()
    minutes = call_budget(args.minutes, args.pack_minutes, args.call_minutes)
    if minutes != args.minutes:
        log(f'WARNING: --minutes {args.minutes:g} and --pack-minutes {args.pack_minutes:g} '
            f'pass the {args.call_minutes:g} minutes the call runs (--call-minutes), which would '
            f'end it before the runs are packed: nothing would come back; training in '
            f'{minutes:g} minutes instead')
        args.minutes = minutes
    deadline = started + 60 * args.minutes
    device = training_device(args.device)
    log(f'training on {device}')
    # Each recipe's summary names the scan its run recorded using (its weights' JSON).
    summary = {'recipes': {}, 'device': device}
    site, summary['mamba_ssm'] = prepare_mamba(args)
    if device != 'cpu' and site is None:
        summary['warning'] = (f'mamba-ssm {summary["mamba_ssm"]}: training with the chunked '
                              f'PyTorch scan, several times slower, so each new run\'s schedule '
                              f'is fitted to fewer steps')
        log(f'WARNING: {summary["warning"]}')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [
        str(REPO), str(site or ''), os.environ.get('PYTHONPATH', '')]))}
    args.runs.mkdir(parents=True, exist_ok=True)
    try:
        train_recipes(args, started, deadline, summary, env)
    except KeyboardInterrupt:  # stopped from outside (SIGTERM too): bring back what was saved
        log('stopped: packing what the recipes saved')
        summary['stopped'] = True
        summary['seconds'] = round(time.monotonic() - started, 1)
        pack(args.runs, args.out, summary, args.max_state_mib)
        raise


def call_budget(minutes, pack_minutes, call_minutes):
    """The whole call's budget (``--minutes``) cut to end within a device call of
    ``call_minutes`` (0: no limit): the last run is stopped at the budget's end and killed half
    the packing margin later, then packed, so the budget and the margin must fit the call."""
    if call_minutes and minutes + pack_minutes > call_minutes:
        return max(0.0, call_minutes - pack_minutes)
    return minutes


def train_recipes(args, started, deadline, summary, env):
    """Train the recipes in turn, each in its share of the time left (the call began at the
    monotonic `started`), packing after each."""
    recipes = list(args.recipes)
    for name in recipes:
        # Resumed with its state and the same settings, it trains no step. Without its state (the
        # authors' never travels), or with other settings, it starts over from its own weights,
        # a new schedule: trained again all the same, since the recipe may have changed since,
        # which only the session knows.
        if finished_run(args.runs / name, [*RECIPES[name][1], *args.extra]):
            log(f'{name}: WARNING: its run finished its schedule in an earlier call; without its '
                f'training state, or with other settings, it is trained again from its weights; '
                f'pass --recipes without it to keep it as it is')
    for index, name in enumerate(recipes):
        share = RECIPES[name][0]
        # This recipe's share of the training time still left, keeping a margin to pack.
        left = deadline - time.monotonic() - 60 * args.pack_minutes
        shares = sum(RECIPES[n][0] for n in recipes[index:])
        minutes = max(0.0, left * share / shares / 60)
        if minutes <= 0:
            log(f'{name}: no time left')
            summary['recipes'][name] = {'skipped': 'no time left'}
            pack(args.runs, args.out, summary, args.max_state_mib)
            continue
        out = args.runs / name
        begun = time.monotonic()
        returncode, stderr, log_before = train_recipe(args, name, out, minutes, deadline, env)
        attempts, restarts = [stderr], []
        # The recipe changed since the run in `out`: settings, then perhaps the network too.
        for _ in range(2):
            minutes_left = minutes - (time.monotonic() - begun) / 60
            if returncode == 0 or minutes_left <= 0.5:
                break
            if RESUME_MISMATCH in stderr:  # its weights still carry the run
                log(f'{name}: its state is from other settings; starting again from its weights')
                (out / STATE).unlink()
                restarts.append('from its weights')
            elif INIT_MISMATCH in stderr and str(out / INIT) in stderr:
                # The run's own weights cannot start this network (a recipe's own mismatching
                # --init-weights is a failure to report, not a reason to drop the run).
                log(f'{name}: its weights are of another network configuration; starting a new '
                    f'run')
                shutil.rmtree(out, ignore_errors=True)
                restarts.append('new run')
            else:
                break
            returncode, stderr, log_before = train_recipe(args, name, out, minutes_left,
                                                          deadline, env)
            attempts.append(stderr)
        out.mkdir(parents=True, exist_ok=True)
        (out / 'train_stderr.log').write_text('\n'.join(attempts))
        summary['recipes'][name] = recipe_summary(out, returncode, time.monotonic() - begun,
                                                  log_before)
        if restarts:
            summary['recipes'][name]['restarted'] = restarts
        log(f'{name}: {summary["recipes"][name]}')
        if returncode != 0:  # why, in the call's own output too (not only in the packed runs)
            log(f'{name}: s4fusion-train exited {returncode}; the end of its output:\n'
                + '\n'.join(stderr.strip().splitlines()[-15:]))
        summary['seconds'] = round(time.monotonic() - started, 1)
        pack(args.runs, args.out, summary, args.max_state_mib)


def option_value(arguments, option):
    """The value of ``option`` in s4fusion-train ``arguments`` (the last wins, as there), or
    None."""
    values = [value for argument, value in zip(arguments, arguments[1:]) if argument == option]
    return values[-1] if values else None


def finished_run(out, arguments):
    """Whether the run in ``out`` did the whole schedule of its s4fusion-train ``arguments``,
    or its own shorter one (fitted to its time), as its weights' JSON says."""
    try:
        steps = int(option_value(arguments, '--steps'))
    except (TypeError, ValueError):  # no --steps, or a bad one: s4fusion-train's to refuse
        return False
    training = run_training(out)
    with contextlib.suppress(KeyError, TypeError):
        return training['steps_done'] >= min(steps, training['steps'])
    return False


def run_training(out):
    """The training record in the JSON of the run's weights in ``out`` ({} where there is none
    or it cannot be read)."""
    for path in out.glob('s4fusion_*.json'):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return json.loads(path.read_text())['training']
    return {}


def run_seed(init_weights):
    """The seed of a run from ``init_weights`` (None: from scratch): from the weights' sha256,
    so that each call's run, which starts from the last one's weights, draws its own batches,
    and a resumed run, which starts from the same weights, keeps its seed (0 from scratch)."""
    if init_weights is None or not pathlib.Path(init_weights).is_file():
        return 0  # a missing file is s4fusion-train's to name
    return int(hashlib.sha256(pathlib.Path(init_weights).read_bytes()).hexdigest()[:8], 16)


def train_recipe(args, name, out, minutes, deadline, env):
    """Run s4fusion-train for a recipe in ``out``: resumed, restarted from its last weights, or
    new; stopped past its time (see run_group). Returns (exit code, stderr, the log records the
    run had before it)."""
    if (out / STATE).exists():
        how = 'resuming'
    elif list(out.glob('s4fusion_*.safetensors')):
        how = 'from the last weights'
        restart_from_weights(out)
    else:
        how = 'new run'
    # A run restarted from weights began from its init/ copy (this one wins over the recipe's
    # --init-weights); a later call resumes it so.
    init = [arg for weights in out.glob(f'{INIT}/s4fusion_*.safetensors')
            for arg in ('--init-weights', str(weights))]
    seed = run_seed(option_value([*RECIPES[name][1], *args.extra, *init], '--init-weights'))
    # s4fusion-train's entry point, which sets up the process before torch loads; a --seed in
    # args.extra wins over the run's own.
    command = [sys.executable, '-c',
               'import sys; from s4fusion_ros.entry_points import train; sys.exit(train())',
               *RECIPES[name][1], '--seed', str(seed), *args.extra,
               '--data', str(args.data), '--out', str(out), '--device', args.device,
               '--time-limit', f'{minutes:.3f}', '--fit-schedule', '--no-progress',
               '--checkpoint-every', '100', *(['--resume'] if how == 'resuming' else []), *init]
    log(f'{name}: {minutes:.1f} min, {how}')
    log_before = log_records(out)
    timeout, grace = stop_times(minutes, deadline - time.monotonic(), args.pack_minutes)
    return (*run_group(command, env, timeout, grace), log_before)


def stop_times(minutes, left_s, pack_minutes):
    """(seconds until SIGTERM, seconds from it to SIGKILL) for a run of ``minutes`` with
    ``left_s`` to the call's deadline: SIGTERM past its own time limit and, for the last
    recipe, at the deadline; SIGKILL in time to leave half the packing margin to pack what it
    saved, so that a run that hangs on SIGTERM is not still running when the device ends the
    call (its 600 s limit, which the deadline and the margin stay under)."""
    timeout = min(60 * minutes + STOP_GRACE_S, max(left_s, 60 * minutes))
    grace = min(STOP_GRACE_S, left_s + 30 * pack_minutes - timeout)
    return timeout, max(MIN_STOP_GRACE_S, grace)


def restart_from_weights(out):
    """A run whose training state stayed behind (too large to travel) starts again in ``out``
    from its last weights, which go to ``out/init/`` (the new weights' JSON records them). The
    weights that run kept go to ``checkpoints-earlier/start<N>/``, beside those of the starts
    before (the new run keeps its own steps anew in ``checkpoints/``)."""
    (weights,) = out.glob('s4fusion_*.safetensors')
    staging = out.with_name(out.name + '.restart')
    shutil.rmtree(staging, ignore_errors=True)
    (staging / INIT).mkdir(parents=True)
    for path in (weights, weights.with_suffix('.json')):
        if path.exists():  # a killed run can leave weights without their JSON: that run fails
            os.replace(path, staging / INIT / path.name)
    if (out / EARLIER).is_dir():
        os.replace(out / EARLIER, staging / EARLIER)
    if (out / KEPT).is_dir():
        starts = len(list((staging / EARLIER).glob('start*')))
        (staging / EARLIER).mkdir(exist_ok=True)
        os.replace(out / KEPT, staging / EARLIER / f'start{starts + 1}')
    shutil.rmtree(out)
    os.replace(staging, out)


def log_records(out):
    """The run's log lines up to the first torn one (a killed run can leave one; training
    drops it and what follows when it resumes)."""
    path = out / 'train_log.jsonl'
    records = []
    for line in path.read_text(errors='replace').splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def recipe_summary(out, returncode, seconds, log_before):
    """Exit code, steps done and steps per second of a recipe's run in this call, and what its
    weights' JSON says of the seed, the scan and a schedule fitted to the time."""
    training = run_training(out)
    steps = log_records(out)
    # This call's steps follow the lines it kept: a resumed run keeps those up to its checkpoint,
    # which can be fewer than the log had (the steps after it are run again).
    kept = next((i for i, (old, new) in enumerate(zip(log_before, steps)) if old != new),
                min(len(log_before), len(steps)))
    this_call = [s for s in steps[kept:] if s.get('seconds')]
    return {'returncode': returncode, 'step': steps[-1]['step'] if steps else 0,
            'seconds': round(seconds, 1),
            'steps_per_s': round(len(this_call) / max(sum(s['seconds'] for s in this_call), 1e-9),
                                 3) if this_call else 0.0,
            **{key: training[key] for key in ('seed', 'scan', 'schedule_fit') if key in training}}


def pack(runs, out, summary, max_state_mib):
    """``runs`` as a tar archive cut into parts of at most PART_BYTES under ``out``, and the
    summary beside them. Training states over ``max_state_mib`` stay out (they could not travel
    to the next call), and so do the weights the runs kept (--keep-every), oldest first, until
    the archive fits PACK_BYTES (a call brings back no more; ``unpack`` refuses a pack with parts
    missing); SystemExit where it does not fit without them. Each pack writes new parts and then
    the summary that names them, so a call cut short between two packs still brings back a
    complete earlier one."""
    out.mkdir(parents=True, exist_ok=True)
    data, left_out = fitting_archive(runs, max_state_mib)
    summary['left_out'] = sorted(str(path.relative_to(runs)) for path in left_out)
    if left_out:
        log(f'left out of the pack, over the {PACK_BYTES / 2**20:.1f} MiB a call brings back: '
            f'{", ".join(summary["left_out"])}')
    earlier = set(out.glob('*.' + PART_PREFIX + '*'))
    generation = 1 + max((int(p.name.split('.')[0]) for p in earlier), default=-1)
    names = []
    for index, start in enumerate(range(0, len(data), PART_BYTES)):
        names.append(f'{generation}.{PART_PREFIX}{index:02d}')
        (out / names[-1]).write_bytes(data[start:start + PART_BYTES])
    summary['parts'] = names
    staging = out / (SUMMARY + '.partial')
    staging.write_text(json.dumps(summary, indent=1))
    os.replace(staging, out / SUMMARY)
    for path in earlier:
        path.unlink()
    log(f'packed {len(data) / 2**20:.1f} MiB of runs into {len(names)} part(s) under {out}')


def fitting_archive(runs, max_state_mib):
    """(the runs' archive, the files left out of it): the fewest kept checkpoints, oldest
    first, left out for it to fit PACK_BYTES (found by bisection: an archive of the runs can take
    a second to make); SystemExit where it does not fit without them."""
    kept = kept_checkpoints(runs)

    def without_oldest(count):
        left_out = [path for files in kept[:count] for path in files]
        return runs_archive(runs, max_state_mib, left_out), left_out

    data, left_out = without_oldest(0)
    if len(data) <= PACK_BYTES:
        return data, left_out
    data, left_out = without_oldest(len(kept))
    if len(data) > PACK_BYTES:
        raise SystemExit(f'pack: the runs in {runs} take {len(data) / 2**20:.1f} MiB without the '
                         f'weights they kept, over the {PACK_BYTES / 2**20:.1f} MiB a device call '
                         f'brings back; nothing more is packed')
    fewest, most = 1, len(kept)  # leaving out `most` fits (data), fewer than `fewest` does not
    while fewest < most:
        middle = (fewest + most) // 2
        candidate = without_oldest(middle)
        if len(candidate[0]) <= PACK_BYTES:
            most, (data, left_out) = middle, candidate
        else:
            fewest = middle + 1
    return data, left_out


def kept_checkpoints(runs):
    """The weights the runs in ``runs`` kept (this start's and earlier starts'), each as its
    files (weights, JSON), oldest first."""
    weights = [*runs.glob(f'*/{KEPT}/*.safetensors'), *runs.glob(f'*/{EARLIER}/*/*.safetensors')]
    return [[path for path in (w, w.with_suffix('.json')) if path.exists()]
            for w in sorted(weights, key=lambda w: (w.stat().st_mtime, w.name))]


def runs_archive(runs, max_state_mib, left_out):
    """``runs`` as an uncompressed tar archive (bytes) without ``left_out``, training states
    over ``max_state_mib`` and temporary files."""
    # As the archive names its members.
    left_out = {f'runs/{path.relative_to(runs).as_posix()}' for path in left_out}

    def wanted(member):
        name = pathlib.PurePath(member.name).name
        too_large = name == STATE and member.size > max_state_mib * 2**20
        # A write cut short by SIGKILL leaves its temporary file (files.write_atomically).
        unwanted = too_large or name.endswith('.tmp') or member.name in left_out
        return None if unwanted else member

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w') as archive:
        archive.add(runs, arcname='runs', filter=wanted)
    return buffer.getvalue()


def travelling_bytes(exclude):
    """What a device call carries from this repository: the working tree's files that git does
    not ignore, and the ignored .gpu folder (carried), less ``exclude``."""
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others',
                             '--exclude-standard'], cwd=REPO, capture_output=True, check=True)
    files = {(REPO / name).resolve() for name in listed.stdout.decode().split('\0') if name}
    # A set: .gpu is listed by git too where it is not excluded as the docs say.
    files |= {p.resolve() for p in (REPO / '.gpu').rglob('*') if p.is_file()}
    exclude = exclude.resolve()
    return sum(p.stat().st_size for p in files if p.is_file() and exclude not in p.parents)


def unpack(args):
    """Join the parts a call brought back and replace ``--runs`` with the runs in them, leaving
    out training states (largest first) until what the next call carries fits TRAVEL_MIB."""
    summary = json.loads((args.folder / SUMMARY).read_text())
    parts = [args.folder / name for name in summary['parts']]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise SystemExit(f'{args.folder}: parts missing: {missing}')
    data = b''.join(p.read_bytes() for p in parts)
    staging = args.runs.with_name(args.runs.name + '.unpacking')
    shutil.rmtree(staging, ignore_errors=True)  # left by an unpack that was interrupted
    rest = travelling_bytes(exclude=args.runs) if args.travel_mib else 0
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        archive.extractall(staging, filter='data')
    runs = staging / 'runs'
    budget = (args.travel_mib - 1) * 2**20  # a MiB to spare for this call's own changes

    def size():
        return sum(p.stat().st_size for p in runs.rglob('*') if p.is_file())

    def without_state(run):
        # The next call starts the run again from its weights; only a resume needs init/.
        (run / STATE).unlink(missing_ok=True)
        shutil.rmtree(run / INIT, ignore_errors=True)

    for run in runs.iterdir():
        if not (run / STATE).exists():  # its state stayed out of the packed runs
            without_state(run)
    for state in sorted(runs.glob(f'*/{STATE}'), key=lambda p: -p.stat().st_size):
        fits = not args.travel_mib or rest + size() <= budget
        if fits and state.stat().st_size <= args.max_state_mib * 2**20:
            continue
        log(f'{state.parent.name}: state of {state.stat().st_size / 2**20:.1f} MiB left out')
        without_state(state.parent)
    if args.travel_mib and rest + size() > budget:
        log(f'warning: the next call would carry {(rest + size()) / 2**20:.1f} MiB, over the '
            f'{budget / 2**20:.0f} MiB that keep a MiB to spare under {args.travel_mib} MiB')
    shutil.rmtree(args.runs, ignore_errors=True)
    os.replace(runs, args.runs)
    staging.rmdir()
    log(f'runs of that call in {args.runs}: {json.dumps(summary["recipes"])}')
    if summary.get('left_out'):
        log(f'left out of the pack by that call (too large to come back): '
            f'{", ".join(summary["left_out"])}')


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    data = commands.add_parser('pack-data', help='the training pairs as luminance images')
    data.add_argument('--data', type=pathlib.Path, required=True, help='ivif data folder')
    data.add_argument('--to', type=pathlib.Path, required=True)
    data.set_defaults(func=pack_data)
    run = commands.add_parser('train', help='build, check, train, pack (on the device)')
    run.add_argument('--data', type=pathlib.Path, required=True,
                     help='a folder pack-data wrote (or any data s4fusion-train takes)')
    run.add_argument('--runs', type=pathlib.Path, required=True,
                     help='the runs so far (resumed where a train_state.pt exists)')
    run.add_argument('--out', type=pathlib.Path, default=os.environ.get('OUT') or None,
                     help='where the packed runs go (default: $OUT)')
    run.add_argument('--minutes', type=float, default=9.0, help='the whole call\'s budget')
    run.add_argument('--pack-minutes', type=float, default=0.5,
                     help='kept free at the end for packing')
    run.add_argument('--call-minutes', type=float, default=CALL_MINUTES,
                     help='how long the device lets the call\'s command run: --minutes is cut '
                          'so that it and --pack-minutes fit in it (0: no limit)')
    run.add_argument('--mamba-sdist', type=pathlib.Path, default=None,
                     help='mamba-ssm source archive to build for this GPU (docs/training.md: '
                          '"Training on a lent GPU in one call")')
    run.add_argument('--mamba-site', type=pathlib.Path, default=None,
                     help='instead of --mamba-sdist: the build an earlier call left on this '
                          'machine (/tmp/mamba-site), checked and used without building')
    run.add_argument('--build-minutes', type=float, default=4.0)
    run.add_argument('--recipes', nargs='+', default=DEFAULT_RECIPES, choices=list(RECIPES),
                     help='in this order (default: %(default)s; compact was tried and not '
                          'shipped: docs/training-history.md)')
    run.add_argument('--device', default='auto')
    run.add_argument('--max-state-mib', type=float, default=20.0,
                     help='leave training states larger than this out of the packed runs (they '
                          'cannot travel beside the data)')
    run.add_argument('extra', nargs='*',
                     help='after --: more s4fusion-train arguments for every recipe (later '
                          'ones win)')
    run.set_defaults(func=train)
    back = commands.add_parser('unpack', help='the runs a call brought back, into --runs')
    back.add_argument('folder', type=pathlib.Path, help='the folder holding the parts')
    back.add_argument('--runs', type=pathlib.Path, required=True)
    back.add_argument('--max-state-mib', type=float, default=20.0,
                      help='leave out training states larger than this (they cannot travel '
                           'beside the data); their runs continue from their weights')
    back.add_argument('--travel-mib', type=float, default=TRAVEL_MIB,
                      help='leave out more states, largest first, until the working tree and '
                           '.gpu fit this (0: no limit)')
    back.set_defaults(func=unpack)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    # SIGTERM (a call stopped from outside) as Ctrl-C: the training stops with a checkpoint and
    # what was saved is packed, instead of an orphan run training on in its own session.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.default_int_handler)
    if args.command == 'train':
        if args.out is None:
            raise SystemExit('train: --out is needed where $OUT is not set')
        if args.mamba_sdist and args.mamba_site:
            raise SystemExit('train: give --mamba-sdist (build) or --mamba-site (built), '
                             'not both')
        # Found now, not after the first recipe's minutes of training.
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / '.write_probe'
        probe.write_bytes(b'')
        probe.unlink()
    try:
        args.func(args)
    except KeyboardInterrupt:
        log(f'{args.command}: interrupted')
        raise SystemExit(130) from None


if __name__ == '__main__':
    main()
