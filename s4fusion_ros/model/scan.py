"""Selective scan with mamba-ssm's ``selective_scan_fn`` contract and interchangeable backends.

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = C_t . h_t + D u_t

Backends: 'mamba' (mamba-ssm's CUDA kernel, the optional extra ``[gpu]``), 'numba' (the CPU
inference kernel in scan_numba, no autograd) and 'torch' (the chunked PyTorch scan below, with
autograd; training and the fallback). ``selective_scan_sequential`` is the plain loop the tests
take as truth (float64 by default); ``selective_scan_ref`` follows mamba-ssm's reference of the
same name and is kept for the benchmark.
"""

import functools
import math

import torch
import torch.nn.functional as F

BACKENDS = ('mamba', 'numba', 'torch')
_EXP_FLOOR = -80.0


@functools.lru_cache(maxsize=None)
def mamba_scan_fn():
    """Return mamba-ssm's ``selective_scan_fn``, or None where it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError, RuntimeError):
        # Without CUDA even the import fails: the extension links against the CUDA runtime.
        return None
    return selective_scan_fn


@functools.lru_cache(maxsize=None)
def numba_scan_fn():
    """Return the numba kernel's entry point, or None where numba is not installed."""
    try:
        from .scan_numba import selective_scan_numba
    except ImportError:
        return None
    return selective_scan_numba


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def scan_backend(u, delta, A, B, C, D=None, delta_bias=None):
    """Name the backend ``selective_scan`` picks for these inputs when none is asked for."""
    if u.is_cuda:
        return 'mamba' if mamba_scan_fn() is not None else 'torch'
    if (u.device.type == 'cpu' and not _needs_grad(u, delta, A, B, C, D, delta_bias)
            and numba_scan_fn() is not None):
        return 'numba'
    return 'torch'


def selective_scan(u, delta, A, B, C, D=None, *, delta_bias=None, delta_softplus=False,
                   backend=None):
    """Selective scan, mamba-ssm's ``selective_scan_fn`` contract (without z and last state).

    Args:
        u, delta: (batch, d, L).
        A: (d, N), real (S4D-real initialisation makes it negative).
        B, C: (batch, groups, N, L) with groups dividing d, or (batch, N, L) for one group.
        D, delta_bias: (d,) or None.
        delta_softplus: apply softplus to delta + delta_bias.
        backend: 'mamba', 'numba', 'torch', or None / 'auto' for ``scan_backend``'s choice.

    Returns:
        y: (batch, d, L) in u's dtype.
    """
    _check_shapes(u, delta, A, B, C, D, delta_bias)
    if backend in (None, 'auto'):
        backend = scan_backend(u, delta, A, B, C, D, delta_bias)
    if backend == 'mamba':
        fn = mamba_scan_fn()
        if fn is None:
            raise RuntimeError('backend "mamba" needs mamba-ssm with CUDA (extra [gpu])')
        return fn(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus)
    if backend == 'numba':
        fn = numba_scan_fn()
        if fn is None:
            raise RuntimeError('backend "numba" needs numba installed')
        if u.device.type != 'cpu':
            raise ValueError(f'backend "numba" runs on CPU tensors, got {u.device}')
        if _needs_grad(u, delta, A, B, C, D, delta_bias):
            raise ValueError('backend "numba" has no autograd; use "torch" where gradients '
                             'are needed')
        args = [None if t is None else t.detach().float().numpy()
                for t in (u, delta, A, B, C, D, delta_bias)]
        # torch's thread count is the one knob for both. numba's OpenMP layer shares torch's
        # runtime and sets its thread count to NUMBA_NUM_THREADS when it starts: undo that.
        threads = torch.get_num_threads()
        y = fn(*args[:6], delta_bias=args[6], delta_softplus=delta_softplus, threads=threads)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return torch.from_numpy(y).to(u.dtype)
    if backend == 'torch':
        return selective_scan_chunked(u, delta, A, B, C, D, delta_bias, delta_softplus)
    raise ValueError(f'unknown backend {backend!r}; expected one of {BACKENDS} or "auto"')


def _check_shapes(u, delta, A, B, C, D, delta_bias):
    batch, d, length = u.shape
    nstate = A.shape[1]
    if delta.shape != u.shape or A.shape != (d, nstate):
        raise ValueError(f'u {tuple(u.shape)}, delta {tuple(delta.shape)} and A '
                         f'{tuple(A.shape)} do not fit (batch, d, L), (batch, d, L), (d, N)')
    groups = B.shape[1] if B.dim() == 4 else 1
    if (B.shape != C.shape or B.dim() not in (3, 4) or B.shape[0] != batch
            or B.shape[-2:] != (nstate, length) or d % groups):
        raise ValueError(f'B {tuple(B.shape)} and C {tuple(C.shape)} are not both '
                         f'(batch, groups, N, L) or (batch, N, L) with groups dividing d={d}')
    for name, t in (('D', D), ('delta_bias', delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f'{name} {tuple(t.shape)} is not (d,) = ({d},)')


def _prepare_delta(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if delta_softplus else delta


def _grouped(B, d):
    """(batch, groups, N, L) or (batch, N, L) -> (batch, d, N, L), each group's rows repeated."""
    if B.dim() == 3:
        B = B[:, None]
    return B.repeat_interleave(d // B.shape[1], dim=1)


def selective_scan_chunked(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                           chunk=None):
    """Chunked PyTorch selective scan; exact up to rounding, differentiable by autograd.

    L is cut into chunks of ``chunk`` (default ceil(sqrt(L))) positions. Pass 1 runs the
    recurrence through all chunks at once, position by position, each from a zero state. A short
    loop over the chunks then carries the true state across chunk ends, and each position's
    output is corrected by C_t . (P_t * carried state), with P_t = exp(A * cumsum(delta)) the
    decay since its chunk began. The exponents are never positive, so nothing overflows.
    Arguments as ``selective_scan``; computes in float32 or float64.
    """
    dtype_in = u.dtype
    dtype = torch.promote_types(dtype_in, torch.float32)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    delta = _prepare_delta(delta, None if delta_bias is None else delta_bias.to(dtype),
                           delta_softplus)
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    batch, d, length = u.shape
    groups, nstate = B.shape[1], B.shape[2]
    dg = d // groups
    size = chunk or math.isqrt(length - 1) + 1
    nchunks = -(-length // size)
    pad = nchunks * size - length
    if pad:
        # Zero padding at the end only affects positions that are cut off again.
        u, delta, B, C = (F.pad(t, (0, pad)) for t in (u, delta, B, C))

    # Position-in-chunk first, so each step reads contiguous slices. Chunk and channel keep
    # their order, which makes this a 2-D transpose (the cheap kind).
    def steps(t):
        # (batch, d, L) -> (T, batch, groups, dg, K, 1)
        t = t.reshape(-1, size).t().contiguous()
        return t.view(size, batch, groups, dg, nchunks, 1)

    def steps_bc(t):
        # (batch, groups, N, L) -> (T, batch, groups, 1, K, N)
        t = t.reshape(batch, groups, nstate, nchunks, size).permute(4, 0, 1, 3, 2)
        return t[:, :, :, None].contiguous()

    dt = steps(delta)
    du = dt * steps(u)
    b, c = steps_bc(B), steps_bc(C)
    a = A.reshape(groups, dg, 1, nstate)

    def decay(x):
        # exp(x * A), floored at exp(-80) ~ 2e-35: torch's exp takes a slow path where float32
        # underflows (x A < -87), several times slower over a whole scan, for no visible change.
        return (x * a).clamp_min_(_EXP_FLOOR).exp_()

    # Step by step, each step over all chunks: per-step temporaries stay in cache, which beat
    # fewer, larger ops over several steps here. (In place on du b: autograd does not need it.)
    h = dt.new_zeros(batch, groups, dg, nchunks, nstate)
    ys = []
    for j in range(size):
        h = (du[j] * b[j]).addcmul_(decay(dt[j]), h)
        ys.append((h * c[j]).sum(-1))  # (batch, groups, dg, K)

    # The true state entering each chunk, from the local end states and the chunks' decays.
    cum = steps(delta.reshape(batch, d, nchunks, size).cumsum(-1))
    p_end = decay(cum[-1])  # (batch, groups, dg, K, N)
    carry = [torch.zeros_like(h[:, :, :, 0])]
    for k in range(nchunks - 1):
        carry.append(h[:, :, :, k] + p_end[:, :, :, k] * carry[-1])
    carry = torch.stack(carry, dim=3)  # (batch, groups, dg, K, N)
    y = torch.stack([ys[j] + (decay(cum[j]) * carry * c[j]).sum(-1) for j in range(size)])

    # (T, batch, groups, dg, K) -> (batch, d, L)
    y = y.view(size, -1).t().reshape(batch, d, nchunks * size)[..., :length]
    if D is not None:
        y = y + D.to(dtype)[:, None] * u[..., :length]
    return y.to(dtype_in)


def selective_scan_sequential(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                              dtype=torch.float64):
    """Plain per-position loop computed in ``dtype`` (float64: the tests' reference).

    Arguments as ``selective_scan``; returns (batch, d, L) in ``dtype``.
    """
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    delta_bias = None if delta_bias is None else delta_bias.to(dtype)
    delta = _prepare_delta(delta, delta_bias, delta_softplus)
    d = u.shape[1]
    B, C = _grouped(B, d), _grouped(C, d)  # (batch, d, N, L)
    h = u.new_zeros(u.shape[0], d, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * u[:, :, t, None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    return y if D is None else y + D.to(dtype)[:, None] * u


def selective_scan_ref(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """mamba-ssm's ``selective_scan_ref`` (real A, variable B and C): exp(delta A) and
    delta B u materialised for all positions, then a Python loop with einsum. Float32.
    """
    dtype_in = u.dtype
    u, delta, A = u.float(), delta.float(), A.float()
    delta = _prepare_delta(delta, None if delta_bias is None else delta_bias.float(),
                           delta_softplus)
    d = u.shape[1]
    B, C = _grouped(B.float(), d), _grouped(C.float(), d)
    delta_a = torch.exp(torch.einsum('bdl,dn->bdln', delta, A))
    delta_b_u = torch.einsum('bdl,bdnl,bdl->bdln', delta, B, u)
    x = A.new_zeros(u.shape[0], d, A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum('bdn,bdn->bd', x, C[:, :, :, i]))
    y = torch.stack(ys, dim=2)
    y = y if D is None else y + u * D.float()[:, None]
    return y.to(dtype_in)
