"""Checkpoints: safetensors + JSON, errors naming the file, shipped weights, authors' layout."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from support import as_a_user
from s4fusion_ros.model import (CheckpointError, convert_authors_state_dict, load_checkpoint,
                                S4Fusion, S4FusionConfig, save_checkpoint, shipped_weights)
from s4fusion_ros.model.checkpoint import convert_checkpoint, INT8_SCALE_SUFFIX


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = S4Fusion(S4FusionConfig.preset('compact')).eval()
    path = tmp_path / 'fusion.safetensors'
    save_checkpoint(model, path, extra_meta={'training': {'epochs': 3, 'data': 'msrs'}})
    return model, path


def edit_config(path, **changes):
    """Change the config in the JSON beside the weights at `path`; returns the JSON's path."""
    json_path = path.with_suffix('.json')
    meta = json.loads(json_path.read_text())
    meta['config'].update(changes)
    json_path.write_text(json.dumps(meta))
    return json_path


def test_round_trip(saved):
    model, path = saved
    meta = json.loads(path.with_suffix('.json').read_text())
    assert meta['format_version'] == 1 and meta['model'] == 'S4Fusion'
    assert meta['preset'] == 'compact'
    assert meta['parameters'] == model.num_parameters()
    assert meta['config']['dims'] == [16, 32, 64] and meta['training']['epochs'] == 3
    assert path.read_bytes()[8:9] == b'{'  # a safetensors header, not a pickle
    loaded = load_checkpoint(path, device='cpu', dtype=torch.float64)
    assert not loaded.training and loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.float64
        assert torch.equal(loaded.state_dict()[name].float(), tensor), name
    ir, vi = torch.rand(1, 1, 13, 13), torch.rand(1, 1, 13, 13)
    assert torch.equal(load_checkpoint(path).infer(ir, vi), model.infer(ir, vi))
    assert not list(path.parent.glob('.*.tmp'))
    assert path.stat().st_mode & 0o044 == path.with_suffix('.json').stat().st_mode & 0o044


def test_a_failed_json_write_leaves_the_weights_as_they_were(saved):
    # The weights were replaced before their JSON was written: a full disk between the two
    # left new weights under an old record. A folder where the JSON's temporary file goes
    # makes its write fail for real.
    model, path = saved
    before = path.read_bytes(), path.with_suffix('.json').read_bytes()
    blocker = path.with_name('.fusion.json.tmp')
    blocker.mkdir()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(IsADirectoryError):
        save_checkpoint(model, path, extra_meta={'training': {'epochs': 4}})
    assert (path.read_bytes(), path.with_suffix('.json').read_bytes()) == before
    assert [p.name for p in path.parent.glob('.*.tmp')] == [blocker.name]


def test_float16_storage_halves_the_file_and_loads_as_float32(saved, tmp_path):
    model, path = saved
    half = tmp_path / 'half.safetensors'
    save_checkpoint(model, half, storage_dtype=torch.float16)
    assert json.loads(half.with_suffix('.json').read_text())['storage_dtype'] == 'float16'
    assert json.loads(path.with_suffix('.json').read_text())['storage_dtype'] == 'float32'
    assert half.stat().st_size < 0.52 * path.stat().st_size
    loaded = load_checkpoint(half)
    for name, tensor in model.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.float32
        assert torch.equal(loaded.state_dict()[name], tensor.half().float()), name
    with pytest.raises(ValueError, match='storage_dtype'):
        save_checkpoint(model, half, storage_dtype=torch.bfloat16)

    converted = tmp_path / 'converted.safetensors'
    convert_checkpoint(path, converted, torch.float16)
    assert converted.read_bytes() == half.read_bytes()
    meta = json.loads(converted.with_suffix('.json').read_text())
    assert meta['storage_dtype'] == 'float16' and meta['training']['epochs'] == 3


def test_int8_storage_quantizes_matrices_per_row_and_keeps_vectors_float16(saved, tmp_path):
    model, path = saved
    small = tmp_path / 'int8.safetensors'
    convert_checkpoint(path, small, torch.int8)
    assert json.loads(small.with_suffix('.json').read_text())['storage_dtype'] == 'int8'
    assert small.stat().st_size < 0.35 * path.stat().st_size
    stored = load_file(str(small))
    loaded = load_checkpoint(small)
    for name, tensor in model.state_dict().items():
        restored = loaded.state_dict()[name]
        assert restored.dtype == torch.float32
        if tensor.dim() >= 2:
            assert stored[name].dtype == torch.int8
            step = tensor.abs().amax(dim=-1, keepdim=True) / 127  # one step per row
            assert torch.all((restored - tensor).abs() <= step / 2 + 1e-7), name
        else:
            assert torch.equal(restored, tensor.half().float()), name
    ir, vi = torch.rand(1, 1, 37, 37), torch.rand(1, 1, 37, 37)
    error = (loaded.infer(ir, vi) - model.infer(ir, vi)).abs().max().item()
    assert 0 < error < 0.02  # quantized, yet the same image within a few gray levels


@pytest.mark.parametrize('damage', ['drop_scale', 'orphan_scale', 'misshapen_scale',
                                    'scale_of_a_float_tensor'])
def test_int8_tensor_and_scale_must_come_in_pairs(saved, tmp_path, damage):
    _, path = saved
    small = tmp_path / 'int8.safetensors'
    convert_checkpoint(path, small, torch.int8)
    tensors = load_file(str(small))
    name = 'head.expand.weight'
    if damage == 'drop_scale':
        del tensors[name + INT8_SCALE_SUFFIX]
    elif damage == 'scale_of_a_float_tensor':  # a vector, stored float16
        name = next(key for key, value in tensors.items() if value.dtype == torch.float16)
        tensors[name + INT8_SCALE_SUFFIX] = torch.ones(1)
    elif damage == 'misshapen_scale':
        tensors[name + INT8_SCALE_SUFFIX] = tensors[name + INT8_SCALE_SUFFIX][:1].contiguous()
    else:
        del tensors[name]
    save_file(tensors, str(small))
    with pytest.raises(CheckpointError, match=f'{re.escape(str(small))}.*{name}'):
        load_checkpoint(small)


def test_extra_meta_cannot_override_the_config(tmp_path):
    with pytest.raises(ValueError, match='config'):
        save_checkpoint(S4Fusion(S4FusionConfig.preset('compact')), tmp_path / 'm.safetensors',
                        extra_meta={'config': {}})


def test_shape_mismatch_names_the_first_tensor_and_the_file(saved):
    _, path = saved
    json_path = path.with_suffix('.json')
    meta = json.loads(json_path.read_text())
    meta['config']['fusion_d_state'] = 9  # the weights were made with 12
    json_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message
    assert "'fusion_layers.1.layers.0.x_proj_weight' has shape (4, 26, 48)" in message
    assert 'expects (4, 20, 48)' in message


def test_a_config_far_larger_than_its_tensors_is_refused_before_allocating_it(saved):
    # A JSON describing about 400 M parameters (1.6 GB as float32) beside the compact tensors:
    # refused by the shapes alone, in a process whose peak memory stays that of the import.
    _, path = saved
    edit_config(path, dims=[512, 1024, 2048])
    # The peak is the child's own VmHWM: ru_maxrss would carry over the peak of the pytest
    # process that spawned it (Linux keeps the pre-exec memory's high-water mark).
    code = ('import re, sys\n'
            'from s4fusion_ros.model import CheckpointError, load_checkpoint\n'
            'try:\n    load_checkpoint(sys.argv[1])\n'
            'except CheckpointError as error:\n    print(error)\n'
            'status = open("/proc/self/status").read()\n'
            'print(re.search(r"VmHWM:\\s+(\\d+) kB", status)[1])\n')
    result = subprocess.run([sys.executable, '-c', code, str(path)], capture_output=True,
                            text=True, timeout=300, check=True)
    message, peak_kib = result.stdout.splitlines()
    assert "'patch_embed_ir.proj.weight' has shape (16, 1, 4, 4)" in message
    assert 'expects (512, 1, 4, 4)' in message
    assert int(peak_kib) < 768 * 1024  # the import alone peaks near 300 MiB


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_weights_holding_nan_or_inf_are_refused(saved, value):
    # A diverged training's weights loaded and fused every frame black, without an error.
    _, path = saved
    tensors = load_file(str(path))
    tensors['head.conv.weight'][0] = value
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="tensor 'head.conv.weight' holds NaN or inf"):
        load_checkpoint(path)


def test_missing_tensors_are_named(saved, tmp_path):
    model, _ = saved
    other = tmp_path / 'other.safetensors'
    save_checkpoint(model, other)
    meta = json.loads(other.with_suffix('.json').read_text())
    meta['config']['fuse_level0'] = True
    other.with_suffix('.json').write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"missing \['fusion_layers\.0\.layers\.0\."):
        load_checkpoint(other)


def test_unexpected_tensors_are_named(saved):
    # Left to load_state_dict, they were its RuntimeError, which names no file.
    _, path = saved
    tensors = load_file(str(path))
    tensors['stray.weight'] = torch.zeros(2)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: .*unexpected "
                       r"\['stray\.weight'\]"):
        load_checkpoint(path)


def test_loading_gives_the_dtype_asked_for(saved):
    _, path = saved
    assert {tensor.dtype for tensor in load_checkpoint(path, dtype=torch.float64)
            .state_dict().values()} == {torch.float64}


@pytest.mark.parametrize('keep', [0.5, 0.001])
def test_truncated_weights(saved, keep):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match='truncated') as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_missing_files(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match='weights file not found') as error:
        load_checkpoint(tmp_path / 'nowhere.safetensors')
    assert 'nowhere.safetensors' in str(error.value)
    # A run's folder given for its weights file was "weights file not found".
    with pytest.raises(CheckpointError, match=f'{path.parent}: a folder; give the weights file'):
        load_checkpoint(path.parent)
    # The JSON given for the weights was "not a readable safetensors file (truncated or
    # corrupt?)": its first bytes read as a header length far too large.
    with pytest.raises(CheckpointError, match=f'the JSON config beside the weights; give the '
                                              f'weights file \\({path.name}\\)'):
        load_checkpoint(path.with_suffix('.json'))
    path.with_suffix('.json').unlink()
    with pytest.raises(CheckpointError, match='config file not found') as error:
        load_checkpoint(path)
    assert str(path.with_suffix('.json')) in str(error.value)


@pytest.mark.parametrize('field, value', [('encoder_depths', [1, 10**9, 1]),
                                          ('fusion_blocks', 10**9)])
def test_a_config_of_more_blocks_than_its_tensors_is_refused_unbuilt(saved, field, value):
    # Even on the meta device 10**9 blocks took minutes and gigabytes before the comparison.
    _, path = saved
    edit_config(path, **{field: value})
    started = time.monotonic()
    with pytest.raises(CheckpointError,
                       match=r'fusion\.json describes \d+ blocks, more than its 237 tensors'):
        load_checkpoint(path)
    assert time.monotonic() - started < 60


def test_an_unreadable_weights_file_is_named_as_such(saved):
    # It was "not a readable safetensors file (truncated or corrupt?): No such file or
    # directory", for a file that exists: safetensors names any failure to open it so. Root
    # reads any file, so as root the load runs without the capability to override permissions.
    _, path = saved
    path.chmod(0)
    code = ('import sys\n'
            'from s4fusion_ros.model import CheckpointError, load_checkpoint\n'
            'try:\n    load_checkpoint(sys.argv[1])\n'
            'except CheckpointError as error:\n    print(error)\n')
    result = subprocess.run([*as_a_user(), sys.executable, '-c', code, str(path)],
                            capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == f'{path}: cannot read the weights file: Permission denied'


def test_weights_in_a_folder_named_in_bytes_that_are_not_utf8_load(saved, tmp_path):
    # A Latin-1 folder name (held as surrogates) was "not a readable safetensors file (truncated
    # or corrupt?): Path ... is not valid UTF-8": safetensors takes a path as UTF-8 text only.
    model, path = saved
    folder = tmp_path / os.fsdecode(b'mod\xe8les')
    folder.mkdir()
    moved = folder / path.name
    path.rename(moved)
    path.with_suffix('.json').rename(moved.with_suffix('.json'))
    loaded = load_checkpoint(moved)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize('text, problem', [
    ('{"format_version": 1, "config": {"dims"', 'cannot read the config'),
    ('{"format_version": 2, "config": {}}', 'format_version 2'),
    ('{"format_version": 1, "config": {"dims": [16, 20, 64]}}', 'invalid S4Fusion config'),
    ('{"format_version": 1}', 'invalid S4Fusion config'),
    ('{"format_version": 1, "config": {"dims": 5}}', 'invalid S4Fusion config'),  # TypeError
])
def test_bad_json(saved, text, problem):
    _, path = saved
    path.with_suffix('.json').write_text(text)
    with pytest.raises(CheckpointError, match=problem) as error:
        load_checkpoint(path)
    assert str(path.with_suffix('.json')) in str(error.value)


@pytest.mark.parametrize('field, value', [
    ('d_state', -1), ('d_state', 1.5), ('dims', [0, 0, 0]), ('fusion_blocks', 0), ('d_conv', 2),
    ('ssm_ratio', 0.0), ('ssm_ratio', 0.05), ('ssm_ratio', float('inf')), ('ssm_ratio', 1e30),
    ('fuse_level0', 'false')])
def test_a_config_that_builds_no_network_is_refused_naming_the_file(saved, field, value):
    _, path = saved
    json_path = edit_config(path, **{field: value})
    with pytest.raises(CheckpointError, match='invalid S4Fusion config') as error:
        load_checkpoint(path)
    assert str(json_path) in str(error.value)


def test_shipped_weights_location():
    path = shipped_weights('compact')
    assert path.name == 's4fusion_compact.safetensors'
    assert path.parent.name == 'weights' and path.parent.parent.name == 's4fusion_ros'
    assert (path.parent.parent / 'model' / 'checkpoint.py').is_file()
    assert shipped_weights('authors').name == 's4fusion_authors.safetensors'
    with pytest.raises(ValueError, match='unknown S4Fusion preset'):
        shipped_weights('tiny')


@pytest.mark.parametrize('preset', ['compact', 'authors'])
def test_shipped_weights_are_a_few_megabytes_and_load(preset):
    path = shipped_weights(preset)
    assert path.stat().st_size < 4_000_000, f'{path}: {path.stat().st_size} bytes'
    assert load_checkpoint(path).config.preset_name() == preset


def test_authors_state_dict_maps_onto_the_model():
    """Keys and shapes of the released MambaNet (read from its code) land on our parameters."""
    authors = {  # key (after 'vmunet.') -> shape, for the released defaults
        'patch_embed_x.proj.weight': (48, 1, 4, 4),
        'patch_embed_y.norm.bias': (48,),
        'layers_x.0.blocks.0.ln_1.weight': (48,),
        'layers_x.0.blocks.0.self_attention.in_proj.weight': (144, 48),
        'layers_x.0.blocks.0.self_attention.conv2d.bias': (72,),
        'layers_x.0.blocks.0.self_attention.x_proj_weight': (4, 27, 72),
        'layers_x.0.blocks.0.self_attention.dt_projs_weight': (4, 72, 3),
        'layers_y.1.blocks.1.self_attention.A_logs': (576, 12),
        'layers_y.1.downsample.reduction.weight': (192, 384),
        'layers_y.2.blocks.0.self_attention.out_norm.weight': (288,),
        'fusion_layers.0.layers.0.in_proj.weight': (144, 48),
        'fusion_layers.1.layers.2.y_proj_weight': (4, 42, 144),
        'fusion_layers.2.layers.0.mark_proj': (288, 576),
        'fusion_layers.2.layers.1.Ds': (1152,),
        'layers_up.0.blocks.0.self_attention.dt_projs_bias': (4, 288),
        'layers_up.1.upsample.expand.weight': (384, 192),
        'layers_up.2.upsample.norm.weight': (48,),
        'final_up.expand.weight': (192, 48),
        'final_up.norm.weight': (12,),
        'final_conv.weight': (1, 12, 1, 1),
        'final_conv.bias': (1,),
    }
    state = {'vmunet.' + k: torch.zeros(shape) for k, shape in authors.items()}
    for fuse_level0 in (False, True):
        ours = S4Fusion(S4FusionConfig(fuse_level0=fuse_level0)).state_dict()
        converted = convert_authors_state_dict(state, fuse_level0=fuse_level0)
        assert len(converted) == len(authors) - 1 - (not fuse_level0)
        for key, value in converted.items():
            assert key in ours and ours[key].shape == value.shape, key
    assert 'head.conv.bias' in converted and 'decoder.1.upsample.expand.weight' in converted
