"""Choosing the device and loading the fusion model: shared by the node and every tool."""

import contextlib
import os
import pathlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .model import CheckpointError, S4Fusion, S4FusionConfig, load_checkpoint, shipped_weights
from .settings import DEVICE_FORM


def print_warning(message: str) -> None:
    """The tools' warning line on stderr, named by the running command."""
    print(f'{os.path.basename(sys.argv[0])}: warning: {message}', file=sys.stderr)


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def set_threads(count: int) -> None:
    """Make torch, OpenCV and numba use `count` threads (a Ray task's CPUs, a tool's --threads),
    not the whole machine."""
    import cv2
    import numba
    torch.set_num_threads(count)
    cv2.setNumThreads(count)
    numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))


@contextlib.contextmanager
def threads_kept():
    """The thread counts torch, OpenCV and numba have before the block, back after it."""
    import cv2
    import numba
    before = torch.get_num_threads(), cv2.getNumThreads(), numba.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])
        numba.set_num_threads(before[2])


@contextlib.contextmanager
def cpu_threads(count: int):
    """set_threads(`count`) for the block (as a Ray task of that many CPUs gets), the counts
    torch, OpenCV and numba had back after it."""
    with threads_kept():
        set_threads(count)
        yield


def resolve_device(spec: str) -> torch.device:
    """Map the `device` parameter (auto, cpu, cuda, cuda:N) to a torch device.

    `auto` picks CUDA when present; asking explicitly for CUDA on a machine without it is an error,
    so a robot never silently runs a GPU configuration on its CPU.
    """
    spec = spec.strip().lower()
    if not DEVICE_FORM.fullmatch(spec):
        raise DeviceError(f"unknown device '{spec}': expected auto, cpu, cuda or cuda:N")
    if spec == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if spec == 'cpu':
        return torch.device('cpu')
    if not torch.cuda.is_available():  # cuda or cuda:N from here
        raise DeviceError(
            f"device '{spec}' requested but CUDA is not available on this machine: ask for "
            "cpu or auto (the node's device parameter, the tools' --device)")
    # The index read here, not by torch.device: that refuses 'cuda:01' (which the form allows)
    # and an index past its 16 bits with a RuntimeError, not as a device that does not exist.
    _, _, index = spec.partition(':')
    if index and int(index) >= torch.cuda.device_count():
        raise DeviceError(f"device '{spec}' requested but only "
                          f"{torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device('cuda', int(index)) if index else torch.device('cuda')


def default_preset(device: torch.device) -> str:
    """The authors' configuration on a GPU; the compact one keeps a CPU at a usable frame rate."""
    return 'authors' if device.type == 'cuda' else 'compact'


@dataclass(frozen=True)
class LoadedModel:
    """A fusion model ready for inference and what it was made from (for logs and diagnostics)."""

    model: S4Fusion
    device: torch.device
    half: bool
    name: str
    weights: pathlib.Path | None
    trained: bool


def load_fusion_model(weights: str = '', preset: str = 'auto', device: str = 'auto',
                      half: bool = False, detail_gain: float = 0.0,
                      warn: Callable[[str], None] = print_warning) -> LoadedModel:
    """Load the model the node and the tools run.

    `weights` empty means the weights shipped for `preset`. A weights path given explicitly must
    exist (CheckpointError names the file otherwise) and decides the network: a `preset` other
    than auto must name that network. When no trained weights ship for the preset,
    the model runs with its initial weights and says so loudly. `detail_gain` > 0 replaces the
    gain on the details of the model's Laplacian base (and the name says so); a model without that
    base ignores it with a warning (so one parameter file serves `model.preset: auto` on the CPU
    and on CUDA). Warnings go to `warn` (the node's ROS logger, the tools' log).
    """
    loaded = _load_model(weights, preset, device, half, warn)
    if detail_gain > 0:
        if loaded.model.config.base == 'laplacian':
            loaded.model.set_detail_gain(detail_gain)
            loaded = replace(loaded, name=f'{loaded.name} (detail gain {detail_gain:g})')
        else:
            warn(f'model.detail_gain {detail_gain:g} ignored: {loaded.name} has no Laplacian '
                 'base')
    return loaded


def _load_model(weights, preset, device, half, warn):
    """``load_fusion_model`` without the detail gain."""
    torch_device = resolve_device(device)
    if half and torch_device.type != 'cuda':
        raise DeviceError('half precision (fp16) needs a CUDA device; set half:=false on the CPU')
    # Weights stay float32; fp16 runs through autocast, so norms and the scan keep float32.
    dtype = torch.float32
    if weights:
        # `-p model.weights:=~/w.safetensors`: the shell leaves a ~ after := as it is.
        weights = pathlib.Path(weights).expanduser()
        model = load_checkpoint(weights, device=torch_device, dtype=dtype)
        network = model.config.network_name()
        if preset not in ('auto', network):  # the weights decide the network: say so
            held = f'the {network} network' if network else 'a network of no preset'
            also = f' (or {network})' if network else ''
            raise CheckpointError(f'{weights} holds {held}, but the preset asked for is '
                                  f'{preset}: ask for auto{also}')
        return LoadedModel(model, torch_device, half, weights.stem, weights, trained=True)
    if preset == 'auto':
        preset = default_preset(torch_device)
    path = shipped_weights(preset)
    if path.is_file():
        model = load_checkpoint(path, device=torch_device, dtype=dtype)
        return LoadedModel(model, torch_device, half, path.stem, path, trained=True)
    warn(f'NO TRAINED WEIGHTS: {path} is missing; running S4Fusion ({preset}) with UNTRAINED '
         'initial weights. The fused output is not meaningful.')
    # The same initial weights every start, drawn on the CPU from a seeded CPU generator that is
    # restored afterwards (torch.manual_seed would reseed every CUDA device's too).
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(0)
        model = S4Fusion(S4FusionConfig.preset(preset), dtype=dtype)
    model = model.to(torch_device).eval()
    return LoadedModel(model, torch_device, half, f's4fusion_{preset} (untrained)', None,
                       trained=False)


# The node's parameters that choose the model, in load_fusion_model's order.
MODEL_PARAMETERS = ('model.weights', 'model.preset', 'device', 'half', 'model.detail_gain')


def model_from_params(values: dict, warn: Callable[[str], None] = print_warning) -> LoadedModel:
    """Load the model named by the node's MODEL_PARAMETERS; warnings go to `warn`."""
    return load_fusion_model(*(values[name] for name in MODEL_PARAMETERS), warn=warn)
