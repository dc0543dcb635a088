"""The CUDA path on the shipped weights and real pairs: mamba-ssm's kernel against the project's
own scan, fp16 against fp32, recovery from running out of GPU memory, and a GPU call's training
run. Skipped without CUDA; the mamba-ssm checks also without mamba-ssm (extra [gpu])."""

import json

import cv2
import numpy as np
import pytest
import torch

from s4fusion_ros.engine import FusionEngine, FusionSettings, PreparedPair
from s4fusion_ros.model import S4FusionConfig, load_checkpoint, shipped_weights
from s4fusion_ros.model.scan import mamba_scan_fn, scan_backend
from s4fusion_ros.runtime import load_fusion_model
from s4fusion_ros.training import (PairFolderDataset, S4FusionLoss, Trainer, TrainSettings,
                                   pairs_in_folder)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]
needs_mamba = pytest.mark.skipif(mamba_scan_fn() is None,
                                 reason='needs mamba-ssm (extra [gpu])')


def luminance_pair(msrs_pair):
    """The real MSRS pair as (1, 1, 480, 640) IR and visible luminance in [0, 1]."""
    ir, vi = msrs_pair
    vi_y = cv2.cvtColor(vi, cv2.COLOR_BGR2YCrCb)[..., 0]
    return tuple(torch.from_numpy(a.astype(np.float32) / 255)[None, None] for a in (ir, vi_y))


def psnr(a, b):
    mse = float(((a - b) ** 2).mean())
    return float('inf') if mse == 0 else 10 * np.log10(1 / mse)


@pytest.fixture(scope='module', params=['authors', 'compact'])
def shipped_model(request):
    return load_checkpoint(shipped_weights(request.param), device='cuda').eval()


@needs_mamba
def test_mamba_kernel_matches_own_scans_on_shipped_weights(shipped_model, msrs_pair):
    ir, vi = luminance_pair(msrs_pair)
    fused = {}
    for backend in ('mamba', 'torch'):
        fused[backend] = shipped_model.set_scan_backend(backend).infer(ir, vi).cpu()
    shipped_model.set_scan_backend(None)
    cpu_model = load_checkpoint(shipped_weights(shipped_model.config.preset_name()))
    fused['cpu'] = cpu_model.eval().infer(ir, vi)  # the fused numba kernel
    for name in ('torch', 'cpu'):
        difference = (fused['mamba'] - fused[name]).abs().max().item()
        print(f'{shipped_model.config.preset_name()}: mamba vs {name} max |diff| {difference:.2e}')
        assert difference < 1e-3  # a quarter of one 8-bit level


def test_fp16_autocast_stays_close_to_fp32(shipped_model, msrs_pair):
    ir, vi = luminance_pair(msrs_pair)
    full = shipped_model.infer(ir, vi).clamp(0, 1)
    half = shipped_model.infer(ir, vi, amp_dtype=torch.float16).clamp(0, 1)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    quality = psnr(half, full)
    print(f'{shipped_model.config.preset_name()}: fp16 vs fp32 PSNR {quality:.1f} dB, max |diff| '
          f'{(half - full).abs().max().item():.2e}')
    assert quality > 40  # below one 8-bit level of noise on average


def test_engine_recovers_from_cuda_out_of_memory(msrs_pair):
    """The node drops a pair whose inference runs out of GPU memory and fuses the next one
    (node.py catches the error and releases the cache); here the same on the engine itself."""
    ir, vi = msrs_pair
    engine = FusionEngine(load_fusion_model(preset='authors', device='cuda'), FusionSettings())
    pair = PreparedPair(0, 0, 'camera', ir.astype(np.float32) / 255, vi)
    expected = engine.infer(pair).fused
    torch.cuda.empty_cache()
    hog = []
    try:
        for chunk in (1 << 30, 16 << 20, 1 << 20):  # fill the GPU to the last MiB
            while True:
                try:
                    hog.append(torch.empty(chunk, dtype=torch.uint8, device='cuda'))
                except torch.cuda.OutOfMemoryError:
                    break
        # OutOfMemoryError, or a library's own allocation failure (both RuntimeError)
        with pytest.raises(RuntimeError) as error:
            engine.infer(pair)
        print(f'with the GPU full: {error.value!r}'[:300])
    finally:
        hog.clear()
        torch.cuda.empty_cache()
    assert np.array_equal(engine.infer(pair).fused, expected)


def test_a_training_run_as_a_gpu_call_trains_checkpoints_and_resumes(tmp_path, pair_folder):
    """scripts/gpu_train.py's authors recipe in small: the authors network from its shipped
    weights, distilled from the compact one, on CUDA (the backward through mamba-ssm's kernel
    where it is installed); a checkpoint of the CUDA run (AdamW's moments, the CUDA RNG) resumed
    to the uninterrupted run's loss, its record naming the GPU and the scan, its weights loading
    on the CPU."""
    def trainer(out):
        settings = TrainSettings(steps=3, batch_size=2, crop=25, lr=4e-4, seed=5)
        dataset = PairFolderDataset(pairs_in_folder(pair_folder), 25, settings.min_gain)
        teacher = load_checkpoint(shipped_weights('compact'), device='cuda').eval()
        loss = S4FusionLoss(0.0, 0.0, 0.0, teacher=teacher, teacher_weight=32.0,
                            teacher_edges='components')
        return Trainer(S4FusionConfig.preset('authors'), dataset, loss, out, settings, 'cuda',
                       deviation='test run', init_weights=shipped_weights('authors'),
                       weights_dtype=torch.int8)

    full = trainer(tmp_path / 'full').run(progress=False)
    assert [record['step'] for record in full] == [1, 2, 3]
    trainer(tmp_path / 'split').run(stop_at=2, progress=False)
    resumed = trainer(tmp_path / 'split')
    assert resumed.resume() == 2
    assert all(value.device.type == 'cuda' for state in resumed.optimizer.state.values()
               for key, value in state.items() if key != 'step')
    (last,) = resumed.run(progress=False)
    # Not bit for bit: the kernels' float sums may run in another order.
    assert last['loss'] == pytest.approx(full[-1]['loss'], rel=1e-3)
    record = json.loads((tmp_path / 'split' / 's4fusion_authors.json').read_text())['training']
    assert record['steps_done'] == 3 and record['device'] == 'cuda'
    assert record['device_name'] == torch.cuda.get_device_name()
    assert record['scan'] == scan_backend(torch.empty(0, device='cuda'))
    assert record['scan'] == ('mamba' if mamba_scan_fn() is not None else 'torch')
    weights = load_checkpoint(tmp_path / 'split' / 's4fusion_authors.safetensors')  # on the CPU
    ir, vi = (torch.rand(1, 1, 37, 41, generator=torch.Generator().manual_seed(side))
              for side in range(2))
    assert torch.isfinite(weights.infer(ir, vi)).all()
