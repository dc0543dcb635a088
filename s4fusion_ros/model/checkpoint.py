"""S4Fusion checkpoints: safetensors weights (no pickle) with a JSON config beside them.

``model.safetensors`` holds the state dict; ``model.json`` holds what is needed to rebuild the
network (the config, its preset name, a format version) plus optional training information.
"""

import hashlib
import json
import pathlib

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..files import write_together
from .s4fusion import S4Fusion, S4FusionConfig

FORMAT_VERSION = 1
# int8: weight-only, symmetric, one float32 scale per row (last dim) of every floating tensor
# with two or more dims, stored under the tensor's name + INT8_SCALE_SUFFIX; vectors (norms,
# biases, Ds) stay float16. It about halves a float16 file again (authors preset: 6.8 -> 3.7 MB).
STORAGE_DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'int8': torch.int8}
INT8_SCALE_SUFFIX = '::int8_scale'


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded; the message names the file and the problem."""


def config_path(weights_path):
    """The JSON config that belongs to a weights file (same name, ``.json``)."""
    return pathlib.Path(weights_path).with_suffix('.json')


def file_sha256(path):
    """The sha256 of a file's bytes (hex): how records name a weights file or its JSON."""
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def shipped_weights(preset):
    """Path of the weights shipped in the package for a preset (it may not exist yet)."""
    S4FusionConfig.preset(preset)  # rejects unknown names
    weights = pathlib.Path(__file__).resolve().parents[1] / 'weights'
    return weights / f's4fusion_{preset}.safetensors'


def _own_meta(model, storage_dtype):
    """The JSON keys ``save_checkpoint`` writes itself (extra metadata may not override them)."""
    return {
        'format_version': FORMAT_VERSION,
        'model': 'S4Fusion',
        'preset': model.config.preset_name(),
        'parameters': model.num_parameters(),
        'config': model.config.to_dict(),
        'storage_dtype': str(storage_dtype).removeprefix('torch.'),
    }


def _quantize_int8(tensor):
    """Symmetric per-row int8: the values and their float32 scales, shape ``[..., 1]``."""
    scale = tensor.float().abs().amax(dim=-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    return torch.round(tensor.float() / scale).to(torch.int8), scale


def _storage_tensors(state_dict, storage_dtype):
    """The safetensors dict of a state dict stored as ``storage_dtype`` (see STORAGE_DTYPES)."""
    tensors = {}
    for name, value in state_dict.items():
        value = value.detach().to('cpu')
        if not value.is_floating_point():
            tensors[name] = value
        elif storage_dtype == torch.int8 and value.dim() >= 2:
            tensors[name], tensors[name + INT8_SCALE_SUFFIX] = _quantize_int8(value)
        else:
            tensors[name] = value.to(torch.float16 if storage_dtype == torch.int8
                                     else storage_dtype)
    return {name: value.contiguous() for name, value in tensors.items()}


def _dequantized(tensors, path):
    """The stored tensors with int8 ones multiplied back by their scales (float32)."""
    state = {k: v for k, v in tensors.items() if not k.endswith(INT8_SCALE_SUFFIX)}
    for key, scale in tensors.items():
        if key.endswith(INT8_SCALE_SUFFIX):
            name = key.removesuffix(INT8_SCALE_SUFFIX)
            if state.get(name, torch.empty(0)).dtype != torch.int8:
                raise CheckpointError(f'{path}: scale {key!r} has no int8 tensor {name!r}')
            rows = (*state[name].shape[:-1], 1)  # one scale per row
            if tuple(scale.shape) != rows:
                raise CheckpointError(f'{path}: scale {key!r} has shape {tuple(scale.shape)}, '
                                      f'its tensor {name!r} needs {rows}')
            state[name] = state[name].float() * scale
    return state


def save_checkpoint(model, path, extra_meta=None, storage_dtype=torch.float32):
    """Save weights to ``path`` (safetensors) and the config beside it; returns both paths.

    ``extra_meta`` (JSON-serialisable, e.g. ``{'training': {...}}``) is added to the JSON; it
    may not override the keys this function writes. ``storage_dtype`` float16 halves the file,
    int8 (per-row quantized matrices, float16 vectors) about halves it again;
    ``load_checkpoint`` casts back to the model's dtype (float32 by default).
    """
    if storage_dtype not in STORAGE_DTYPES.values():
        raise ValueError(f'storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got '
                         f'{storage_dtype}')
    path = pathlib.Path(path)
    meta = _own_meta(model, storage_dtype)
    clash = set(meta) & set(extra_meta or {})
    if clash:
        raise ValueError(f'extra_meta may not override {sorted(clash)}')
    meta.update(extra_meta or {})
    text = json.dumps(meta, indent=2) + '\n'
    tensors = _storage_tensors(model.state_dict(), storage_dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    # save() to bytes, written here: safetensors' save_file makes its files owner-only (0600).
    data = save(tensors, metadata={'format': 'pt'})
    json_path = config_path(path)
    # Together: a failed write (a full disk) must not leave new weights beside an old JSON.
    write_together({path: lambda file: file.write(data),
                    json_path: lambda file: file.write(text.encode())})
    return path, json_path


def convert_checkpoint(source, target, storage_dtype):
    """Re-save a checkpoint with other weight storage (e.g. float16 or int8 for a smaller
    file), keeping its JSON record; returns the new paths."""
    meta, _ = read_config(source)
    model = load_checkpoint(source)
    own = _own_meta(model, storage_dtype)
    extra = {key: value for key, value in meta.items() if key not in own}
    return save_checkpoint(model, target, extra_meta=extra, storage_dtype=storage_dtype)


def read_config(path):
    """The JSON metadata of a checkpoint and the S4FusionConfig it describes."""
    json_path = config_path(path)
    try:
        meta = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f'{json_path}: config file not found (save_checkpoint writes it '
                              f'beside the weights)') from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f'{json_path}: cannot read the config: {exc}') from None
    if not isinstance(meta, dict) or meta.get('format_version') != FORMAT_VERSION:
        version = meta.get('format_version') if isinstance(meta, dict) else None
        raise CheckpointError(f'{json_path}: unsupported checkpoint format_version {version!r}, '
                              f'expected {FORMAT_VERSION}')
    try:
        return meta, S4FusionConfig.from_dict(meta['config'])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f'{json_path}: invalid S4Fusion config: {exc!r}') from None


def load_checkpoint(path, device=None, dtype=None):
    """Build the network its JSON describes and load the weights strictly; returns it in eval mode.

    Every problem (missing or truncated file, bad JSON, missing, unexpected or misshapen tensors)
    raises CheckpointError naming the file; a shape mismatch names the first such tensor.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: ' + ('a folder; give the weights file in it'
                                             if path.is_dir() else 'weights file not found'))
    if path == config_path(path):  # the config itself: read as weights, its 'header' is text
        raise CheckpointError(f'{path}: the JSON config beside the weights; give the weights '
                              f'file ({path.with_suffix(".safetensors").name})')
    _, config = read_config(path)
    try:
        # Read here: safetensors says 'No such file or directory' for any file it cannot open
        # (permission denied, say), and refuses a path that is not UTF-8 (a Latin-1 folder
        # name) as 'not valid UTF-8'. Weights files are a few megabytes.
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f'{path}: cannot read the weights file: {exc.strerror}') from None
    try:
        tensors = load(data)
    except SafetensorError as exc:
        raise CheckpointError(f'{path}: not a readable safetensors file (truncated or corrupt?): '
                              f'{exc}') from None
    tensors = _dequantized(tensors, path)
    # Even on the meta device each block costs time and memory: a JSON of 10**9 blocks took
    # minutes and gigabytes before its tensors were compared.
    if config.blocks > len(tensors):
        raise CheckpointError(f'{path}: {config_path(path).name} describes {config.blocks} '
                              f'blocks, more than its {len(tensors)} tensors can hold')
    try:
        # On the meta device first: the shapes without their memory, so that a JSON describing a
        # far larger network than its tensors is refused before anything is allocated.
        skeleton = S4Fusion(config, device='meta', dtype=dtype)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:  # sizes torch refuses
        raise CheckpointError(f'{path}: cannot build the network {config_path(path).name} '
                              f'describes: {str(exc).splitlines()[0]}') from None
    expected = skeleton.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f'{path}: does not match the config in {config_path(path).name}: '
                              f'missing {missing[:5]}, unexpected {unexpected[:5]} (first 5 each)')
    for name, tensor in expected.items():
        if tensors[name].shape != tensor.shape:
            raise CheckpointError(
                f'{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the model '
                f'built from {config_path(path).name} expects {tuple(tensor.shape)}')
        if tensors[name].is_floating_point() != tensor.is_floating_point():
            raise CheckpointError(f'{path}: tensor {name!r} is {tensors[name].dtype} (an int8 '
                                  f'tensor without its scale?), the model expects {tensor.dtype}')
        # A diverged training's weights would fuse every frame black, without an error.
        if tensor.is_floating_point() and not torch.isfinite(tensors[name]).all():
            raise CheckpointError(f'{path}: tensor {name!r} holds NaN or infinite values')
    model = S4Fusion(config, device=device, dtype=dtype)
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def convert_authors_state_dict(state_dict, fuse_level0=False):
    """Rename a state dict of the authors' released ``MambaNet`` to this package's layout.

    Only prefixes differ; shapes are the same. Dropped: ``final_up.norm`` (built but never used
    by the released code) and, unless ``fuse_level0``, the level-0 fusion the released code
    computes without using it. Reading their pickled checkpoint is left to the caller.
    """
    renames = (('patch_embed_x.', 'patch_embed_ir.'), ('patch_embed_y.', 'patch_embed_vi.'),
               ('layers_x.', 'encoder_ir.'), ('layers_y.', 'encoder_vi.'),
               ('layers_up.', 'decoder.'), ('final_up.expand.', 'head.expand.'),
               ('final_conv.', 'head.conv.'))
    dropped = ('final_up.norm.',) + (() if fuse_level0 else ('fusion_layers.0.',))
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix('vmunet.')
        if key.startswith(dropped):
            continue
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        converted[key] = value
    return converted
