"""Compile the CPU kernels ahead into numba's cache, so that a start of the node takes seconds.

numba compiles the selective-scan kernels at their first call (15-30 s on a 2-core CPU) and caches
the result per installation (keyed by the kernel's source file) in NUMBA_CACHE_DIR, by default
~/.cache/s4fusion_ros/numba. scripts/setup.sh runs this after installing; after `colcon build`
(which installs fresh copies of the sources) run it once:

    python3 -m s4fusion_ros.precompile
"""

import argparse
import sys
import time

PRESETS = ('compact', 'authors')  # both run the CPU kernels; compact is the CPU default


def _kernels():
    """The module of the numba CPU kernels (model.scan_numba); None without numba."""
    from .model.scan import numba_cross_scan_fn
    if numba_cross_scan_fn() is None:
        return None
    from .model import scan_numba
    return scan_numba


def kernel_cache_stats() -> tuple[int, int] | None:
    """(cache hits, compilations) of the numba kernels in this process; None without numba."""
    kernels = _kernels()
    if kernels is None:
        return None
    from numba.core.dispatcher import Dispatcher
    hits = misses = 0
    for kernel in vars(kernels).values():
        if isinstance(kernel, Dispatcher):
            hits += sum(kernel.stats.cache_hits.values())
            misses += sum(kernel.stats.cache_misses.values())
    return hits, misses


def kernels_cacheable() -> bool:
    """Whether numba had a folder to cache the CPU kernels in (True without numba)."""
    kernels = _kernels()
    return kernels is None or kernels.CACHE


def unsaved_kernels() -> set[str]:
    """The CPU kernels compiled in this process whose cache could not be written (a full
    disk); none without numba."""
    kernels = _kernels()
    return set() if kernels is None else kernels.UNSAVED


def kernel_cache_folder() -> str | None:
    """The folder the CPU kernels are cached in, which numba chose (NUMBA_CACHE_DIR where it can
    write there); None without numba or where no folder could hold them."""
    kernels = _kernels()
    return None if kernels is None else kernels.cache_folder()


def describe(stats: tuple[int, int] | None) -> str:
    """Say where the CPU kernels came from, for a log line."""
    if stats is None:
        return 'numba is not installed: the slower PyTorch scan runs on the CPU'
    hits, misses = stats
    if not kernels_cacheable():
        return ('CPU kernels compiled now, in memory only: no writable folder for their cache '
                '(NUMBA_CACHE_DIR, the package folder or ~/.cache/numba), so each start '
                'compiles them')
    if unsaved := unsaved_kernels():
        return (f'CPU kernels compiled now; not cached, as the warnings above say, so compiled '
                f'again at the next start: {", ".join(sorted(unsaved))}')
    if misses:
        return ('CPU kernels compiled now and cached for the next start '
                '(python3 -m s4fusion_ros.precompile does this ahead)')
    return 'CPU kernels loaded from the cache' if hits else 'no CPU kernel used'


def precompile() -> str:
    """Run each preset once on the CPU, which compiles (or loads) the kernels; one line back."""
    from .engine import FusionEngine
    from .runtime import load_fusion_model
    started = time.perf_counter()
    for preset in PRESETS:
        FusionEngine(load_fusion_model(preset=preset, device='cpu')).warm_up()
    return f'{describe(kernel_cache_stats())}, {time.perf_counter() - started:.1f} s'


def main(argv: list[str] | None = None) -> int:
    """Console use: python3 -m s4fusion_ros.precompile."""
    # --help answers before anything compiles (a minute on a cold cache).
    argparse.ArgumentParser(prog='python3 -m s4fusion_ros.precompile', description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    from .entry_points import configure_process
    configure_process()
    said = precompile()
    folder = kernel_cache_folder()
    print(f's4fusion_ros.precompile: {said}' + (f' ({folder})' if folder else ''))
    return 0 if kernels_cacheable() and not unsaved_kernels() else 1  # not all cached ahead


if __name__ == '__main__':
    sys.exit(main())
