"""Selective-scan backends against the float64 sequential scan, gradients, and dispatch."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from s4fusion_ros.model import S4Fusion, S4FusionConfig
from s4fusion_ros.model import scan as scan_module
from s4fusion_ros.model.blocks import cross_merge, cross_scan, deinterleave, interleave
from s4fusion_ros.model.scan import (cross_selective_scan, mamba_scan_fn, numba_scan_fn,
                                     scan_backend, selective_scan, selective_scan_chunked,
                                     selective_scan_ref, selective_scan_sequential)

TOL = 1e-4  # max abs error relative to max |y_ref|

needs_numba = pytest.mark.skipif(numba_scan_fn() is None, reason='numba is not installed')


def make_inputs(seed, batch, d, length, nstate, groups, *, softplus, use_d, use_bias,
                delta_scale=1.0, three_dim=False, dtype=torch.float32):
    """Inputs as a Mamba layer makes them at initialisation, with delta scaled up.

    dt starts log-uniform in [1e-3, 1e-1]: through softplus it comes from a bias (the inverse
    softplus of dt) plus the projection's small output; without softplus delta is dt itself.
    A is S4D-real, A_n = -n.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, d, length, generator=g)
    dt = torch.exp(torch.empty(d, 1).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
    dt = dt * delta_scale * torch.empty(batch, d, length).uniform_(0.5, 1.5, generator=g)
    if softplus:
        bias = dt.mean(dim=(0, 2))
        bias = bias + torch.log(-torch.expm1(-bias))  # inverse softplus
        delta = 0.1 * torch.randn(batch, d, length, generator=g)
        if not use_bias:
            delta, bias = delta + bias[:, None], None
    else:
        bias = 0.5 * dt.mean(dim=(0, 2)) if use_bias else None
        delta = dt if bias is None else dt - bias[:, None]
    A = -torch.arange(1, nstate + 1, dtype=torch.float32).repeat(d, 1)
    bc_shape = (batch, nstate, length) if three_dim else (batch, groups, nstate, length)
    B = torch.randn(bc_shape, generator=g)
    C = torch.randn(bc_shape, generator=g)
    D = torch.randn(d, generator=g) if use_d else None
    tensors = [None if t is None else t.to(dtype) for t in (u, delta, A, B, C, D)]
    return tensors, dict(delta_bias=None if bias is None else bias.to(dtype),
                         delta_softplus=softplus)


def random_case(seed):
    """Random shape, groups 1 or 4, options on or off, delta up to 50x its initial range."""
    g = torch.Generator().manual_seed(seed)

    def pick(n):
        return int(torch.randint(n, (1,), generator=g))

    groups = (1, 4)[pick(2)]
    options = dict(softplus=bool(pick(2)), use_d=bool(pick(2)), use_bias=bool(pick(2)),
                   delta_scale=(1.0, 10.0, 50.0)[pick(3)])
    return (seed, 1 + pick(2), groups * (1 + pick(40)), 1 + pick(300), 1 + pick(16), groups), \
        options


CASES = [random_case(seed) for seed in range(12)] + [
    # Fixed edge cases: one position, one state, blocks of 64 channels plus a remainder, a
    # length that is a multiple of the numba time tile, per-(batch, N, L) B and C.
    ((100, 1, 4, 1, 1, 1), dict(softplus=True, use_d=True, use_bias=True)),
    ((101, 2, 160, 70, 4, 1), dict(softplus=True, use_d=True, use_bias=True, delta_scale=50.0)),
    ((102, 1, 8, 64, 16, 4), dict(softplus=False, use_d=False, use_bias=False)),
    ((103, 2, 12, 45, 5, 1), dict(softplus=True, use_d=True, use_bias=True, three_dim=True)),
    # SS2D's first level as the authors' preset scans it: 4 groups (directions) of 72 channels,
    # each a block of 64 and one of 8 that must stop at its group's end.
    ((104, 1, 288, 40, 12, 4), dict(softplus=True, use_d=True, use_bias=True)),
]


def check_close(y, y_ref):
    assert y.shape == y_ref.shape
    assert torch.isfinite(y).all()
    scale = y_ref.abs().max().item()
    err = (y.double() - y_ref).abs().max().item()
    assert err <= TOL * scale, f'max error {err:.3g} vs output scale {scale:.3g}'


def ids(case):
    (seed, batch, d, length, nstate, groups), options = case
    flags = [flag for key, flag in (('softplus', 'softplus'), ('use_d', 'D'), ('use_bias', 'bias'),
                                    ('three_dim', '3d')) if options.get(key)]
    return '-'.join([f's{seed}', f'b{batch}d{d}L{length}N{nstate}g{groups}', *flags,
                     f'x{options.get("delta_scale", 1.0):g}'])


@needs_numba
@pytest.mark.parametrize('case', CASES, ids=ids)
def test_numba_matches_sequential(case):
    tensors, kwargs = make_inputs(*case[0], **case[1])
    check_close(selective_scan(*tensors, backend='numba', **kwargs),
                selective_scan_sequential(*tensors, **kwargs))


@pytest.mark.parametrize('case', CASES, ids=ids)
def test_chunked_matches_sequential(case):
    tensors, kwargs = make_inputs(*case[0], **case[1])
    y_ref = selective_scan_sequential(*tensors, **kwargs)
    length = tensors[0].shape[-1]
    # Default sqrt(L) chunks, one position per chunk, a size that does not divide L, one chunk.
    for chunk in (None, 1, 7, length):
        check_close(selective_scan_chunked(*tensors, chunk=chunk, **kwargs), y_ref)
    # With autograd the scan takes its out-of-place branch.
    u = tensors[0].clone().requires_grad_()
    check_close(selective_scan_chunked(u, *tensors[1:], chunk=7, **kwargs).detach(), y_ref)


def test_reference_matches_sequential():
    tensors, kwargs = make_inputs(5, 2, 8, 40, 6, 4, softplus=True, use_d=True, use_bias=True)
    check_close(selective_scan_ref(*tensors, **kwargs),
                selective_scan_sequential(*tensors, **kwargs))


@needs_numba
def test_more_threads_than_numba_has():
    """torch may be set to more threads than numba started with (NUMBA_NUM_THREADS, the
    cores): the kernels run on numba's, where numba.set_num_threads would raise."""
    import numba
    from s4fusion_ros.model.scan_numba import selective_scan_numba
    tensors, kwargs = make_inputs(14, 1, 8, 20, 4, 2, softplus=True, use_d=True, use_bias=True)
    y = selective_scan_numba(*(t.numpy() for t in tensors), kwargs['delta_bias'].numpy(),
                             delta_softplus=True, threads=numba.config.NUMBA_NUM_THREADS + 1)
    check_close(torch.from_numpy(y), selective_scan_sequential(*tensors, **kwargs))


@needs_numba
def test_huge_delta_stays_finite():
    """exp(delta A) far below float32's range must give 0, not NaN, in every CPU backend."""
    tensors, kwargs = make_inputs(7, 1, 8, 50, 16, 1, softplus=True, use_d=True, use_bias=True)
    kwargs['delta_bias'] = torch.full((8,), 1e4)
    y_ref = selective_scan_sequential(*tensors, **kwargs)
    for backend in ('numba', 'torch'):
        check_close(selective_scan(*tensors, backend=backend, **kwargs), y_ref)


def mamba_reference(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's ``selective_scan_ref`` (real A, B and C per position, z None) in float64,
    written from its published semantics and sharing no code with scan.py: bias, softplus
    (torch's, threshold 20), groups repeated as "B G N L -> B (G H) N L", exp(delta A) and
    delta B u for all positions, then the recurrence and C . x, plus D u."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d, length = u.shape

    def per_channel(t):  # (batch, [G,] N, L) -> (batch, G H = d, N, L)
        t = t[:, None] if t.dim() == 3 else t
        return t[:, :, None].expand(-1, -1, d // t.shape[1], -1, -1).flatten(1, 2)

    B, C = per_channel(B), per_channel(C)
    delta_a = torch.exp(torch.einsum('bdl,dn->bdln', delta, A))
    delta_b_u = torch.einsum('bdl,bdnl,bdl->bdln', delta, B, u)
    x = u.new_zeros(batch, d, A.shape[1])
    ys = []
    for i in range(length):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum('bdn,bdn->bd', x, C[..., i]))
    y = torch.stack(ys, dim=2)
    return y if D is None else y + u * D.double()[:, None]


EXTREME_CASES = [
    # (batch, d, L, N, groups), delta before any softplus (uniform low .. high), A scale,
    # softplus, D and bias, B/C as (batch, N, L). Softplus from -100 (dt ~ 0, underflow inside
    # softplus) across its threshold 20 to 40; A to -1e3 N (exp(delta A) far below float32's
    # range) without softplus; a VGA frame's token count (640 x 480 / 16) with small dt.
    ((2, 8, 70, 4, 2), (-100.0, 40.0), 1.0, True, True, False),
    ((3, 6, 45, 3, 3), (0.0, 5.0), 1e3, False, False, False),
    ((1, 4, 640 * 480 // 16, 2, 1), (-6.0, -3.0), 1.0, True, True, True),
]


@needs_numba
@pytest.mark.parametrize('case', EXTREME_CASES, ids=lambda c: 'b{}d{}L{}N{}g{}'.format(*c[0]))
def test_backends_match_an_independent_mamba_reference_at_extremes(case):
    (batch, d, length, nstate, groups), (low, high), a_scale, softplus, use_d, three_dim = case
    g = torch.Generator().manual_seed(length)
    u = torch.randn(batch, d, length, generator=g)
    delta = torch.empty(batch, d, length).uniform_(low, high, generator=g)
    A = -a_scale * torch.rand(d, nstate, generator=g) * torch.arange(1, nstate + 1)
    bc_shape = (batch, nstate, length) if three_dim else (batch, groups, nstate, length)
    B, C = torch.randn(bc_shape, generator=g), torch.randn(bc_shape, generator=g)
    D, bias = (torch.randn(d, generator=g) for _ in range(2)) if use_d else (None, None)
    kwargs = dict(delta_bias=bias, delta_softplus=softplus)
    y_ref = mamba_reference(u, delta, A, B, C, D, **kwargs)
    for scan in (functools.partial(selective_scan, backend='numba'),
                 functools.partial(selective_scan, backend='torch'),
                 functools.partial(selective_scan_chunked, chunk=33)):
        check_close(scan(u, delta, A, B, C, D, **kwargs), y_ref)


def test_chunked_gradcheck():
    (u, delta, A, B, C, D), kwargs = make_inputs(
        3, 1, 4, 7, 3, 2, softplus=True, use_d=True, use_bias=True, delta_scale=10.0,
        dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C, D, kwargs['delta_bias'])]

    def scan(u, delta, A, B, C, D, delta_bias):
        return selective_scan_chunked(u, delta, A, B, C, D, delta_bias, True, chunk=3)

    assert torch.autograd.gradcheck(scan, inputs)


@needs_numba
def test_dtype_round_trip():
    tensors, kwargs = make_inputs(9, 1, 8, 20, 4, 2, softplus=True, use_d=True, use_bias=True,
                                  dtype=torch.float64)
    y_ref = selective_scan_sequential(*tensors, **kwargs)
    for backend in ('numba', 'torch'):
        y = selective_scan(*tensors, backend=backend, **kwargs)
        assert y.dtype == torch.float64
        check_close(y, y_ref)
    # Unasked, float64 gets float64 accuracy: the numba kernels would compute in float32.
    assert scan_backend(tensors[0]) == 'torch'
    y = selective_scan(*tensors, **kwargs)
    assert (y - y_ref).abs().max() <= 1e-12 * y_ref.abs().max()


@needs_numba
def test_dispatch_on_cpu():
    """The CPU runs the numba kernels, with their backward where gradients are needed."""
    tensors, kwargs = make_inputs(11, 1, 8, 30, 4, 2, softplus=True, use_d=True, use_bias=True)
    numba_y = selective_scan(*tensors, backend='numba', **kwargs)

    assert scan_backend(tensors[0]) == 'numba'
    assert torch.equal(selective_scan(*tensors, **kwargs), numba_y)

    tensors[3].requires_grad_()  # B, as an upstream projection would give it
    assert scan_backend(tensors[0]) == 'numba'
    y = selective_scan(*tensors, **kwargs)
    assert type(y.grad_fn).__name__ == 'NumbaSelectiveScanBackward'
    assert torch.equal(y.detach(), numba_y)
    y_torch = selective_scan(*tensors, backend='torch', **kwargs)
    assert 'Numba' not in type(y_torch.grad_fn).__name__
    check_close(y_torch.detach(), numba_y)

    with torch.no_grad():
        assert torch.equal(selective_scan(*tensors, backend='auto', **kwargs), numba_y)


def test_without_numba_the_cpu_runs_the_torch_scan(monkeypatch):
    """Where numba is not installed the CPU falls back to the chunked scan, not to a backend
    that raises."""
    monkeypatch.setattr(scan_module, 'numba_scan_fn', lambda: None)
    tensors, kwargs = make_inputs(12, 1, 8, 30, 4, 2, softplus=True, use_d=True, use_bias=True)
    assert scan_backend(tensors[0]) == 'torch'
    check_close(selective_scan(*tensors, **kwargs), selective_scan_sequential(*tensors, **kwargs))


def numba_and_reference_gradients(case, options, seed=0):
    """Gradients of sum(y * w) for a random w: the numba backward (float32 inputs) and float64
    autograd through the sequential scan, for every input that exists."""
    tensors, kwargs = make_inputs(*case, **options)
    names = ['u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias']
    inputs = tensors + [kwargs['delta_bias']]
    weight = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(seed))

    def grads(dtype, scan):
        leaves = [None if t is None else t.to(dtype).requires_grad_() for t in inputs]
        y = scan(*leaves[:6], delta_bias=leaves[6], delta_softplus=kwargs['delta_softplus'])
        present = [(n, t) for n, t in zip(names, leaves) if t is not None]
        found = torch.autograd.grad((y * weight.to(dtype)).sum(), [t for _, t in present])
        return {n: g.double() for (n, _), g in zip(present, found)}

    numba = grads(torch.float32, functools.partial(selective_scan, backend='numba'))
    reference = grads(torch.float64, selective_scan_sequential)
    return numba, reference


GRADIENT_CASES = [
    # (seed, batch, d, L, N, groups), options: one and several tiles of 32, L not a multiple
    # of 32, B/C as (batch, N, L), no D or bias, delta without softplus, large delta.
    ((21, 2, 8, 75, 5, 4), dict(softplus=True, use_d=True, use_bias=True)),
    ((22, 1, 12, 20, 3, 1), dict(softplus=True, use_d=True, use_bias=True, three_dim=True)),
    ((23, 3, 6, 64, 4, 2), dict(softplus=False, use_d=False, use_bias=False)),
    ((24, 1, 70, 100, 8, 1), dict(softplus=True, use_d=True, use_bias=False, delta_scale=50.0)),
    ((25, 2, 16, 33, 2, 2), dict(softplus=False, use_d=True, use_bias=True, delta_scale=10.0)),
]


@needs_numba
@pytest.mark.parametrize('case', CASES + GRADIENT_CASES, ids=ids)
def test_numba_backward_matches_float64_autograd(case):
    numba, reference = numba_and_reference_gradients(*case)
    assert numba.keys() == reference.keys()
    for name, expected in reference.items():
        # dA is exactly 0 for L = 1 (no earlier state): then the error must be 0 too.
        error = (numba[name] - expected).abs().max() / expected.abs().max().clamp_min(1e-30)
        assert error < TOL, f'd{name}: max error {error:.2e} of max |d{name}|'


@needs_numba
def test_numba_backward_through_a_graph():
    """The autograd function composes: gradients reach the parameters behind u, B and delta,
    and a second backward through a fresh forward gives the same gradients."""
    tensors, kwargs = make_inputs(31, 2, 8, 40, 4, 2, softplus=True, use_d=True, use_bias=True)
    scale = torch.tensor(1.5, requires_grad=True)

    def loss(backend):
        u, delta, A, B, C, D = tensors
        y = selective_scan(u * scale, delta * scale, A, B * scale, C, D, backend=backend,
                           **kwargs)
        return (y ** 2).mean()

    grads = [torch.autograd.grad(loss(b), scale)[0] for b in ('numba', 'numba', 'torch')]
    assert torch.equal(grads[0], grads[1])
    assert torch.allclose(grads[0], grads[2], rtol=1e-4)


def test_bad_arguments():
    tensors, kwargs = make_inputs(13, 1, 6, 10, 4, 4, softplus=False, use_d=False,
                                  use_bias=False)
    with pytest.raises(ValueError, match='groups dividing d=6'):
        selective_scan(*tensors, **kwargs)
    tensors, kwargs = make_inputs(13, 1, 8, 10, 4, 4, softplus=False, use_d=False,
                                  use_bias=False)
    with pytest.raises(ValueError, match='unknown backend'):
        selective_scan(*tensors, backend='cuda', **kwargs)
    # An empty sequence: the chunked scan raised from math.isqrt, the numba one returned it.
    tensors, kwargs = make_inputs(13, 1, 8, 0, 4, 4, softplus=False, use_d=False,
                                  use_bias=False)
    for backend in ('torch', 'numba'):
        with pytest.raises(ValueError, match='an empty sequence has nothing to scan'):
            selective_scan(*tensors, backend=backend, **kwargs)


def grid_inputs(seed, nmod, batch, height, width, d, rank, nstate, use_mark):
    """Inputs of cross_selective_scan as an SS2D or fusion block at initialisation makes them."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(nmod, batch, height, width, d, generator=g)
    x_dbl = torch.randn(nmod, batch, height, width, 4 * (rank + 2 * nstate), generator=g)
    dt_weight = torch.empty(4, d, rank).uniform_(-rank ** -0.5, rank ** -0.5, generator=g)
    dt = torch.exp(torch.empty(4, d).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    A = -torch.arange(1, nstate + 1.0).repeat(4, d, 1) * torch.empty(4, d, 1).uniform_(
        0.5, 2, generator=g)
    Ds = torch.randn(4, d, generator=g)
    mark = torch.randn(batch, height, width, d, generator=g) if use_mark else None
    return xs, x_dbl, dt_weight, dt_bias, A, Ds, mark


def cross_scan_by_parts(xs, x_dbl, dt_weight, dt_bias, A, Ds, mark):
    """The torch path's composition in float64: cross_scan, interleave, a sequential scan per
    direction, deinterleave, cross_merge. ``(M, B, H, W, D) -> (M, B, H, W, D)``."""
    nmod, batch, height, width, d = xs.shape
    rank, nstate = dt_weight.shape[2], A.shape[2]
    xs, x_dbl = xs.double(), x_dbl.double()
    if mark is not None:
        xs = xs + mark.double()
    # (M, B, H, W, D) -> per modality (B, K, D, L); per direction k its own (dt, B, C) slice
    us = [cross_scan(x.permute(0, 3, 1, 2)) for x in xs]
    grids = x_dbl.unflatten(-1, (4, -1)).permute(0, 1, 4, 5, 2, 3)  # (M, B, K, c, H, W)
    dbls = [torch.stack([cross_scan(grid[:, k])[:, k] for k in range(4)], 1) for grid in grids]
    ys = []
    for k in range(4):
        seqs = []
        for u, dbl in zip(us, dbls):
            dt = torch.einsum('dr,brl->bdl', dt_weight[k].double(), dbl[:, k, :rank])
            seqs.append((u[:, k], dt, dbl[:, k, rank:rank + nstate], dbl[:, k, rank + nstate:]))
        if nmod == 2:
            seqs = [[interleave(a, b) for a, b in zip(*seqs)]]
        u, dt, B, C = seqs[0]
        y = selective_scan_sequential(u, dt, A[k], B, C, Ds[k], dt_bias[k], True)
        ys.append(deinterleave(y) if nmod == 2 else (y,))
    merged = [cross_merge(torch.stack(y_m, 1), height, width) for y_m in zip(*ys)]
    return torch.stack(merged).transpose(-1, -2).reshape(nmod, batch, height, width, d)


GRID_CASES = [
    # nmod, batch, height, width, d, rank, nstate, mark: one and two modalities, grids that are
    # not square, a single row, several time tiles, channels in one or two blocks (5 vectors of
    # 16 for d = 72) and partial vectors.
    (1, 1, 3, 5, 8, 1, 4, False),
    (1, 2, 9, 11, 72, 3, 12, False),
    (2, 1, 1, 7, 20, 2, 5, True),
    (2, 2, 6, 9, 40, 3, 6, True),
    (2, 1, 5, 4, 33, 2, 3, False),
]


@needs_numba
@pytest.mark.parametrize('case', GRID_CASES, ids=lambda c: 'm{}b{}h{}w{}d{}r{}n{}{}'.format(
    *c[:7], '-mark' if c[7] else ''))
def test_cross_scan_kernel_matches_the_torch_composition(case):
    inputs = grid_inputs(21, *case)
    check_close(cross_selective_scan(*inputs), cross_scan_by_parts(*inputs))


def mamba_contract_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, return_last_state=False):
    """A stand-in for mamba-ssm 2.x's ``selective_scan_fn``: its signature, the argument checks
    of its CUDA kernel (csrc/selective_scan/selective_scan.cpp, device checks aside), and the
    float64 sequential scan for the result, returned in u's dtype as the kernel returns it."""
    assert z is None and not return_last_state  # the project passes neither
    assert u.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert delta.dtype == u.dtype and A.dtype == torch.float32  # A: float (or complex) only
    batch, dim, length = u.shape
    assert delta.shape == u.shape and A.dim() == 2 and A.shape[0] == dim and A.shape[1] <= 256
    for t in (B, C):  # input-dependent B and C: the input's dtype, (batch, groups, N, L)
        grouped = t[:, None] if t.dim() == 3 else t
        assert t.dtype == u.dtype and grouped.shape == (batch, grouped.shape[1], A.shape[1],
                                                        length)
    for t in (D, delta_bias):
        assert t is None or (t.dtype == torch.float32 and t.shape == (dim,))
    y = selective_scan_sequential(u, delta, A, B, C, D, delta_bias, delta_softplus)
    return y.to(u.dtype)


@pytest.mark.parametrize('case', CASES[-4:], ids=ids)
def test_mamba_backend_passes_mamba_arguments(case, monkeypatch):
    """Without CUDA: selective_scan's 'mamba' backend calls selective_scan_fn as its kernel takes
    the arguments (D sixth, delta_bias by name, not into z's place)."""
    monkeypatch.setattr(scan_module, 'mamba_scan_fn', lambda: mamba_contract_scan_fn)
    tensors, kwargs = make_inputs(*case[0], **case[1])
    check_close(selective_scan(*tensors, backend='mamba', **kwargs),
                selective_scan_sequential(*tensors, **kwargs))


@pytest.mark.parametrize('preset, dtype, autocast', [('authors', torch.float32, False),
                                                     ('compact', torch.bfloat16, False),
                                                     ('compact', torch.float32, True)])
def test_model_through_the_mamba_backend(preset, dtype, autocast, monkeypatch):
    """Without CUDA: SS2D and the fusion blocks hand the kernel float32 u, delta, B, C, A, D and
    delta_bias in its layouts whatever the model's dtype or autocast, and get the torch path's
    output (the GPU tests run the real kernel)."""
    monkeypatch.setattr(scan_module, 'mamba_scan_fn', lambda: mamba_contract_scan_fn)
    torch.manual_seed(0)
    model = S4Fusion(S4FusionConfig.preset(preset), dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    ir, vi = (torch.rand(2, 1, 14, 23, generator=g, dtype=dtype) for _ in range(2))
    out = {}
    for backend in ('mamba', 'torch'):
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out[backend] = model.set_scan_backend(backend)(ir, vi).float()
    check_close(out['mamba'], out['torch'].double())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or mamba_scan_fn() is None,
                    reason='needs CUDA and mamba-ssm (extra [gpu])')
@pytest.mark.parametrize('case', CASES[:4] + CASES[-3:], ids=ids)
def test_mamba_matches_sequential(case):
    tensors, kwargs = make_inputs(*case[0], **case[1])
    y_ref = selective_scan_sequential(*tensors, **kwargs)
    cuda = [None if t is None else t.cuda() for t in tensors]
    kwargs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    assert scan_backend(cuda[0]) == 'mamba'
    check_close(selective_scan(*cuda, **kwargs).cpu(), y_ref)
    check_close(selective_scan(*cuda, backend='torch', **kwargs).cpu(), y_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or mamba_scan_fn() is None,
                    reason='needs CUDA and mamba-ssm (extra [gpu])')
@pytest.mark.parametrize('case', CASES[:4] + CASES[-3:], ids=ids)
def test_mamba_gradients_match_torch(case):
    """Training on a GPU runs mamba-ssm's backward kernel: its gradients equal autograd's
    through the chunked scan."""
    tensors, kwargs = make_inputs(*case[0], **case[1])
    weight = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(7)).cuda()
    grads = {}
    for backend in ('mamba', 'torch'):
        leaves = [None if t is None else t.cuda().requires_grad_() for t in tensors]
        options = {k: v.cuda().requires_grad_() if torch.is_tensor(v) else v
                   for k, v in kwargs.items()}
        (selective_scan(*leaves, backend=backend, **options) * weight).sum().backward()
        grads[backend] = [t.grad.cpu() for t in (*leaves, *options.values())
                          if torch.is_tensor(t)]
    for mamba, torch_grad in zip(grads['mamba'], grads['torch']):
        scale = torch_grad.abs().max().item() or 1.0
        assert (mamba - torch_grad).abs().max().item() <= 1e-3 * scale
