"""Benchmarks (console entry ``s4fusion-bench``).

``s4fusion-bench scan`` times the selective-scan implementations side by side in one process:
the numba kernel, the chunked PyTorch scan, a plain per-position PyTorch loop and mamba-ssm's
``selective_scan_ref`` formulation, and says whether the speed targets are met.

``s4fusion-bench model`` times the whole network's forward pass at camera sizes for the presets
and the node's default configuration: latency, peak memory, and the share spent in the scan.

``s4fusion-bench train`` times whole training steps (forward, loss, backward, optimizer) of each
preset at its shipped weights' training settings, with the numba scan and its backward kernel
against the chunked PyTorch scan under autograd (the trainer's path before the kernel), steps
alternating in one process.

``s4fusion-bench batch`` fuses copies of a bag with a plain s4fusion-bag loop and with
s4fusion-batch on one and on two Ray nodes, and prints pairs/s side by side.
"""

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import statistics
import sys
import time

import cv2
import torch

from s4fusion_ros.bagio import BagError
from s4fusion_ros.batch.cluster import BatchError
from s4fusion_ros.cli import parse_size, run_command, stop_on_signals
from s4fusion_ros.engine import model_input_size
from s4fusion_ros.model import S4Fusion, S4FusionConfig
from s4fusion_ros.model import blocks
from s4fusion_ros.model.scan import (mamba_scan_fn, numba_cross_scan_fn, numba_scan_fn,
                                     selective_scan, selective_scan_chunked, selective_scan_ref,
                                     selective_scan_sequential)
from s4fusion_ros.runtime import DeviceError
from s4fusion_ros.stats import process_memory_kib

PROG = 's4fusion-bench'

# Targets from the speed issues.
NUMBA_MAX_NS = 1.0
CHUNKED_VS_LOOP = 3.0
CHUNKED_VS_REF = 8.0
TRAIN_NUMBA_VS_TORCH = 3.0  # a training step with the numba backward against the chunked scan
AUTHORS_CPU_MAX_S = 3.0  # authors preset, 640x480, CPU
NODE_CPU_MIN_FPS = 1.0  # the node's CPU defaults, 640x480
GPU_MIN_FPS = 30.0  # 640x512, fp16, CUDA with mamba-ssm's kernel


def timed_rounds(fns, repeats):
    """Wall times of each of ``fns`` over ``repeats`` calls after an untimed one, the functions
    taking turns call by call, so that a change in the machine's load falls on all of them alike
    (their ratios are what the targets judge): one list of seconds per function."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, taken in zip(fns, times):
            start = time.perf_counter()
            fn()
            taken.append(time.perf_counter() - start)
    return times


def paired_ratios(slow, fast):
    """Each round's own ratio of `slow`'s time to `fast`'s (the calls of a round ran back to
    back, under the same load) and their median, the figure a ratio target is judged on."""
    rounds = [a / b for a, b in zip(slow, fast)]
    return statistics.median(rounds), rounds


def round_range(values, unit: str, digits: int) -> str:
    """' (rounds LOW-HIGHunit)': how far the rounds of a figure spread, where there are several;
    a machine shared with other work moves single rounds, the median less."""
    if len(values) < 2:
        return ''
    return f' (rounds {min(values):.{digits}f}-{max(values):.{digits}f}{unit})'


def scan_inputs(batch, d, length, nstate, groups, seed=0):
    """Inputs like a freshly initialised Mamba layer's: dt in [1e-3, 1e-1] through softplus."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.empty(d).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
    bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    tensors = (torch.randn(batch, d, length, generator=g),
               0.1 * torch.randn(batch, d, length, generator=g),
               -torch.arange(1, nstate + 1, dtype=torch.float32).repeat(d, 1),
               torch.randn(batch, groups, nstate, length, generator=g),
               torch.randn(batch, groups, nstate, length, generator=g),
               torch.ones(d))
    return tensors, dict(delta_bias=bias, delta_softplus=True)


def bench_scan(args):
    """Time the scan implementations and print ns per element (position x channel x state)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    full = scan_inputs(args.batch, args.d, args.length, args.nstate, args.groups)
    short_length = min(args.slow_length, args.length)
    short = scan_inputs(args.batch, args.d, short_length, args.nstate, args.groups)

    plain_loop = functools.partial(selective_scan_sequential, dtype=torch.float32)
    numba_kernel = functools.partial(selective_scan, backend='numba')
    runs = [('chunked torch', selective_scan_chunked, full),
            ('plain torch loop', plain_loop, short),
            ('selective_scan_ref', selective_scan_ref, short)]
    first_call = None
    if numba_scan_fn() is not None:
        tiny, tiny_kwargs = scan_inputs(1, 8, 4, 2, 1)
        start = time.perf_counter()
        numba_kernel(*tiny, **tiny_kwargs)
        first_call = time.perf_counter() - start
        runs.insert(0, ('numba', numba_kernel, full))

    print(f'selective scan, batch={args.batch} d={args.d} L={args.length} N={args.nstate} '
          f'groups={args.groups}, delta_softplus, float32; median of {args.repeats} after a '
          f'warm-up, the implementations taking turns call by call; {torch.get_num_threads()} '
          f'threads (torch and numba); {load_note()}')
    print(f'{"implementation":<20}{"L timed":>9}{"ms":>11}{"ns/elem":>10}')
    with torch.no_grad():
        rounds = timed_rounds([functools.partial(fn, *tensors, **kwargs)
                               for _, fn, (tensors, kwargs) in runs], args.repeats)
    report_scan([(name, tensors[0].shape[-1], taken)
                 for (name, _, (tensors, _)), taken in zip(runs, rounds)],
                args.length, args.batch * args.d * args.nstate, first_call)


def report_scan(timed, length, elements_per_position, first_call=None):
    """Print the scan table and the target lines from `timed`: (name, L timed, seconds of each
    round) per implementation, the rounds as timed_rounds gives them; `length`: the full L."""
    ns_rounds = {name: [seconds * 1e9 / (elements_per_position * timed_length)
                        for seconds in taken] for name, timed_length, taken in timed}
    for name, timed_length, taken in timed:
        print(f'{name:<20}{timed_length:>9}{statistics.median(taken) * 1e3:>11.1f}'
              f'{statistics.median(ns_rounds[name]):>10.2f}')
    short_length = min(timed_length for _, timed_length, _ in timed)
    if short_length < length:
        # Measured: 20-30% more per element at L=16384 than at 1024 (2 cores, d=128, N=16).
        print(f'(the plain loop and selective_scan_ref are timed at L={short_length}; their cost '
              f'per element rises with L as their data outgrows the caches, so the ratios to '
              f'them below are lower bounds)')
    if first_call is not None:
        print(f'numba first call (compile, or load from cache): {first_call:.2f} s')
    checks = [('chunked vs plain loop', 'plain torch loop', CHUNKED_VS_LOOP),
              ('chunked vs selective_scan_ref', 'selective_scan_ref', CHUNKED_VS_REF)]
    timed_at = f', the latter at L={short_length}' if short_length < length else ''
    for name, slow, target in checks:  # per element; the chunked scan's falls with L
        ratio, ratios = paired_ratios(ns_rounds[slow], ns_rounds['chunked torch'])
        print(f'{name} at L={length}{timed_at}: {ratio:.1f}x{round_range(ratios, "x", 1)} '
              f'(target >= {target:g}x): {"met" if ratio >= target else "NOT met"}')
    if 'numba' in ns_rounds:
        ns = statistics.median(ns_rounds['numba'])
        faster, _ = paired_ratios(ns_rounds['chunked torch'], ns_rounds['numba'])
        print(f'numba: {ns:.2f} ns/elem{round_range(ns_rounds["numba"], "", 2)} '
              f'(target <= {NUMBA_MAX_NS:g}): {"met" if ns <= NUMBA_MAX_NS else "NOT met"}; '
              f'{faster:.0f}x faster than the chunked scan')
    else:
        print('numba: not installed')


def load_note():
    """The load average before a run, with a warning when other processes use the CPUs."""
    load, cpus = os.getloadavg()[0], os.cpu_count()
    note = (f'load average before the run {load:.1f} on {cpus} CPUs; OMP_WAIT_POLICY '
            f'{os.environ.get("OMP_WAIT_POLICY", "unset")}')
    if load > cpus / 2:
        spin = ('' if os.environ.get('OMP_WAIT_POLICY', '').lower() == 'passive' else
                ' (many short parallel regions whose OpenMP threads spin while waiting: set '
                'OMP_WAIT_POLICY=passive)')
        note += ('\nWARNING: other processes are using the CPUs: timings are inflated, most of '
                 f'all with several threads{spin}; --threads 1 suffers least')
    return note


def _synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def scan_timer(device):
    """Time every selective-scan call of the model: yields a list that collects the seconds.

    Wraps the scan functions where blocks.py looks them up (the torch path's selective_scan and
    the CPU inference path's fused grid kernel), so the model itself is not changed. On CUDA the
    wrapper synchronises around each call, so time a separate run with it, not the latency.
    """
    seconds = []

    def timed(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _synchronize(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
            return out
        return wrapper

    names = ('selective_scan', 'cross_selective_scan')
    originals = {name: getattr(blocks, name) for name in names}
    try:
        for name, fn in originals.items():
            setattr(blocks, name, timed(fn))
        yield seconds
    finally:
        for name, fn in originals.items():
            setattr(blocks, name, fn)


def peak_memory_mib(fn, device):
    """Peak memory one call of ``fn`` adds, in MiB, or None where it cannot be measured.

    CUDA: torch.cuda.max_memory_allocated above what was allocated before (tensors only; the
    caching allocator's reserve and the CUDA context are not counted). CPU: the peak resident
    set size (VmHWM) above the resident size before the call, with freed heap memory handed
    back first (malloc_trim) and the peak reset through /proc/self/clear_refs (Linux), so
    it counts what the call itself brings into memory: activations, scan scratch, allocator
    overhead; not the weights or the code.
    """
    if device.type == 'cuda':
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c'))
        libc.malloc_trim(0)
        with open('/proc/self/clear_refs', 'w') as clear_refs:
            clear_refs.write('5')  # reset VmHWM to the current resident size
        before = process_memory_kib()['VmRSS']
    except (OSError, AttributeError, KeyError):
        return None
    fn()
    return (process_memory_kib()['VmHWM'] - before) / 1024


def scan_path_name(device, backend=None):
    """Which scan implementation the model's inference runs (``backend``: a forced one)."""
    if backend == 'torch':
        return 'the chunked PyTorch scan (forced by --scan-backend)'
    if backend == 'numba':
        # SS2D takes its fused path for a forced 'numba' as for auto (SS2D._fused_path).
        if device.type == 'cpu' and numba_cross_scan_fn() is not None:
            return ('the fused numba grid kernel (scan, dt projection, direction merge; forced '
                    'by --scan-backend, as auto picks it on the CPU)')
        return 'the numba scan, one direction at a time (forced by --scan-backend)'
    if device.type == 'cuda':
        return ("mamba-ssm's CUDA kernel" if mamba_scan_fn() is not None else
                'the chunked PyTorch scan (mamba-ssm is not installed: README, GPU)')
    if numba_cross_scan_fn() is not None:
        return 'the fused numba grid kernel (scan, dt projection, direction merge)'
    return 'the chunked PyTorch scan (numba is not installed)'


def bench_model(args):
    """Time the network's forward pass at camera sizes; print latency, memory and scan share."""
    from s4fusion_ros.engine import FusionEngine, FusionSettings
    from s4fusion_ros.runtime import LoadedModel, default_preset, resolve_device, set_threads
    from s4fusion_ros.settings import SPECS

    if args.threads:
        set_threads(args.threads)  # OpenCV's too: the step's resize, detail restore, colour
    device = resolve_device(args.device)
    half = args.half and device.type == 'cuda'
    amp = torch.float16 if half else None
    node_preset = default_preset(device)
    node_size = tuple(SPECS['inference_size'].default)  # (0, 0): full resolution
    configs = [(preset, (0, 0)) for preset in args.presets]
    if (node_preset, node_size) not in configs:
        configs.append((node_preset, node_size))
    configs.append(('compact', args.inference_size))

    print(f'S4Fusion forward, batch 1, {device} '
          f'{"float16 (autocast)" if half else "float32"}, '
          f'{torch.get_num_threads()} threads (torch and numba; OpenCV '
          f'{cv2.getNumThreads()}), random weights; median of '
          f'{args.repeats} after a warm-up; {load_note()}')
    if args.half and not half:
        print('--half is ignored on the CPU (no fp16 speed-up there; the node does the same)')
    backend = None if args.scan_backend == 'auto' else args.scan_backend
    if backend == 'mamba' and (device.type != 'cuda' or mamba_scan_fn() is None):
        raise ValueError("--scan-backend mamba needs CUDA and mamba-ssm's kernel (README, GPU); "
                         f'{device} has {"no CUDA" if device.type != "cuda" else "no mamba-ssm"}')
    print(f'scan: {scan_path_name(device, backend)}')
    header = (f'{"preset":<10}{"runs at":>10}{"params":>11}{"input":>10}{"ms":>9}{"fps":>7}'
              f'{"CPU ms":>9}{"peak MiB":>10}{"scan %":>8}{"step ms":>9}')
    print(header)
    results = {}
    models = {}
    for preset, size in configs:
        if preset not in models:
            torch.manual_seed(0)
            models[preset] = S4Fusion(S4FusionConfig.preset(preset), device=device).eval()
            models[preset].set_scan_backend(backend)
        model = models[preset]
        for width, height in args.sizes:
            run_w, run_h = model_input_size(size, width, height)  # as the node runs it
            ir, vi = (torch.rand(1, 1, run_h, run_w, device=device) for _ in range(2))

            def forward():
                model.infer(ir, vi, amp)
                _synchronize(device)

            forward()  # warm-up: numba kernels load, buffers and cuDNN plans are made
            memory = peak_memory_mib(forward, device)
            walls, cpus = [], []
            for _ in range(args.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                forward()
                walls.append(time.perf_counter() - start)
                cpus.append(time.process_time() - start_cpu)
            seconds, cpu_seconds = statistics.median(walls), statistics.median(cpus)
            with scan_timer(device) as scan_seconds:
                start = time.perf_counter()
                forward()
                total = time.perf_counter() - start
            share = 100 * sum(scan_seconds) / total
            steps = engine_step_seconds(
                FusionEngine(LoadedModel(model, device, half, preset, None, False),
                             FusionSettings(inference_size=size)), width, height, device,
                args.repeats)
            step = statistics.median(steps)
            label = f'{run_w}x{run_h}' if all(size) else 'full'
            results[preset, size, (width, height)] = steps
            name = preset + ('*' if (preset, size) == (node_preset, node_size) else '')
            print(f'{name:<10}{label:>10}{model.num_parameters():>11,}'
                  f'{f"{width}x{height}":>10}{seconds * 1e3:>9.1f}{1 / seconds:>7.2f}'
                  f'{cpu_seconds * 1e3:>9.1f}{"n/a" if memory is None else f"{memory:.0f}":>10}'
                  f'{share:>8.0f}{step * 1e3:>9.1f}')
    print('*: the node\'s default on this device. runs at: full = the input size (padded to '
          'the next 12k + 1); WxH = the input resized to it first (in ms the resize and the '
          'engine\'s detail restore are not timed, in step ms they are).\nms: median wall '
          'time; CPU ms: median CPU time of the process over the same calls (all threads, '
          'spin-waiting included).\nscan %: the '
          'scan kernels\' share of one more forward pass (on the CPU the fused kernel includes '
          'the dt projection and direction merge).\nstep ms: the node\'s whole step on a random '
          '8-bit pair of the input size (FusionEngine: resize, network, detail restore, '
          'saliency, colour), median; the targets below are judged on it.')
    print('peak MiB: ' + ('torch.cuda.max_memory_allocated above what was allocated before'
                          if device.type == 'cuda' else
                          'peak resident set (VmHWM) above the resident size before the call, '
                          'after malloc_trim: activations and scratch, not the weights'))
    report_model_targets(results, device, half, backend, node_preset, node_size)


def engine_step_seconds(engine, width: int, height: int, device, repeats: int) -> list:
    """Wall times of `repeats` of the engine's whole steps on a random 8-bit pair of `width` x
    `height`, after a warm-up."""
    generator = torch.Generator().manual_seed(0)
    thermal, visible = (torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
                        .numpy() for shape in ((height, width), (height, width, 3)))

    def step():
        engine.fuse_images(thermal, visible)
        _synchronize(device)
    return timed_rounds([step], repeats)[0]


def report_model_targets(results, device, half, backend, node_preset, node_size):
    """Say which of the model speed targets this run can judge and whether they are met
    (`results`: the step times of each preset, inference size and input size)."""
    def verdict(ok):
        return 'met' if ok else 'NOT met'

    def fps(key):
        return 1 / statistics.median(results[key]), [1 / seconds for seconds in results[key]]

    vga, gpu_size = (640, 480), (640, 512)
    if device.type == 'cpu' and backend is None:
        key = ('authors', (0, 0), vga)
        if key in results:
            seconds = statistics.median(results[key])
            print(f'authors at 640x480 on the CPU: {seconds:.2f} s'
                  f'{round_range(results[key], " s", 2)} (target <= {AUTHORS_CPU_MAX_S:g} s): '
                  f'{verdict(seconds <= AUTHORS_CPU_MAX_S)}')
        key = (node_preset, node_size, vga)
        if key in results:
            rate, rates = fps(key)
            print(f'node CPU defaults at 640x480: {rate:.2f} frames/s{round_range(rates, "", 2)} '
                  f'(target >= {NODE_CPU_MIN_FPS:g}): {verdict(rate >= NODE_CPU_MIN_FPS)}')
    key = ('authors', (0, 0), gpu_size)
    if (device.type == 'cuda' and half and backend in (None, 'mamba')
            and mamba_scan_fn() is not None and key in results):
        rate, rates = fps(key)
        print(f'authors at 640x512 fp16 on {torch.cuda.get_device_name(device)}: {rate:.1f} '
              f'frames/s{round_range(rates, "", 1)} (target >= {GPU_MIN_FPS:g}): '
              f'{verdict(rate >= GPU_MIN_FPS)}')
    else:
        print(f'GPU target (authors, 640x512, fp16, >= {GPU_MIN_FPS:g} frames/s) not judged by '
              f'this run: it needs `s4fusion-bench model --device cuda --half` on a CUDA '
              f'machine with mamba-ssm installed (README, GPU; check with '
              f'`python -c "import mamba_ssm"`)')


class SyntheticPairs:
    """Random smooth IR/VI crops with the dataset interface the trainer draws batches from.

    Timing needs no real images: the step's work depends on the batch and crop only.
    """

    def __init__(self, crop, min_gain, dataset_balance):
        self.crop, self.min_gain, self.dataset_balance = crop, min_gain, dataset_balance
        self.pairs = ()

    def sample_batch(self, batch_size, rng):
        """Two float32 (B, 1, crop, crop) tensors in [0, 1]: noise blurred to image-like edges."""
        noise = torch.from_numpy(rng.random((2 * batch_size, 1, self.crop, self.crop),
                                            dtype='float32'))
        smooth = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2)
        return smooth[:batch_size], smooth[batch_size:]


def shipped_training(preset):
    """The training record of a preset's shipped weights (batch, crop, loss, ...)."""
    from s4fusion_ros.model.checkpoint import read_config, shipped_weights

    meta, _ = read_config(shipped_weights(preset))
    return meta['training']


def bench_train(args):
    """Time training steps of each preset, numba backward against the chunked PyTorch scan."""
    import tempfile

    from s4fusion_ros.model.checkpoint import load_checkpoint, shipped_weights
    from s4fusion_ros.training.loss import S4FusionLoss
    from s4fusion_ros.training.trainer import Trainer, TrainSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    backends = ('torch', 'numba') if numba_scan_fn() is not None else ('torch',)
    sized = ' (batch and crop as given)' if args.batch_size or args.crop else ''
    print(f'S4Fusion training steps on the CPU (forward, loss, backward, AdamW), each preset at '
          f'its shipped weights\' batch, crop and loss{sized}, a distillation\'s teacher '
          f'forward included; random weights and image-like random crops; '
          f'{torch.get_num_threads()} threads; median of {args.repeats} steps per scan after a '
          f'warm-up, the scans alternating step by step; {load_note()}')
    print(f'{"preset":<9}{"batch":>6}{"crop":>6}{"torch s/step":>14}{"numba s/step":>14}'
          f'{"speed-up":>10}{"steps/s":>9}{"Mpixel/s":>10}')
    times_with_numba = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for preset in args.presets:
            record = shipped_training(preset)
            batch = args.batch_size or record['batch_size']
            crop = args.crop or record['crop']
            loss_config = record['loss']
            settings = TrainSettings(steps=1000, batch_size=batch, crop=crop,
                                     min_gain=record['min_gain'],
                                     dataset_balance=record['dataset_balance'], lr=record['lr'])
            # A distilled recipe runs its teacher (the shipped compact network) in every step.
            distilled = loss_config.get('teacher_weight', 0.0) > 0
            teacher = load_checkpoint(shipped_weights('compact')) if distilled else None
            trainers = {}
            for backend in backends:
                loss = S4FusionLoss(loss_config['ssim_weight'], loss_config['l1_weight'],
                                    loss_config['grad_weight'],
                                    max_intensity_weight=loss_config['max_intensity_weight'],
                                    teacher=teacher,
                                    teacher_weight=loss_config.get('teacher_weight', 0.0),
                                    teacher_edges=loss_config.get('teacher_edges', 'magnitude'))
                dataset = SyntheticPairs(crop, settings.min_gain, settings.dataset_balance)
                trainers[backend] = Trainer(S4FusionConfig.preset(preset), dataset, loss,
                                            out_dir, settings)
                trainers[backend].model.set_scan_backend(backend)
            steps = timed_rounds([trainers[backend].train_step for backend in backends],
                                 args.repeats)
            times = dict(zip(backends, steps))
            print(train_row(preset, batch, crop, times))
            if 'numba' in times:
                times_with_numba[preset] = times
    print('steps/s and Mpixel/s (crop pixels of the batch per second): the faster scan\'s; '
          'speed-up: the median of each step pair\'s torch/numba ratio.')
    if 'numba' in backends:
        for preset, times in times_with_numba.items():
            print(train_verdict(preset, times))
    else:
        print('numba: not installed, so training runs the chunked PyTorch scan')


def train_row(preset, batch, crop, times):
    """The table row of a preset from the seconds of its steps with each scan (`times`:
    backend to seconds per round, the backends taking turns step by step)."""
    seconds = {backend: statistics.median(taken) for backend, taken in times.items()}
    fast = min(seconds.values())
    if 'numba' in times:  # below 1 where the numba step is the slower
        speedup, _ = paired_ratios(times['torch'], times['numba'])
        numba_columns = f'{seconds["numba"]:>14.3f}{speedup:>9.1f}x'
    else:
        numba_columns = f'{"n/a":>14}{"n/a":>10}'
    return (f'{preset:<9}{batch:>6}{crop:>6}{seconds["torch"]:>14.3f}{numba_columns}'
            f'{1 / fast:>9.2f}{batch * crop * crop / fast / 1e6:>10.3f}')


def train_verdict(preset, times):
    """The target line of a preset from its steps' seconds with each scan (as train_row)."""
    speedup, rounds = paired_ratios(times['torch'], times['numba'])
    change = f'{speedup:.1f}x faster' if speedup >= 1 else f'{1 / speedup:.1f}x slower'
    return (f'{preset}: training step {change} with the numba backward'
            f'{round_range(rounds, "x", 1)} (target {TRAIN_NUMBA_VS_TORCH:g}x faster): '
            f'{"met" if speedup >= TRAIN_NUMBA_VS_TORCH else "NOT met"}')


def build_parser():
    """The ``s4fusion-bench`` command line, one subcommand per benchmark."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)
    scan = commands.add_parser('scan', help='selective-scan implementations side by side')
    scan.add_argument('--batch', type=int, default=1, help='batch (default: %(default)s)')
    scan.add_argument('--d', type=int, default=128, help='channels (default: %(default)s)')
    scan.add_argument('--length', '-L', type=int, default=16384,
                      help='sequence length (default: %(default)s)')
    scan.add_argument('--nstate', '-N', type=int, default=16,
                      help='state size (default: %(default)s)')
    scan.add_argument('--groups', type=int, default=1,
                      help='B/C groups, dividing d (default: %(default)s)')
    scan.add_argument('--slow-length', type=int, default=1024,
                      help='L for the plain loop and selective_scan_ref (slow at full L) '
                           '(default: %(default)s)')
    scan.add_argument('--repeats', type=int, default=5, help='timed runs (default: %(default)s)')
    scan.add_argument('--threads', type=int, default=0,
                      help='threads for torch and numba (default: torch\'s)')
    scan.set_defaults(func=bench_scan, minimums={'batch': 1, 'd': 1, 'length': 1, 'nstate': 1,
                                                 'groups': 1, 'slow_length': 1, 'threads': 0})

    model = commands.add_parser('model', help='the network\'s forward pass at camera sizes')
    model.add_argument('--device', default='cpu',
                       help='cpu, cuda, cuda:N or auto (default: %(default)s)')
    model.add_argument('--half', action='store_true', help='fp16 autocast (CUDA only)')
    model.add_argument('--threads', type=int, default=0,
                       help='threads for torch, numba and OpenCV (default: theirs)')
    model.add_argument('--presets', nargs='+', default=['authors', 'compact'],
                       choices=sorted(S4FusionConfig.presets()), help='(default: both)')
    model.add_argument('--sizes', nargs='+', type=parse_size,
                       default=[(320, 240), (640, 480), (640, 512)],
                       help='WIDTHxHEIGHT inputs (default: 320x240 640x480 640x512)')
    model.add_argument('--inference-size', type=parse_size, default=(320, 240),
                       help='also time compact with the node\'s inference_size set to this '
                            '(default: 320x240)')
    model.add_argument('--scan-backend', choices=('auto', 'mamba', 'numba', 'torch'),
                       default='auto',
                       help='force one scan backend (default auto: what the node runs)')
    model.add_argument('--repeats', type=int, default=5, help='timed runs (default: %(default)s)')
    model.set_defaults(func=bench_model, minimums={'threads': 0})

    train = commands.add_parser('train', help='training steps, numba backward against the '
                                              'chunked PyTorch scan')
    train.add_argument('--presets', nargs='+', default=['compact', 'authors'],
                       choices=sorted(S4FusionConfig.presets()), help='(default: both)')
    train.add_argument('--batch-size', type=int, default=0,
                       help='batch (default: the shipped weights\' training batch)')
    train.add_argument('--crop', type=int, default=0,
                       help='crop side, 12k + 1 (default: the shipped weights\' training crop)')
    train.add_argument('--threads', type=int, default=0,
                       help='threads for torch and numba (default: torch\'s)')
    train.add_argument('--repeats', type=int, default=3, help='timed steps (default: %(default)s)')
    train.set_defaults(func=bench_train, minimums={'batch_size': 0, 'crop': 0, 'threads': 0})

    from s4fusion_ros.batch.bench import add_command
    add_command(commands)
    return parser


def main(argv=None):
    """Entry point of ``s4fusion-bench``; exit status 0, 1 with one line for a bad device, bag
    or file, 2 for a bad option, 130 on Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    minimums = {'repeats': 1, **getattr(args, 'minimums', {})}
    for option, minimum in minimums.items():
        if getattr(args, option, minimum) < minimum:
            parser.error(f'--{option.replace("_", "-")} must be >= {minimum}')
    if args.command == 'train' and args.crop and (args.crop < 13 or args.crop % 12 != 1):
        parser.error(f'--crop {args.crop} must be 12k + 1 (13, 25, ..., 97, ...), or 0')
    if args.command == 'scan' and args.groups >= 1 and args.d % args.groups:
        parser.error(f'--groups {args.groups} must divide --d {args.d}')
    if getattr(args, 'threads', 0) > os.cpu_count():  # numba would cap it without a word
        parser.error(f'--threads {args.threads}: this machine has {os.cpu_count()} CPUs')
    stop_on_signals()

    def bench() -> int:
        args.func(args)
        return 0
    return run_command(PROG, bench, (DeviceError, BagError, BatchError, OSError, ValueError))


if __name__ == '__main__':  # python -m, set up by its package's __init__
    from ..entry_points import run_tool
    sys.exit(run_tool(main))
