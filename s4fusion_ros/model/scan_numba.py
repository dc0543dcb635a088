"""Selective scan for CPU inference: a numba kernel, forward only.

The work is split into blocks of channels inside one group (so every channel of a block shares
B_t and C_t), one block per parallel task. Inside a block the channel loop is innermost and
contiguous, so LLVM vectorises it; exp comes from a polynomial of our own because numba's exp
is a scalar libm call (it vectorises only with Intel SVML). Time is processed in tiles that
are transposed into (time, channel) scratch buffers on the way in and out.
"""

import os

import numpy as np

# numba reads NUMBA_CACHE_DIR at its first import; the installed package folder may be read-only,
# so the compiled kernel goes to a per-user cache unless the user chose a folder.
CACHE_DIR = os.environ.setdefault('NUMBA_CACHE_DIR', os.path.join(
    os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'),
    's4fusion_ros', 'numba'))

import numba  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

# If numba was imported before this module the variable came too late; its config is consulted
# when each cached function is defined, so set it there as well.
numba.config.CACHE_DIR = CACHE_DIR

# No 'reassoc': it would let LLVM fold the two-constant range reduction in _exp into one and
# lose accuracy; the channel loops have no reductions that would need it to vectorise.
_FASTMATH = {'nsz', 'arcp', 'contract', 'afn'}

_F32 = np.float32
_LOG2E = _F32(1.44269504088896341)
_LN2_HI = _F32(0.693359375)  # exact in few bits, so k * _LN2_HI is exact
_LN2_LO = _F32(-2.12194440e-4)
_EXP_MIN = _F32(-87.0)  # below this exp underflows to subnormals; return 0 instead
# Cephes expf minimax polynomial for exp(r) on |r| <= ln(2)/2 (relative error ~1e-7).
_P0 = _F32(1.9875691500e-4)
_P1 = _F32(1.3981999507e-3)
_P2 = _F32(8.3334519073e-3)
_P3 = _F32(4.1665795894e-2)
_P4 = _F32(1.6666665459e-1)
_P5 = _F32(5.0000001201e-1)
_ZERO = _F32(0.0)
_HALF = _F32(0.5)
_ONE = _F32(1.0)
_TWO = _F32(2.0)
_TILE = 32  # time steps per tile: 3 scratch buffers of 32 x 64 floats stay in L1


@intrinsic
def _pow2(typingctx, k):
    """Return 2**k for an integral float32 k in [-126, 128] (128 gives inf) from exponent bits."""
    if k != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        biased = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), ir.FloatType())

    return types.float32(types.float32), codegen


@numba.njit(inline='always', fastmath=_FASTMATH, cache=True)
def _exp(x):
    """exp(x) in float32, branch-free so loops vectorise; x < -87 gives 0 (no subnormals)."""
    k = np.floor(x * _LOG2E + _HALF)
    r = x - k * _LN2_HI - k * _LN2_LO
    p = _P0 * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    e = (p * r * r + r + _ONE) * _pow2(min(max(k, _F32(-126.0)), _F32(128.0)))
    return e if x >= _EXP_MIN else _ZERO


@numba.njit(inline='always', fastmath=_FASTMATH, cache=True)
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), safe for large |x|."""
    e = _exp(-abs(x))
    # log1p(e) = 2 atanh(s) with s = e / (2 + e) <= 1/3; the odd series to s**13 is below 1e-8.
    s = e / (_TWO + e)
    s2 = s * s
    p = _F32(1.0 / 13.0) * s2 + _F32(1.0 / 11.0)
    p = p * s2 + _F32(1.0 / 9.0)
    p = p * s2 + _F32(1.0 / 7.0)
    p = p * s2 + _F32(1.0 / 5.0)
    p = p * s2 + _F32(1.0 / 3.0)
    return max(x, _ZERO) + _TWO * s * (p * s2 + _ONE)


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _scan(u, delta, A, B, C, D, delta_bias, softplus, block):
    """Kernel on C-contiguous float32 arrays; see selective_scan_numba for the contract."""
    batch, d, length = u.shape
    groups, nstate = B.shape[1], B.shape[2]
    per_group = d // groups
    nblocks = (per_group + block - 1) // block
    y = np.empty_like(u)
    for task in numba.prange(batch * groups * nblocks):
        b = task // (groups * nblocks)
        g = task // nblocks % groups
        c0 = g * per_group + task % nblocks * block
        w = min(block, (g + 1) * per_group - c0)
        at = np.empty((nstate, w), np.float32)
        for n in range(nstate):
            for c in range(w):
                at[n, c] = A[c0 + c, n]
        h = np.zeros((nstate, w), np.float32)
        ut = np.empty((_TILE, w), np.float32)  # u, then delta * u
        dt = np.empty((_TILE, w), np.float32)  # delta
        yt = np.empty((_TILE, w), np.float32)
        bt = np.empty((_TILE, nstate), np.float32)
        ct = np.empty((_TILE, nstate), np.float32)
        for t0 in range(0, length, _TILE):
            nt = min(_TILE, length - t0)
            for c in range(w):
                for t in range(nt):
                    ut[t, c] = u[b, c0 + c, t0 + t]
                    dt[t, c] = delta[b, c0 + c, t0 + t]
            for n in range(nstate):
                for t in range(nt):
                    bt[t, n] = B[b, g, n, t0 + t]
                    ct[t, n] = C[b, g, n, t0 + t]
            for t in range(nt):
                # Per-position terms once, not once per state.
                for c in range(w):
                    x = dt[t, c] + delta_bias[c0 + c]
                    if softplus:
                        x = _softplus(x)
                    dt[t, c] = x
                    yt[t, c] = D[c0 + c] * ut[t, c]
                    ut[t, c] = x * ut[t, c]
                for n in range(nstate):
                    bn = bt[t, n]
                    cn = ct[t, n]
                    for c in range(w):
                        hn = _exp(dt[t, c] * at[n, c]) * h[n, c] + ut[t, c] * bn
                        h[n, c] = hn
                        yt[t, c] += cn * hn
            for c in range(w):
                for t in range(nt):
                    y[b, c0 + c, t0 + t] = yt[t, c]
    return y


def selective_scan_numba(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                         threads=None):
    """Selective scan on NumPy arrays (mamba-ssm's ``selective_scan_fn`` contract, no autograd).

    u, delta: (batch, d, L); A: (d, N); B, C: (batch, groups, N, L) or (batch, N, L), groups
    dividing d; D, delta_bias: (d,). ``threads`` caps the parallel threads (default: numba's
    setting). Computes in float32; returns (batch, d, L) float32.
    """
    def f32(a):
        return np.ascontiguousarray(a, dtype=np.float32)

    if threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    u, delta, A, B, C = f32(u), f32(delta), f32(A), f32(B), f32(C)
    if B.ndim == 3:
        B, C = B[:, None], C[:, None]
    batch, d = u.shape[:2]
    groups = B.shape[1]
    D = np.zeros(d, np.float32) if D is None else f32(D)
    delta_bias = np.zeros(d, np.float32) if delta_bias is None else f32(delta_bias)
    # 64 channels per task, fewer while that would leave threads idle.
    per_group = d // groups
    block = min(64, per_group)
    while block > 8 and batch * groups * -(-per_group // block) < numba.get_num_threads():
        block //= 2
    return _scan(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), block)
