"""The S4Fusion network: structure, parameter counts, padding, scan layout, level-0 decision."""

import json
import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from s4fusion_ros.model import S4Fusion, S4FusionConfig
from s4fusion_ros.model import blocks
from s4fusion_ros.model.blocks import (cross_merge, cross_scan, deinterleave, interleave,
                                       PatchExpand, PatchMerging, SS2D)
from s4fusion_ros.model.fusion import CMSALayer, FusionBlock
from s4fusion_ros.model.pyramid import laplacian_fuse
from s4fusion_ros.model.scan import numba_cross_scan_fn


def compact(seed=0, **overrides):
    torch.manual_seed(seed)
    config = S4FusionConfig.preset('compact')
    return S4Fusion(S4FusionConfig(**{**config.to_dict(), **overrides}))


def pair(height, width, batch=1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, height, width, generator=gen),
            torch.rand(batch, 1, height, width, generator=gen))


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts():
    authors = S4Fusion(S4FusionConfig.preset('authors'))
    with_level0 = S4Fusion(S4FusionConfig(fuse_level0=True))
    small = S4Fusion(S4FusionConfig.preset('compact'))
    print(f'authors {authors.num_parameters():,}, authors + level-0 CMSA '
          f'{with_level0.num_parameters():,}, compact {small.num_parameters():,}')
    assert authors.num_parameters() == 3_410_893
    # The released model has the dead level-0 CMSA and an unused LayerNorm(12) in its final
    # expand on top: 3,562,981 in its state dict, the "about 3.6 M" of the design notes.
    assert with_level0.num_parameters() + 2 * 12 == 3_562_981
    assert small.num_parameters() == 388_613
    assert small.num_parameters() < authors.num_parameters() / 8


def test_authors_parameter_shapes():
    """Shapes at the places the authors' code fixes them (d_inner 1.5 C, dt_rank ceil(C / 16))."""
    model = S4Fusion()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ssm = 'encoder_ir.0.blocks.0.self_attention.'
    fusion = 'fusion_layers.2.layers.2.'
    assert shapes['patch_embed_ir.proj.weight'] == (48, 1, 4, 4)
    assert shapes[ssm + 'in_proj.weight'] == (144, 48)
    assert shapes[ssm + 'conv2d.weight'] == (72, 1, 3, 3)
    assert shapes[ssm + 'x_proj_weight'] == (4, 3 + 2 * 12, 72)
    assert shapes[ssm + 'dt_projs_weight'] == (4, 72, 3)
    assert shapes[ssm + 'dt_projs_bias'] == (4, 72)
    assert shapes[ssm + 'A_logs'] == (4 * 72, 12)
    assert shapes[ssm + 'Ds'] == (4 * 72,)
    assert shapes[fusion + 'x_proj_weight'] == shapes[fusion + 'y_proj_weight'] == (4, 48, 288)
    assert shapes[fusion + 'mark_proj'] == (288, 576)
    assert shapes[fusion + 'A_logs'] == (4 * 288, 18)
    assert shapes['encoder_vi.1.downsample.reduction.weight'] == (192, 384)
    assert shapes['decoder.1.upsample.expand.weight'] == (384, 192)
    assert shapes['decoder.2.upsample.norm.weight'] == (48,)
    assert shapes['head.expand.weight'] == (192, 48)
    assert shapes['head.conv.weight'] == (1, 12, 1, 1)
    assert model.fusion_layers['1'].layers[0].dt_rank == 6


def test_ssm_initialisation():
    block = SS2D(16, d_state=5)
    assert torch.equal(-torch.exp(block.A_logs), -torch.arange(1.0, 6.0).expand(4 * 24, 5))
    assert torch.equal(block.Ds, torch.ones(4 * 24))
    dt = F.softplus(block.dt_projs_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001


@pytest.mark.parametrize('side', list(range(2, 62)) + [480, 640])
def test_padding_rule(side):
    """Each side grows to the next 12k + 1 (k >= 1), the smaller half of the rest on the left."""
    left, right, top, bottom = S4FusionConfig().padding(side, side)
    padded = side + left + right
    assert (left, right) == (top, bottom)
    assert (padded - 1) % 12 == 0 and padded >= 13 and padded >= side
    assert padded - 12 < max(side, 13)  # the next one, not a later one
    assert left == (padded - side) // 2


def test_padding_of_a_vga_frame():
    assert S4FusionConfig().padding(480, 640) == (4, 5, 0, 1)  # 481 x 649, as the notes say


def test_forward_odd_size_compact():
    model = compact().eval()
    ir, vi = pair(37, 53, batch=2)
    with torch.no_grad():
        out = model(ir, vi)
    assert out.shape == (2, 1, 37, 53) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # batch items are independent
    with torch.no_grad():
        assert torch.allclose(model(ir[1:], vi[1:]), out[1:], atol=1e-5)


def test_forward_authors_small():
    torch.manual_seed(0)
    model = S4Fusion(S4FusionConfig.preset('authors')).eval()
    with torch.no_grad():
        out = model(*pair(14, 11))
    assert out.shape == (1, 1, 14, 11) and torch.isfinite(out).all()


def test_forward_pads_symmetrically_with_zeros_and_crops():
    """An unaligned input gives the crop of the forward of its zero-padded 12k + 1 version (the
    network; a base is computed on the input as it is)."""
    model = compact(base='none', detail_gain=1.0, base_contrast=1.0).eval()
    ir, vi = pair(22, 19)
    pad = left, right, top, bottom = model.config.padding(22, 19)
    assert (22 + top + bottom, 19 + left + right) == (25, 25)
    with torch.no_grad():
        out = model(ir, vi)
        padded = model(F.pad(ir, pad), F.pad(vi, pad))
    assert torch.equal(out, padded[..., top:top + 22, left:left + 19])


def test_forward_rejects_bad_shapes():
    model = compact()
    with pytest.raises(ValueError, match='expected IR and VI'):
        model(torch.rand(1, 1, 13, 13), torch.rand(1, 1, 13, 14))
    with pytest.raises(ValueError, match='expected IR and VI'):
        model(torch.rand(1, 3, 13, 13), torch.rand(1, 3, 13, 13))
    with pytest.raises(ValueError, match='expected IR and VI'):
        model(torch.rand(1, 1, 13, 13), torch.rand(1, 1, 13, 13, dtype=torch.float64))


def test_determinism():
    a, b = compact(seed=3).eval(), compact(seed=3).eval()
    ir, vi = pair(25, 25)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    with torch.no_grad():
        first = a(ir, vi)
        assert torch.equal(first, a(ir, vi))
        assert torch.equal(first, b(ir, vi))


def test_gradients_reach_every_parameter():
    model = compact().train()
    ir, vi = pair(25, 13)  # level 2 gets 2 x 1 tokens: with one token A gets no gradient
    ir.requires_grad_(True)
    model(ir, vi).square().mean().backward()
    assert ir.grad is not None and ir.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_level0_fusion_is_not_built_by_default():
    """fuse_level0=False: no level-0 CMSA in the module, the state dict or the computation."""
    model = compact().eval()
    assert not model.config.fuse_level0
    assert sorted(model.fusion_layers) == ['1', '2']
    assert not any(k.startswith('fusion_layers.0.') for k in model.state_dict())
    calls = []
    for module in model.modules():
        if isinstance(module, FusionBlock):
            module.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(*pair(13, 13))
    assert len(calls) == model.config.fusion_blocks * 2


def test_level0_fusion_when_asked_is_used_and_default_equals_its_absence():
    with_level0 = compact(fuse_level0=True).eval()
    without = compact(fuse_level0=False).eval()
    level0 = with_level0.fusion_layers['0']
    assert with_level0.num_parameters() - without.num_parameters() == count(level0)
    missing = without.load_state_dict(with_level0.state_dict(), strict=False).unexpected_keys
    assert missing and all(k.startswith('fusion_layers.0.') for k in missing)
    ir, vi = pair(13, 13)
    with torch.no_grad():
        used = with_level0(ir, vi)
        # the released code's behaviour: level 0 computed, result dropped == not built at all
        handle = level0.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
        assert torch.equal(with_level0(ir, vi), without(ir, vi))
        handle.remove()
        assert not torch.allclose(used, without(ir, vi), atol=1e-4)


def test_cross_scan_directions_and_exact_round_trip():
    height, width = 3, 5
    x = torch.randn(2, 4, height, width)
    xs = cross_scan(x)
    assert xs.shape == (2, 4, 4, height * width)
    for t in range(height * width):
        assert torch.equal(xs[:, 0, :, t], x[:, :, t // width, t % width])  # row-major
        assert torch.equal(xs[:, 1, :, t], x[:, :, t % height, t // height])  # column-major
    assert torch.equal(xs[:, 2:], xs[:, :2].flip(-1))
    for k in range(4):  # merge maps each direction back exactly
        only_k = torch.zeros_like(xs)
        only_k[:, k] = xs[:, k]
        assert torch.equal(cross_merge(only_k, height, width), x.flatten(2))
    assert torch.equal(cross_merge(xs, height, width), 4 * x.flatten(2))


def test_interleave_round_trip():
    a, b = torch.randn(2, 4, 3, 7), torch.randn(2, 4, 3, 7)
    ab = interleave(a, b)
    assert ab.shape == (2, 4, 3, 14)
    assert torch.equal(ab[..., 0], a[..., 0]) and torch.equal(ab[..., 1], b[..., 0])
    assert torch.equal(ab[..., 5], b[..., 2])
    back_a, back_b = deinterleave(ab)
    assert torch.equal(back_a, a) and torch.equal(back_b, b)


def test_patch_merging_and_expand_layouts():
    """Neighbour order and pixel-shuffle order as the authors' weights expect them."""
    merge = PatchMerging(3)
    seen = []
    merge.norm.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    x = torch.randn(1, 4, 6, 3)
    assert merge(x).shape == (1, 2, 3, 6)
    neighbours = [x[0, 2, 4], x[0, 3, 4], x[0, 2, 5], x[0, 3, 5]]  # of merged token (1, 2)
    assert torch.equal(seen[0][0, 1, 2], torch.cat(neighbours))

    expand = PatchExpand(8)
    x = torch.randn(1, 2, 3, 8)
    e = expand.expand(x)  # (1, 2, 3, (p1 p2 c)) with c = 4
    expected = torch.empty(1, 4, 6, 4)
    for i in range(2):
        for j in range(3):
            for p1 in range(2):
                for p2 in range(2):
                    expected[0, 2 * i + p1, 2 * j + p2] = e[0, i, j, (2 * p1 + p2) * 4:][:4]
    assert torch.allclose(expand(x), expand.norm(expected), atol=1e-6)


def reference_scan(block, grids, projs):
    """Straightforward float64 version of the SS2D / FusionBlock core, one token at a time.

    For each direction an explicit list of grid positions; per position, each modality's token
    in turn (interleaved one for one), its own (dt, B, C), one recurrence. ``grids`` are
    (D, H, W) features after conv + SiLU; returns one (D, H, W) output per modality.
    """
    d, height, width = grids[0].shape
    n, r = block.d_state, block.dt_rank
    rows = [(i, j) for i in range(height) for j in range(width)]
    cols = [(i, j) for j in range(width) for i in range(height)]
    a = -torch.exp(block.A_logs.double()).view(4, d, n)
    ds = block.Ds.double().view(4, d)
    dt_w, dt_b = block.dt_projs_weight.double(), block.dt_projs_bias.double()
    mark = torch.zeros_like(grids[0])
    if len(grids) == 2:
        mark = torch.einsum('dc,chw->dhw', block.mark_proj.double(), torch.cat(grids))
    outs = [torch.zeros_like(g) for g in grids]
    for k, order in enumerate([rows, cols, rows[::-1], cols[::-1]]):
        h = torch.zeros(d, n, dtype=torch.float64)
        for i, j in order:
            for grid, proj, out in zip(grids, projs, outs):
                token = grid[:, i, j]
                dbl = proj[k].double() @ token
                dt = F.softplus(dt_w[k] @ dbl[:r] + dt_b[k])
                u = token + mark[:, i, j]
                h = torch.exp(dt[:, None] * a[k]) * h + (dt * u)[:, None] * dbl[r:r + n]
                out[:, i, j] += h @ dbl[r + n:] + ds[k] * u
    return outs


def mixer_in(block, x):
    x, z = block.in_proj(x).chunk(2, dim=-1)
    return F.silu(block.conv2d(x.permute(0, 3, 1, 2)))[0].double(), z


def mixer_out(block, y, z):
    return block.out_proj(block.out_norm(y.permute(1, 2, 0)[None].to(z.dtype)) * F.silu(z))


def run_path(module, path, *inputs):
    """Run a block on the CPU inference path ('fused', the numba grid kernel) or the torch path
    (cross-scan copies and the scan with autograd, taken where gradients are needed)."""
    with torch.set_grad_enabled(path == 'torch'):
        assert module._fused_path(*inputs) == (path == 'fused')
        out = module(*inputs)
    return out.detach() if torch.is_tensor(out) else tuple(t.detach() for t in out)


PATHS = ['torch', pytest.param('fused', marks=pytest.mark.skipif(
    numba_cross_scan_fn() is None, reason='numba is not installed'))]


@pytest.mark.parametrize('path', PATHS)
def test_ss2d_matches_a_token_by_token_reference(path):
    torch.manual_seed(0)
    block = SS2D(8, d_state=4).eval()
    x = torch.randn(1, 3, 4, 8)
    with torch.no_grad():
        grid, z = mixer_in(block, x)
        expected = mixer_out(block, reference_scan(block, [grid], [block.x_proj_weight])[0], z)
    assert torch.allclose(run_path(block, path, x), expected, atol=1e-4)


@pytest.mark.parametrize('path', PATHS)
def test_fusion_block_matches_an_interleaved_token_by_token_reference(path):
    torch.manual_seed(0)
    block = FusionBlock(8, d_state=4).eval()
    ir, vi = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8)
    with torch.no_grad():
        (g_ir, z_ir), (g_vi, z_vi) = mixer_in(block, ir), mixer_in(block, vi)
        y_ir, y_vi = reference_scan(block, [g_ir, g_vi],
                                    [block.x_proj_weight, block.y_proj_weight])
    out_ir, out_vi = run_path(block, path, ir, vi)
    assert torch.allclose(out_ir, mixer_out(block, y_ir, z_ir), atol=1e-4)
    assert torch.allclose(out_vi, mixer_out(block, y_vi, z_vi), atol=1e-4)


@pytest.mark.skipif(numba_cross_scan_fn() is None, reason='numba is not installed')
@pytest.mark.parametrize('preset, size, batch', [('compact', (25, 37), 2),
                                                 ('authors', (25, 25), 1)])
def test_cpu_inference_path_equals_the_torch_path(preset, size, batch, monkeypatch):
    """The fused CPU path gives the torch path's output to float32 rounding, whole network."""
    torch.manual_seed(0)
    model = S4Fusion(S4FusionConfig.preset(preset)).eval()
    ir, vi = pair(*size, batch=batch)
    fused = model.infer(ir, vi)
    with torch.enable_grad():  # parameters require grad: the torch path throughout
        reference = model(ir, vi).detach()
    assert torch.allclose(fused, reference, rtol=1e-4, atol=1e-5 * reference.abs().max())
    # Forced backends (as s4fusion-bench --scan-backend compares them) take the same network.
    for backend in ('torch', 'numba'):
        forced = model.set_scan_backend(backend).infer(ir, vi)
        if backend == 'torch':
            forced_torch = forced
        assert torch.allclose(forced, reference, rtol=1e-4, atol=1e-5 * reference.abs().max())
    assert torch.equal(model.set_scan_backend(None).infer(ir, vi), fused)

    # Forced 'torch' compares the torch scan with the kernels: it must not take the fused one.
    def fused_kernel(*_):
        raise AssertionError('the fused grid kernel ran with the torch backend forced')
    monkeypatch.setattr(blocks, 'cross_selective_scan', fused_kernel)
    assert torch.equal(model.set_scan_backend('torch').infer(ir, vi), forced_torch)
    with pytest.raises(ValueError, match='unknown scan backend'):
        model.set_scan_backend('cuda')


def test_cmsa_layer_sums_residual_streams():
    torch.manual_seed(0)
    layer = CMSALayer(8, depth=2, d_state=4).eval()
    ir, vi = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
    with torch.no_grad():
        expected_ir, expected_vi = ir, vi
        for block in layer.layers:
            d_ir, d_vi = block(expected_ir, expected_vi)
            expected_ir, expected_vi = expected_ir + d_ir, expected_vi + d_vi
        assert torch.equal(layer(ir, vi), expected_ir + expected_vi)


@pytest.fixture(scope='module')
def trained():
    """The shipped authors-preset network: trained A, D, dt biases and norms differ per
    direction and channel, where a fresh block's are alike (A_n = n and D = 1 everywhere)."""
    from s4fusion_ros.model import load_checkpoint, shipped_weights
    return load_checkpoint(shipped_weights('authors'))


def reference_network(model, ir, vi):
    """S4Fusion wired as the design notes (shared/design/s4fusion-model.md) describe it, written
    out from the model's blocks: pad to 12k + 1, embed per modality, skips before each stage,
    CMSA at levels 1 and 2 (the level-0 fusion unused), the encoders' sum into the decoder with
    the fused levels added after its stages, the overlap-summing head, crop."""
    height, width = ir.shape[2:]

    def grow(side):  # to the next 12k + 1 (k >= 1), the smaller half first
        extra = next(n for n in range(13, side + 13, 12) if n >= side) - side
        return extra // 2, extra - extra // 2

    (left, right), (top, bottom) = grow(width), grow(height)

    def embed(patch_embed, image):
        tokens = patch_embed.proj(F.pad(image, (left, right, top, bottom)))
        return patch_embed.norm(tokens.permute(0, 2, 3, 1))

    def stage(layer, x):
        if layer.upsample is not None:
            x = layer.upsample(x)
        for block in layer.blocks:  # VSS block: x + SS2D(LayerNorm(x)), no MLP
            x = x + block.self_attention(block.ln_1(x))
        return x if layer.downsample is None else layer.downsample(x)

    def cmsa(layer, ir, vi):
        for block in layer.layers:
            d_ir, d_vi = block(ir, vi)
            ir, vi = ir + d_ir, vi + d_vi
        return ir + vi

    ir, vi = embed(model.patch_embed_ir, ir), embed(model.patch_embed_vi, vi)
    fused = {}
    for level in range(3):
        if level:
            fused[level] = cmsa(model.fusion_layers[str(level)], ir, vi)
        ir, vi = stage(model.encoder_ir[level], ir), stage(model.encoder_vi[level], vi)
    x = stage(model.decoder[0], ir + vi) + fused[2]
    x = stage(model.decoder[1], x) + fused[1]
    x = stage(model.decoder[2], x)
    # Head: each token's 12 x 4 x 4 patch placed at stride 3, overlaps summed, then 1x1 conv.
    patches = model.head.expand(x)[0].unflatten(-1, (12, 4, 4))  # (h, w, 12, 4, 4)
    image = x.new_zeros(12, top + height + bottom, left + width + right)
    for i in range(patches.shape[0]):
        for j in range(patches.shape[1]):
            image[:, 3 * i:3 * i + 4, 3 * j:3 * j + 4] += patches[i, j]
    conv = model.head.conv
    image = torch.einsum('c,chw->hw', conv.weight[0, :, 0, 0], image) + conv.bias[0]
    return image[top:top + height, left:left + width]


def test_shipped_network_on_a_real_pair_matches_the_design_written_out(trained, msrs_pair):
    import cv2
    ir, vi = msrs_pair
    ir, vi = (torch.from_numpy(image[200:250, 300:370]).float()[None, None] / 255
              for image in (ir, cv2.cvtColor(vi, cv2.COLOR_BGR2YCrCb)[..., 0]))
    assert trained.config.padding(50, 70) == (1, 2, 5, 6)  # 61 x 73: 20 x 24 tokens
    with torch.no_grad():
        expected = reference_network(trained, ir, vi)
        fused = trained(ir, vi)[0, 0]
    assert torch.allclose(fused, expected, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize('path', PATHS)
def test_trained_blocks_match_the_token_by_token_reference(trained, path):
    """With trained parameters, which differ per direction and channel, a direction scanned
    with another's A, D or dt bias shows; a fresh block's alike values hid it."""
    ss2d = trained.encoder_ir[0].blocks[0].self_attention  # 48 -> 72 channels, state 12
    fusion = trained.fusion_layers['1'].layers[0]  # 96 -> 144 channels, state 18
    gen = torch.Generator().manual_seed(0)
    x, ir, vi = (torch.randn(1, 3, 4, dim, generator=gen) for dim in (48, 96, 96))
    with torch.no_grad():
        grid, z = mixer_in(ss2d, x)
        expected = mixer_out(ss2d, reference_scan(ss2d, [grid], [ss2d.x_proj_weight])[0], z)
        (g_ir, z_ir), (g_vi, z_vi) = mixer_in(fusion, ir), mixer_in(fusion, vi)
        y_ir, y_vi = reference_scan(fusion, [g_ir, g_vi],
                                    [fusion.x_proj_weight, fusion.y_proj_weight])
        expected_ir, expected_vi = mixer_out(fusion, y_ir, z_ir), mixer_out(fusion, y_vi, z_vi)
    outputs = (run_path(ss2d, path, x), *run_path(fusion, path, ir, vi))
    for out, reference in zip(outputs, (expected, expected_ir, expected_vi)):
        assert torch.allclose(out, reference, atol=1e-4 * reference.abs().max())


def test_config_round_trip_and_presets():
    for name in ('authors', 'compact'):
        config = S4FusionConfig.preset(name)
        values = json.loads(json.dumps(config.to_dict()))
        assert S4FusionConfig.from_dict(values) == config
        assert S4FusionConfig.from_dict(values).preset_name() == name
    assert S4FusionConfig() == S4FusionConfig.preset('authors')
    assert S4FusionConfig(fuse_level0=True).preset_name() is None
    # The network, whatever gains its base takes (those change no weight).
    plain = replace(S4FusionConfig.preset('compact'), detail_gain=1.0, base_contrast=1.0)
    assert plain.preset_name() is None and plain.network_name() == 'compact'
    assert S4FusionConfig.preset('authors').network_name() == 'authors'
    assert S4FusionConfig(fuse_level0=True).network_name() is None
    with pytest.raises(ValueError, match='unknown S4Fusion preset'):
        S4FusionConfig.preset('huge')
    with pytest.raises(ValueError, match='unknown S4Fusion config keys'):
        S4FusionConfig.from_dict({'dims': [16, 32, 64], 'heads': 4})
    with pytest.raises(ValueError, match='double'):
        S4FusionConfig(dims=(16, 24, 64))
    with pytest.raises(ValueError, match='one entry per level'):
        S4FusionConfig(encoder_depths=(1, 2))
    # A JSON's widths and gains are taken as they are, not rounded or parsed: 16.7 was 16.
    for field, value, message in (('dims', [16.7, 32, 64], 'dims must be integers'),
                                  ('dims', ['16', 32, 64], 'dims must be integers'),
                                  ('decoder_depths', [1, True, 1], 'decoder_depths must be'),
                                  ('detail_gain', '1.1', "detail_gain must be a number"),
                                  ('ssm_ratio', True, 'ssm_ratio must be a number')):
        values = {**S4FusionConfig.preset('compact').to_dict(), field: value}
        with pytest.raises(ValueError, match=re.escape(message)):
            S4FusionConfig.from_dict(values)


def test_detail_gain_scales_the_pyramid_details_and_needs_the_laplacian_base():
    ir, vi = pair(37, 50)
    plain, bases_only = laplacian_fuse(ir, vi), laplacian_fuse(ir, vi, detail_gain=0.0)
    # The reconstruction is linear in the details, so the gain scales what they add to the base.
    torch.testing.assert_close(laplacian_fuse(ir, vi, detail_gain=1.15),
                               bases_only + 1.15 * (plain - bases_only))
    model = compact(base='laplacian', detail_gain=1.15, base_contrast=1.0).start_at_base()
    with torch.no_grad():
        assert torch.equal(model(ir, vi), laplacian_fuse(ir, vi, detail_gain=1.15))
    plain_config = S4FusionConfig.from_dict({**model.config.to_dict(), 'detail_gain': 1})
    assert plain_config.detail_gain == 1.0 and isinstance(plain_config.detail_gain, float)
    with pytest.raises(ValueError, match='detail_gain'):
        S4FusionConfig(detail_gain=1.15)  # the authors' network has no base to enhance
    with pytest.raises(ValueError, match='detail_gain'):
        S4FusionConfig(base='laplacian', detail_gain=0.0)


# Below 1 it flattens the base (a valid setting, > 0), above 1 it stretches it.
@pytest.mark.parametrize('contrast', [1.2, 0.6])
def test_base_contrast_stretches_each_images_base_about_its_own_mean(contrast):
    ir, vi = pair(37, 50, batch=2)
    ir[1] = ir[1] * 0.3  # a second, darker image: its mean must not move the first one's base
    bases_only = laplacian_fuse(ir, vi, detail_gain=0.0)
    stretched = laplacian_fuse(ir, vi, detail_gain=0.0, base_contrast=contrast)
    # Upsampling keeps constants, so the stretch about the coarse mean scales every deviation
    # and keeps the image's brightness (to the borders' rounding; 0.035 off about mid-gray).
    for image in range(2):
        deviation = bases_only[image] - bases_only[image].mean()
        torch.testing.assert_close(stretched[image] - stretched[image].mean(),
                                   contrast * deviation)
        assert abs(stretched[image].mean() - bases_only[image].mean()) < 1e-3
        torch.testing.assert_close(
            stretched[image:image + 1],
            laplacian_fuse(ir[image:image + 1], vi[image:image + 1], detail_gain=0.0,
                           base_contrast=contrast))
    # The details are added after the stretch, untouched by it.
    torch.testing.assert_close(
        laplacian_fuse(ir, vi, base_contrast=contrast) - stretched,
        laplacian_fuse(ir, vi) - bases_only)
    model = compact(base='laplacian', detail_gain=1.0, base_contrast=contrast).start_at_base()
    with torch.no_grad():
        assert torch.equal(model(ir, vi), laplacian_fuse(ir, vi, base_contrast=contrast))
    with pytest.raises(ValueError, match='base_contrast'):
        S4FusionConfig(base_contrast=1.2)  # the authors' network has no base
    with pytest.raises(ValueError, match='base_contrast'):
        S4FusionConfig(base='laplacian', base_contrast=float('inf'))


def test_laplacian_base_starts_as_the_pyramid_and_learns_a_correction():
    model = compact(base='laplacian')
    config = model.config
    ir, vi = pair(37, 50)
    base = laplacian_fuse(ir, vi, detail_gain=config.detail_gain,
                          base_contrast=config.base_contrast)
    with torch.no_grad():
        assert not torch.equal(model(ir, vi), base)
        assert torch.equal(model.start_at_base()(ir, vi), base)
    model(ir, vi).square().mean().backward()
    # The zeroed last layer still gets gradients, so training moves the output off the base.
    assert model.head.conv.weight.grad.abs().sum() > 0
    assert S4FusionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.preset_name() == 'compact'  # the CPU default refines the pyramid
    with pytest.raises(ValueError, match='base must be one of'):
        S4FusionConfig(base='wavelet')
    with pytest.raises(ValueError, match='needs a configuration with a base'):
        compact(base='none', detail_gain=1.0, base_contrast=1.0).start_at_base()


def test_float64_model_computes_its_pyramid_base_in_float64():
    """The base is computed in float32 at least, not at most: a float64 model's base was the
    float32 pyramid's, off by float32 rounding everywhere and, where that rounding flips a
    near-tie of the two details, by up to 0.038 (TNO 05)."""
    model = S4Fusion(S4FusionConfig.preset('compact'), device='cpu',
                     dtype=torch.float64).start_at_base()
    ir, vi = (image.double() for image in pair(37, 50))
    with torch.no_grad():
        out = model(ir, vi)
    assert out.dtype == torch.float64
    assert torch.equal(out, laplacian_fuse(ir, vi, detail_gain=model.config.detail_gain,
                                           base_contrast=model.config.base_contrast))


def test_device_and_dtype_are_honoured():
    torch.manual_seed(0)
    model = S4Fusion(S4FusionConfig.preset('compact'), device='cpu', dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    out = model.infer(*pair(13, 13))  # inputs are moved to the model's dtype
    assert out.dtype == torch.float32 and out.shape == (1, 1, 13, 13)


def test_infer_helper():
    model = compact().eval()
    ir, vi = pair(13, 16)
    with torch.no_grad():
        expected = model(ir, vi)
    out = model.infer(ir, vi, amp_dtype=torch.bfloat16)  # autocast is for CUDA only
    assert torch.equal(out, expected) and not out.requires_grad
    with pytest.raises(ValueError, match='amp_dtype'):
        model.infer(ir, vi, amp_dtype=torch.float64)
    # 8-bit images would fuse as 0-255, far outside what the network learned.
    with pytest.raises(TypeError, match='vi must be a floating-point image in \\[0, 1\\], got '
                       'torch.uint8'):
        model.infer(ir, (vi * 255).to(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_forward_matches_cpu():
    cpu = compact().eval()
    gpu = compact().eval().cuda()
    ir, vi = pair(37, 53)
    expected = cpu.infer(ir, vi)
    assert gpu.infer(ir, vi).device.type == 'cuda'
    assert torch.allclose(gpu.infer(ir, vi).cpu(), expected, atol=1e-3)
    half = gpu.infer(ir, vi, amp_dtype=torch.float16).cpu()
    assert math.isfinite(half.sum().item())
    assert torch.allclose(half, expected, atol=5e-2)


def test_half_precision_of_the_shipped_compact_weights_stays_finite_and_close(msrs_pair):
    """Their scan outputs reach 2e5 before the norm, past float16's 6.5e4: kept in float32 they
    stay finite; the Laplacian base stays in float32 under autocast (it is most of the image)."""
    import cv2
    from s4fusion_ros.model import load_checkpoint, shipped_weights
    ir, vi = msrs_pair
    ir, vi = (torch.from_numpy(image[:240, :320]).float()[None, None] / 255
              for image in (ir, cv2.cvtColor(vi, cv2.COLOR_BGR2YCrCb)[..., 0]))
    model = load_checkpoint(shipped_weights('compact'))
    expected = model.infer(ir, vi)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16):  # as on CUDA with half
        autocast = model(ir, vi).float()
    half = load_checkpoint(shipped_weights('compact'), dtype=torch.float16).infer(ir, vi)
    assert torch.isfinite(autocast).all() and torch.isfinite(half).all()
    assert (autocast - expected).abs().max() < 1e-3  # 0.02 with the base in float16
    assert (half - expected).abs().max() < 0.05
