"""Selective scan with mamba-ssm's ``selective_scan_fn`` contract and interchangeable backends.

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = C_t . h_t + D u_t

Backends: 'mamba' (mamba-ssm's CUDA kernel, the optional extra ``[gpu]``), 'numba' (the CPU
kernels in scan_numba, with a backward kernel behind autograd for training) and 'torch' (the
chunked PyTorch scan below, differentiable by autograd; the fallback without numba).
``selective_scan_sequential`` is the plain loop the tests take as truth (float64 by default);
``selective_scan_ref`` follows mamba-ssm's reference of the same name and is kept for the
benchmark. ``cross_selective_scan`` is SS2D's whole four-direction scan in one numba kernel, the
model's CPU inference path.
"""

import functools
import math

import torch
import torch.nn.functional as F

BACKENDS = ('mamba', 'numba', 'torch')
_EXP_FLOOR = -80.0


@functools.lru_cache(maxsize=None)
def mamba_scan_fn():
    """Return mamba-ssm's ``selective_scan_fn``, or None where it or its kernel cannot be
    imported (newer mamba-ssm sources import without the kernel and fail at the first call)."""
    try:
        import selective_scan_cuda  # noqa: F401 - the compiled kernel itself
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


@functools.lru_cache(maxsize=None)
def numba_scan_backward_fn():
    """Return the numba backward kernel's entry point, or None where numba is not installed."""
    try:
        from .scan_numba import selective_scan_numba_backward
    except ImportError:
        return None
    return selective_scan_numba_backward


@functools.lru_cache(maxsize=None)
def numba_cross_scan_fn():
    """Return the numba four-direction grid kernel's entry point, or None without numba."""
    try:
        from .scan_numba import cross_selective_scan_numba
    except ImportError:
        return None
    return cross_selective_scan_numba


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _run_numba(fn, *args, **kwargs):
    """Call a numba entry point, tensors passed as float32 NumPy arrays, with torch's threads.

    Returns the entry point's array as a tensor, or a tuple of them where it returns a tuple.
    """
    def array(t):
        return t.detach().float().numpy() if torch.is_tensor(t) else t

    args = [array(t) for t in args]
    kwargs = {k: array(t) for k, t in kwargs.items()}
    # torch's thread count is the one knob for both. numba's OpenMP layer shares torch's
    # runtime and sets its thread count to NUMBA_NUM_THREADS when it starts: undo that.
    threads = torch.get_num_threads()
    out = fn(*args, threads=threads, **kwargs)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return tuple(map(torch.from_numpy, out)) if isinstance(out, tuple) else torch.from_numpy(out)


class NumbaSelectiveScan(torch.autograd.Function):
    """The numba scan with its backward kernel, for CPU training.

    The forward keeps the state at every 32nd position; the backward recomputes the states in
    between from them (scan_numba) instead of autograd storing every step of a PyTorch loop.
    Arguments as ``selective_scan`` (D and delta_bias may be None); computes in float32.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        """y (batch, d, L) in u's dtype."""
        y, states = _run_numba(numba_scan_fn(), u, delta, A, B, C, D, delta_bias=delta_bias,
                               delta_softplus=delta_softplus, keep_states=True)
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, states)
        return y.to(u.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        """Gradients of u, delta, A, B, C, D, delta_bias (None for absent ones); the kernel's
        gradients have no graph of their own, so a second derivative raises."""
        u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
        grads = _run_numba(numba_scan_backward_fn(), dy, states, u, delta, A, B, C, D,
                           delta_bias=delta_bias, delta_softplus=ctx.delta_softplus)
        inputs = (u, delta, A, B, C, D, delta_bias)
        return (*(None if t is None else g.to(t.dtype) for g, t in zip(grads, inputs)), None)


def scan_backend(u):
    """Name the backend ``selective_scan`` picks for input ``u`` when none is asked for.

    float64 goes to the PyTorch scan: the numba kernels compute in float32 and mamba-ssm's
    takes only float32, float16 and bfloat16.
    """
    if u.dtype == torch.float64:
        return 'torch'
    if u.is_cuda:
        return 'mamba' if mamba_scan_fn() is not None else 'torch'
    if u.device.type == 'cpu' and numba_scan_fn() is not None:
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
        backend = scan_backend(u)
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
            return NumbaSelectiveScan.apply(u, delta, A, B, C, D, delta_bias, delta_softplus)
        return _run_numba(fn, u, delta, A, B, C, D, delta_bias=delta_bias,
                          delta_softplus=delta_softplus).to(u.dtype)
    if backend == 'torch':
        return selective_scan_chunked(u, delta, A, B, C, D, delta_bias, delta_softplus)
    raise ValueError(f'unknown backend {backend!r}; expected one of {BACKENDS} or "auto"')


def cross_selective_scan(xs, x_dbl, dt_weight, dt_bias, A, Ds, mark=None):
    """SS2D's four-direction scan over channels-last grids in one numba kernel (CPU inference).

    The fused equivalent of cross_scan, interleave, ``selective_scan`` (delta_softplus, with the
    dt projection), deinterleave and cross_merge, without their copies; see
    ``scan_numba.cross_selective_scan_numba``. Directions k: row-major, column-major, both
    reversed. At each position the M modalities' tokens are scanned one after the other.

    Args:
        xs: (M, B, H, W, D) the scanned tokens of M modalities (before the mark).
        x_dbl: (M, B, H, W, K (R + 2N)) each token's dt (rank R), B and C for each direction.
        dt_weight: (K, D, R); dt_bias, Ds: (K, D); A: (K, D, N).
        mark: (B, H, W, D) added to every modality's scanned tokens, or None.

    Returns:
        (M, B, H, W, D) float32: per modality the sum of the four directions' outputs.
    """
    fn = numba_cross_scan_fn()
    if fn is None:
        raise RuntimeError('cross_selective_scan needs numba installed')
    height, width = xs.shape[2:4]
    y = _run_numba(fn, xs.flatten(2, 3), x_dbl.flatten(2, 3), dt_weight, dt_bias, A, Ds,
                   height, width, mark=None if mark is None else mark.flatten(1, 2))
    return y.view(xs.shape)


def _check_shapes(u, delta, A, B, C, D, delta_bias):
    batch, d, length = u.shape
    nstate = A.shape[1]
    if length < 1:  # every backend alike (the chunked scan cannot size its chunks)
        raise ValueError(f'u {tuple(u.shape)}: an empty sequence has nothing to scan')
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
    """Chunked PyTorch selective scan; exact up to rounding and the decay floor (a step's decay
    below exp(-80), float64 too, counts as exp(-80)), differentiable by autograd.

    L is cut into chunks of ``chunk`` (default ceil(sqrt(L))) positions. Pass 1 runs the
    recurrence through all chunks at once, position by position, each from a zero state. A short
    loop over the chunks then carries the true state across chunk ends, and pass 2 adds each
    position's share of it: C_t . g_t, where g_t is the carried state decayed up to t
    (g_t = exp(delta_t A) g_{t-1}, no input). With A < 0 and a positive delta (softplus), as
    Mamba's, the exponents are never positive, so nothing overflows. Arguments as
    ``selective_scan``; computes in float32 or float64.
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
        # (batch, d, L) -> (T, batch, groups, 1, dg, K)
        t = t.reshape(-1, size).t().contiguous()
        return t.view(size, batch, groups, 1, dg, nchunks)

    def steps_bc(t):
        # (batch, groups, N, L) -> (T, batch, groups, N, 1, K)
        t = t.reshape(batch, groups, nstate, nchunks, size).permute(4, 0, 1, 2, 3)
        return t[:, :, :, :, None].contiguous()

    dt = steps(delta)
    du = dt * steps(u)
    b, c = steps_bc(B), steps_bc(C)
    # exp(x A) as exp2(x A log2(e)): torch's exp2 is four times faster than its exp on CPU.
    a = A.reshape(groups, dg, nstate, 1).transpose(1, 2) * math.log2(math.e)  # (g, N, dg, 1)

    def decay(x, out=None):
        # exp(x * A), floored at exp(-80) ~ 2e-35: torch takes a slow path where float32
        # underflows (x A < -87), several times slower over a whole scan, for no visible change.
        return torch.mul(x, a, out=out).clamp_min_(_EXP_FLOOR * math.log2(math.e)).exp2_()

    # Step by step, each step over all chunks: per-step temporaries stay in cache, which beat
    # fewer, larger ops over several steps here. States are (batch, groups, N, dg, K): the sums
    # over N add whole slices. The carried state comes from the chunks' local end states h and
    # their whole decays p_end.
    shape = (batch, groups, nstate, dg, nchunks)
    p_end = decay(dt.sum(0))
    if _needs_grad(u, delta, A, B, C):
        # New tensors at each step, as autograd needs them (in place on du b only).
        h = dt.new_zeros(shape)
        ys = []
        for j in range(size):
            h = (du[j] * b[j]).addcmul_(decay(dt[j]), h)
            ys.append((h * c[j]).sum(2))  # (batch, groups, dg, K)
        carry = [torch.zeros_like(h[..., 0])]
        for k in range(nchunks - 1):
            carry.append(h[..., k] + p_end[..., k] * carry[-1])
        g = torch.stack(carry, dim=-1)
        for j in range(size):
            g = g * decay(dt[j])
            ys[j] = ys[j] + (g * c[j]).sum(2)
        y = torch.stack(ys)
    else:
        # The same in place in a few buffers, about a fifth faster without the allocations.
        h, e, hc, g = (dt.new_zeros(shape) for _ in range(4))
        y = dt.new_empty(size, batch, groups, dg, nchunks)
        for j in range(size):
            h.mul_(decay(dt[j], out=e)).addcmul_(du[j], b[j])
            torch.sum(torch.mul(h, c[j], out=hc), 2, out=y[j])
        for k in range(1, nchunks):
            torch.addcmul(h[..., k - 1], p_end[..., k - 1], g[..., k - 1], out=g[..., k])
        for j in range(size):
            g.mul_(decay(dt[j], out=e))
            y[j] += torch.mul(g, c[j], out=hc).sum(2)

    # (T, batch, groups, dg, K) -> (batch, d, L)
    y = y.view(size, -1).t().reshape(batch, d, nchunks * size)[..., :length]
    if D is not None:
        y = torch.addcmul(y, D.to(dtype)[:, None], u[..., :length])
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
