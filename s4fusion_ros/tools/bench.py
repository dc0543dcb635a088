"""Benchmarks (console entry ``s4fusion-bench``).

``s4fusion-bench scan`` times the selective-scan implementations side by side in one process:
the numba kernel, the chunked PyTorch scan, a plain per-position PyTorch loop and mamba-ssm's
``selective_scan_ref`` formulation, and says whether the speed targets are met.
"""

import argparse
import functools
import math
import os
import statistics
import time

import torch

from s4fusion_ros.model.scan import (numba_scan_fn, selective_scan, selective_scan_chunked,
                                     selective_scan_ref, selective_scan_sequential)

# Targets from the scan issue.
NUMBA_MAX_NS = 1.0
CHUNKED_VS_LOOP = 3.0
CHUNKED_VS_REF = 8.0


def median_seconds(fn, repeats, warmup=1):
    """Median wall time of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
          f'warm-up; {torch.get_num_threads()} threads (torch and numba); load average before '
          f'the run {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs')
    if os.getloadavg()[0] > os.cpu_count() / 2:
        print('other processes are using the CPUs: timings are inflated, most of all those of '
              'the chunked scan (many short parallel regions); --threads 1 is steadier')
    print(f'{"implementation":<20}{"L timed":>9}{"ms":>11}{"ns/elem":>10}')
    ns = {}
    with torch.no_grad():
        for name, fn, (tensors, kwargs) in runs:
            length = tensors[0].shape[-1]
            seconds = median_seconds(lambda: fn(*tensors, **kwargs), args.repeats)
            ns[name] = seconds * 1e9 / (args.batch * args.d * length * args.nstate)
            print(f'{name:<20}{length:>9}{seconds * 1e3:>11.1f}{ns[name]:>10.2f}')
    if short_length < args.length:
        print(f'(the plain loop and selective_scan_ref are timed at L={short_length}; their cost '
              f'per element does not depend on L)')
    if first_call is not None:
        print(f'numba first call (compile, or load from cache): {first_call:.2f} s')

    checks = [('chunked vs plain loop', ns['plain torch loop'] / ns['chunked torch'],
               CHUNKED_VS_LOOP),
              ('chunked vs selective_scan_ref', ns['selective_scan_ref'] / ns['chunked torch'],
               CHUNKED_VS_REF)]
    for name, ratio, target in checks:
        print(f'{name}: {ratio:.1f}x (target >= {target:g}x): '
              f'{"met" if ratio >= target else "NOT met"}')
    if 'numba' in ns:
        print(f'numba: {ns["numba"]:.2f} ns/elem (target <= {NUMBA_MAX_NS:g}): '
              f'{"met" if ns["numba"] <= NUMBA_MAX_NS else "NOT met"}; '
              f'{ns["chunked torch"] / ns["numba"]:.0f}x faster than the chunked scan')
    else:
        print('numba: not installed')


def build_parser():
    """The ``s4fusion-bench`` command line, one subcommand per benchmark."""
    parser = argparse.ArgumentParser(prog='s4fusion-bench', description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)
    scan = commands.add_parser('scan', help='selective-scan implementations side by side')
    scan.add_argument('--batch', type=int, default=1)
    scan.add_argument('--d', type=int, default=128, help='channels')
    scan.add_argument('--length', '-L', type=int, default=16384, help='sequence length')
    scan.add_argument('--nstate', '-N', type=int, default=16, help='state size')
    scan.add_argument('--groups', type=int, default=1, help='B/C groups (must divide d)')
    scan.add_argument('--slow-length', type=int, default=1024,
                      help='L for the plain loop and selective_scan_ref (slow at full L)')
    scan.add_argument('--repeats', type=int, default=5)
    scan.add_argument('--threads', type=int, default=0,
                      help='threads for torch and numba (default: torch\'s)')
    scan.set_defaults(func=bench_scan)
    return parser


def main(argv=None):
    """Entry point of ``s4fusion-bench``."""
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == '__main__':
    main()
