"""Selective scan on the CPU: numba kernels for inference and for training (with a backward).

The work is split into blocks of channels inside one group (so every channel of a block shares
B_t and C_t), one block per parallel task. Inside a block the channel loop is innermost and
contiguous, so LLVM vectorises it; exp comes from a polynomial of our own because numba's exp
is a scalar libm call (it vectorises only with Intel SVML). Time is processed in tiles that
are transposed into (time, channel) scratch buffers on the way in and out.

For training the forward kernel also keeps the state at the start of every tile, and the
backward kernel walks the tiles in reverse: it recomputes a tile's states from the kept one
(in L2-sized scratch, as mamba-ssm's CUDA kernel recomputes per chunk instead of storing every
state) and then runs the adjoint recurrence through it.
"""

import logging
import os

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.caching import FunctionCache, IndexDataCacheFile
from numba.extending import intrinsic

# No 'reassoc': it would let LLVM fold the two-constant range reduction in _exp into one and
# lose accuracy; the channel loops have no reductions that would need it to vectorise.
_FASTMATH = {'nsz', 'arcp', 'contract', 'afn'}

_F32 = np.float32
_LOG2E = _F32(1.44269504088896341)
_LN2_HI = _F32(0.693359375)  # exact in few bits, so k * _LN2_HI is exact
_LN2_LO = _F32(-2.12194440e-4)
_EXP_MIN = _F32(-87.0)  # below this exp underflows to subnormals: floor there (1.6e-38)
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
_log = logging.getLogger(__name__)
_TILE = 32  # time steps per tile: 3 scratch buffers of 32 x 64 floats stay in L1
_LANES = 16  # channels per vector step of the grid kernel


def _cache_writable() -> bool:
    """Whether numba finds a writable folder to cache this file's kernels in (NUMBA_CACHE_DIR,
    the package's __pycache__ or the user's ~/.cache/numba).

    Without one, a kernel defined with cache=True raises at its definition ("cannot cache
    function '_exp': no locator available"): a node under a read-only home (a systemd service, a
    container) with a read-only installation did not start. Its kernels are then compiled in
    memory at each start instead (precompile.describe says so).
    """
    try:
        FunctionCache(_cache_writable)  # numba's own search for the folder, as at a definition
    except RuntimeError:
        return False
    return True


CACHE = _cache_writable()
# The kernels whose cache this process could not write (a full disk): compiled in memory only.
UNSAVED = set()
# The cache index files this process could not read, each warned of once.
_UNREADABLE = set()


def cache_folder() -> str | None:
    """The folder the kernels are cached in: the first of NUMBA_CACHE_DIR, the package's
    __pycache__ and ~/.cache/numba that numba could write (under a subfolder per source folder);
    None where none could."""
    return _cross_scan._cache.cache_path if CACHE else None


class _CacheFile(IndexDataCacheFile):
    """numba's index and data files of one kernel, where a damaged file is removed (one warning)
    and read as a miss: the kernel compiles again and numba's save writes the file afresh.

    numba writes each file whole and renames it into place, but without fsync: a power cut
    soon after the first compile can leave one empty or cut short. numba reads a missing data
    file as a miss, but a damaged file raised from the kernel's first call, at every start (the
    node exited with "Ran out of input") until someone deleted it.
    """

    def _load_index(self):
        try:
            return super()._load_index()
        except OSError as error:
            # Not damaged but unreadable: another user's file (umask 077) in a cache folder the
            # two share. numba raised it from the kernel's first call: the node did not start.
            _warn_unreadable(self._index_path, error)
            return {}  # a miss; the save writes the index afresh where the folder allows
        except Exception as error:  # unpickling damaged bytes raises almost anything
            _discard(self._index_path, error)  # removed: the save's reading finds none
            return {}

    def _load_data(self, name):
        try:
            return super()._load_data(name)
        except OSError:
            raise  # missing or unreadable: numba reads it as a miss
        except Exception as error:
            _discard(self._data_path(name), error)
            return None  # a miss; the save writes the index's file name again


def _warn_unreadable(path, error):
    if path not in _UNREADABLE:  # numba reads the index again to save the kernel
        _UNREADABLE.add(path)
        _log.warning('s4fusion_ros: cannot read the numba cache file %s (%s): the kernel '
                     'compiles again', path, error.strerror or error)


def _discard(path, error):
    _log.warning('s4fusion_ros: the numba cache file %s was damaged (%s: %s): removed, the '
                 'kernel compiles again', path, type(error).__name__, error)
    try:
        os.remove(path)
    except OSError:
        pass  # another process found it damaged too


class _KernelCache(FunctionCache):
    """numba's cache of one kernel on _CacheFile; a kernel it cannot save (a full disk) runs
    compiled in memory, as where no folder can hold the cache, instead of its call failing."""

    def __init__(self, py_func):
        super().__init__(py_func)
        self._cache_file = _CacheFile(self._cache_path, self._impl.filename_base,
                                      self._impl.locator.get_source_stamp())

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except OSError as error:
            UNSAVED.add(self._py_func.__name__)
            _log.warning(
                's4fusion_ros: could not cache the numba kernel %s in %s (%s): it runs compiled '
                'in memory, and the next start compiles it again', self._py_func.__name__,
                self._cache_path, error)


def _kernel(**options):
    """numba.njit with our cache where numba can cache (CACHE), else compiled in memory."""
    def define(py_func):
        dispatcher = numba.njit(**options)(py_func)
        if CACHE:
            dispatcher._cache = _KernelCache(py_func)  # what njit(cache=True) sets up
        return dispatcher
    return define


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


@_kernel(inline='always', fastmath=_FASTMATH)
def _exp(x):
    """exp(x) in float32, branch-free so loops vectorise; floored at exp(-87) (no subnormals),
    inf from x = 88.4 (float32 holds exp(x) to 88.7): the scans' exponents are not positive."""
    x = max(x, _EXP_MIN)
    k = np.floor(x * _LOG2E + _HALF)
    r = x - k * _LN2_HI - k * _LN2_LO
    p = _P0 * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    return (p * r * r + r + _ONE) * _pow2(min(k, _F32(128.0)))


@_kernel(inline='always', fastmath=_FASTMATH)
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


@_kernel(inline='always')
def _load_tile(u, delta, B, C, b, g, c0, t0, nt, ut, dt, bt, ct):
    """Copy time steps t0 .. t0 + nt of u and delta (channels c0 ..) and of B and C (group g)
    into the (time, channel) and (time, state) scratch buffers."""
    for c in range(ut.shape[1]):
        for t in range(nt):
            ut[t, c] = u[b, c0 + c, t0 + t]
            dt[t, c] = delta[b, c0 + c, t0 + t]
    for n in range(bt.shape[1]):
        for t in range(nt):
            bt[t, n] = B[b, g, n, t0 + t]
            ct[t, n] = C[b, g, n, t0 + t]


@_kernel(parallel=True, fastmath=_FASTMATH)
def _scan(u, delta, A, B, C, D, delta_bias, softplus, block, states):
    """Kernel on C-contiguous float32 arrays; see selective_scan_numba for the contract.

    ``states`` (batch, tiles, N, d) receives the state before each tile, or is empty (inference).
    """
    batch, d, length = u.shape
    groups, nstate = B.shape[1], B.shape[2]
    per_group = d // groups
    nblocks = (per_group + block - 1) // block
    keep_states = states.shape[0] > 0
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
            if keep_states:
                for n in range(nstate):
                    for c in range(w):
                        states[b, t0 // _TILE, n, c0 + c] = h[n, c]
            _load_tile(u, delta, B, C, b, g, c0, t0, nt, ut, dt, bt, ct)
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


@_kernel(fastmath=_FASTMATH | {'reassoc'})
def _channel_dots(m, first, v, nt, out):
    """``out[t, n] = sum_c m[first + t, n, c] v[t, c]`` for t < nt.

    A function of its own so that only these sums over channels may be reassociated (which
    lets them vectorise); the kernels' _exp must not be.
    """
    for t in range(nt):
        for n in range(m.shape[1]):
            acc = _ZERO
            for c in range(v.shape[1]):
                acc += m[first + t, n, c] * v[t, c]
            out[t, n] = acc


@_kernel(parallel=True, fastmath=_FASTMATH)
def _scan_backward(u, delta, A, B, C, D, delta_bias, softplus, block, states, dy):
    """Gradients of the scan; see selective_scan_numba_backward for the contract.

    Per tile, last first: the tile's states are recomputed from the one ``_scan`` kept, then
    the adjoint runs backwards through it. With g_t = dL/dh_t (from y_t and from h_{t+1}):
        g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}
        du_t = D dy_t + sum_n g_t dt_t B_t        ddt_t = sum_n g_t (B_t u_t + A e_t h_{t-1})
        dA += g_t dt_t e_t h_{t-1}   dB_t = sum_c g_t dt_t u_t   dC_t = sum_c dy_t h_t
    with e_t = exp(dt_t A); ddt goes through softplus' slope (the sigmoid) to delta and the bias.
    """
    batch, d, length = u.shape
    groups, nstate = B.shape[1], B.shape[2]
    per_group = d // groups
    nblocks = (per_group + block - 1) // block
    ntiles = (length + _TILE - 1) // _TILE
    du = np.empty_like(u)
    ddelta = np.empty_like(u)
    # Partial sums, one per task, that the caller adds up: dB and dC over a group's channel
    # blocks, dA, dD and the bias over the batch.
    dB = np.empty((nblocks, batch, groups, nstate, length), np.float32)
    dC = np.empty_like(dB)
    dA = np.empty((batch, d, nstate), np.float32)
    dD = np.empty((batch, d), np.float32)
    dbias = np.empty((batch, d), np.float32)
    for task in numba.prange(batch * groups * nblocks):
        b = task // (groups * nblocks)
        g = task // nblocks % groups
        blk = task % nblocks
        c0 = g * per_group + blk * block
        w = min(block, (g + 1) * per_group - c0)
        at = np.empty((nstate, w), np.float32)
        for n in range(nstate):
            for c in range(w):
                at[n, c] = A[c0 + c, n]
        carry = np.zeros((nstate, w), np.float32)  # exp(dt_{t+1} A) g_{t+1}
        acc_a = np.zeros((nstate, w), np.float32)
        acc_d = np.zeros(w, np.float32)
        acc_bias = np.zeros(w, np.float32)
        hs = np.empty((_TILE + 1, nstate, w), np.float32)  # hs[t + 1] = h_t, hs[0] before
        et = np.empty((_TILE, nstate, w), np.float32)  # exp(dt A), then g once used
        ut = np.empty((_TILE, w), np.float32)
        dt = np.empty((_TILE, w), np.float32)  # delta, then dt after bias and softplus
        slope = np.empty((_TILE, w), np.float32)  # d dt / d delta
        dut = np.empty((_TILE, w), np.float32)  # dt u
        gy = np.empty((_TILE, w), np.float32)
        gu = np.empty((_TILE, w), np.float32)
        gdt = np.empty((_TILE, w), np.float32)
        bt = np.empty((_TILE, nstate), np.float32)
        ct = np.empty((_TILE, nstate), np.float32)
        gbt = np.empty((_TILE, nstate), np.float32)
        gct = np.empty((_TILE, nstate), np.float32)
        for tile in range(ntiles - 1, -1, -1):
            t0 = tile * _TILE
            nt = min(_TILE, length - t0)
            _load_tile(u, delta, B, C, b, g, c0, t0, nt, ut, dt, bt, ct)
            for c in range(w):
                for t in range(nt):
                    gy[t, c] = dy[b, c0 + c, t0 + t]
            for n in range(nstate):
                for c in range(w):
                    hs[0, n, c] = states[b, tile, n, c0 + c]
            for t in range(nt):  # the forward pass again, as _scan computes it
                for c in range(w):
                    x = dt[t, c] + delta_bias[c0 + c]
                    if softplus:
                        e = _exp(-abs(x))
                        slope[t, c] = (_ONE if x >= _ZERO else e) / (_ONE + e)  # sigmoid
                        x = _softplus(x)
                    else:
                        slope[t, c] = _ONE
                    dt[t, c] = x
                    dut[t, c] = x * ut[t, c]
                for n in range(nstate):
                    bn = bt[t, n]
                    for c in range(w):
                        e = _exp(dt[t, c] * at[n, c])
                        et[t, n, c] = e
                        hs[t + 1, n, c] = e * hs[t, n, c] + dut[t, c] * bn
            for t in range(nt - 1, -1, -1):
                for c in range(w):
                    gu[t, c] = D[c0 + c] * gy[t, c]
                    gdt[t, c] = _ZERO
                    acc_d[c] += gy[t, c] * ut[t, c]
                for n in range(nstate):
                    bn = bt[t, n]
                    cn = ct[t, n]
                    for c in range(w):
                        gh = carry[n, c] + cn * gy[t, c]
                        q = gh * et[t, n, c] * hs[t, n, c]  # through exp(dt A) h_{t-1}
                        gu[t, c] += gh * dt[t, c] * bn
                        gdt[t, c] += gh * bn * ut[t, c] + q * at[n, c]
                        acc_a[n, c] += q * dt[t, c]
                        carry[n, c] = gh * et[t, n, c]
                        et[t, n, c] = gh
                for c in range(w):
                    gx = gdt[t, c] * slope[t, c]
                    gdt[t, c] = gx
                    acc_bias[c] += gx
            _channel_dots(et, 0, dut, nt, gbt)
            _channel_dots(hs, 1, gy, nt, gct)
            for c in range(w):
                for t in range(nt):
                    du[b, c0 + c, t0 + t] = gu[t, c]
                    ddelta[b, c0 + c, t0 + t] = gdt[t, c]
            for n in range(nstate):
                for t in range(nt):
                    dB[blk, b, g, n, t0 + t] = gbt[t, n]
                    dC[blk, b, g, n, t0 + t] = gct[t, n]
        for c in range(w):
            dD[b, c0 + c] = acc_d[c]
            dbias[b, c0 + c] = acc_bias[c]
            for n in range(nstate):
                dA[b, c0 + c, n] = acc_a[n, c]
    return du, ddelta, dA, dB, dC, dD, dbias


def _f32(array):
    return np.ascontiguousarray(array, dtype=np.float32)


def _use_threads(threads):
    """Run the next kernel on `threads` threads (0: numba's current setting)."""
    if threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def _scan_arrays(u, delta, A, B, C, D, delta_bias, threads):
    """The kernels' float32 C-contiguous arguments, B and C as (batch, groups, N, L), D and the
    bias as zeros where None, and the channels per task (64, fewer while threads would idle)."""
    _use_threads(threads)
    u, delta, A, B, C = _f32(u), _f32(delta), _f32(A), _f32(B), _f32(C)
    if B.ndim == 3:
        B, C = B[:, None], C[:, None]
    batch, d = u.shape[:2]
    groups = B.shape[1]
    D = np.zeros(d, np.float32) if D is None else _f32(D)
    delta_bias = np.zeros(d, np.float32) if delta_bias is None else _f32(delta_bias)
    per_group = d // groups
    block = min(64, per_group)
    while block > 8 and batch * groups * -(-per_group // block) < numba.get_num_threads():
        block //= 2
    return u, delta, A, B, C, D, delta_bias, block


def selective_scan_numba(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False,
                         threads=None, keep_states=False):
    """Selective scan on NumPy arrays (mamba-ssm's ``selective_scan_fn`` contract).

    u, delta: (batch, d, L); A: (d, N); B, C: (batch, groups, N, L) or (batch, N, L), groups
    dividing d; D, delta_bias: (d,). ``threads`` caps the parallel threads (default: numba's
    setting). Computes in float32; returns y (batch, d, L) float32, and with ``keep_states``
    also the states ``selective_scan_numba_backward`` needs: (batch, ceil(L / 32), N, d).
    """
    u, delta, A, B, C, D, delta_bias, block = _scan_arrays(u, delta, A, B, C, D, delta_bias,
                                                           threads)
    batch, d, length = u.shape
    shape = (batch, -(-length // _TILE), A.shape[1], d) if keep_states else (0, 0, 0, 0)
    states = np.empty(shape, np.float32)
    y = _scan(u, delta, A, B, C, D, delta_bias, bool(delta_softplus), block, states)
    return (y, states) if keep_states else y


def selective_scan_numba_backward(dy, states, u, delta, A, B, C, D=None, delta_bias=None,
                                  delta_softplus=False, threads=None):
    """Gradients of ``selective_scan_numba`` for the output gradient ``dy`` (batch, d, L).

    ``states`` is what the forward returned with ``keep_states``; the other arguments are the
    forward's. Returns float32 (du, ddelta, dA, dB, dC, dD, d_delta_bias) in the shapes of
    u, delta, A, B, C (3- or 4-dimensional as given), (d,) and (d,).
    """
    grouped = np.ndim(B) == 4
    u, delta, A, B, C, D, delta_bias, block = _scan_arrays(u, delta, A, B, C, D, delta_bias,
                                                           threads)
    du, ddelta, dA, dB, dC, dD, dbias = _scan_backward(
        u, delta, A, B, C, D, delta_bias, bool(delta_softplus), block,
        np.ascontiguousarray(states, dtype=np.float32), np.ascontiguousarray(dy, np.float32))
    dB, dC = dB.sum(0), dC.sum(0)
    if not grouped:
        dB, dC = dB[:, 0], dC[:, 0]
    return du, ddelta, dA.sum(0), dB, dC, dD.sum(0), dbias.sum(0)


@_kernel(parallel=True, fastmath=_FASTMATH)
def _cross_scan(x, mark, has_mark, x_dbl, dt_weight, dt_bias, A, Ds, height, width, nsub):
    """Kernel on C-contiguous float32 arrays; see cross_selective_scan_numba for the contract."""
    nmod, batch, length, d = x.shape
    rank = dt_weight.shape[2]
    nstate = A.shape[2]
    per_dir = rank + 2 * nstate
    block = nsub * _LANES  # channels per task
    nblocks = (d + block - 1) // block
    # One partial sum per layout (row-major, column-major), added at the end.
    y = np.empty((2, nmod, batch, length, d), np.float32)
    for task in numba.prange(2 * batch * nblocks):
        layout = task // (batch * nblocks)
        b = task // nblocks % batch
        c0 = task % nblocks * block
        w = min(block, d - c0)
        vecs = (w + _LANES - 1) // _LANES
        # Channel c of the block is [c // _LANES, c % _LANES] in the scratch arrays. Those past
        # d are zero-padded (dt A = 0, u = 0: h stays 0) and never written out.
        at = np.zeros((nstate, vecs, _LANES), np.float32)
        wt = np.zeros((rank, vecs, _LANES), np.float32)
        bias = np.zeros((vecs, _LANES), np.float32)
        skip = np.zeros((vecs, _LANES), np.float32)
        h = np.empty((nstate, vecs, _LANES), np.float32)
        dtv = np.empty((vecs, _LANES), np.float32)
        duv = np.empty((vecs, _LANES), np.float32)
        pos = np.empty(_TILE, np.int64)
        ut = np.zeros((_TILE, nmod, vecs, _LANES), np.float32)
        yt = np.empty((_TILE, nmod, vecs, _LANES), np.float32)
        rt = np.empty((_TILE, nmod, rank), np.float32)
        bt = np.empty((_TILE, nmod, nstate), np.float32)
        ct = np.empty((_TILE, nmod, nstate), np.float32)
        for k in (layout, layout + 2):  # forward, then reversed
            off = k * per_dir
            for c in range(w):
                v, i = divmod(c, _LANES)
                bias[v, i] = dt_bias[k, c0 + c]
                skip[v, i] = Ds[k, c0 + c]
                for n in range(nstate):
                    at[n, v, i] = A[k, c0 + c, n]
                for r in range(rank):
                    wt[r, v, i] = dt_weight[k, c0 + c, r]
            h[:] = _ZERO
            for t0 in range(0, length, _TILE):
                nt = min(_TILE, length - t0)
                # Gather the tile's tokens in scan order: s is the index in the direction's
                # sequence, p the row-major grid position it reads.
                for t in range(nt):
                    s = length - 1 - t0 - t if k >= 2 else t0 + t
                    p = s if layout == 0 else s % height * width + s // height
                    pos[t] = p
                    for m in range(nmod):
                        for c in range(w):
                            v, i = divmod(c, _LANES)
                            ut[t, m, v, i] = x[m, b, p, c0 + c]
                            if has_mark:
                                ut[t, m, v, i] += mark[b, p, c0 + c]
                        for r in range(rank):
                            rt[t, m, r] = x_dbl[m, b, p, off + r]
                        for n in range(nstate):
                            bt[t, m, n] = x_dbl[m, b, p, off + rank + n]
                            ct[t, m, n] = x_dbl[m, b, p, off + rank + nstate + n]
                # Modalities interleaved one for one: the state runs through (t, 0), (t, 1), ...
                # The innermost loops run over _LANES channels, a constant trip count that
                # LLVM vectorises whole (it leaves runtime remainders and loops of fewer than
                # 16 iterations scalar).
                for t in range(nt):
                    for m in range(nmod):
                        for v in range(vecs):
                            for i in range(_LANES):
                                dtv[v, i] = _ZERO
                            for r in range(rank):  # the dt projection, rank -> channels
                                coef = rt[t, m, r]
                                for i in range(_LANES):
                                    dtv[v, i] += coef * wt[r, v, i]
                            for i in range(_LANES):
                                dt = _softplus(dtv[v, i] + bias[v, i])
                                dtv[v, i] = dt
                                yt[t, m, v, i] = skip[v, i] * ut[t, m, v, i]
                                duv[v, i] = dt * ut[t, m, v, i]
                        for v in range(vecs):
                            for n in range(nstate):
                                bn = bt[t, m, n]
                                cn = ct[t, m, n]
                                for i in range(_LANES):
                                    hn = (_exp(dtv[v, i] * at[n, v, i]) * h[n, v, i]
                                          + duv[v, i] * bn)
                                    h[n, v, i] = hn
                                    yt[t, m, v, i] += cn * hn
                for t in range(nt):
                    for m in range(nmod):
                        for c in range(w):
                            v, i = divmod(c, _LANES)
                            if k < 2:
                                y[layout, m, b, pos[t], c0 + c] = yt[t, m, v, i]
                            else:
                                y[layout, m, b, pos[t], c0 + c] += yt[t, m, v, i]
    out = y[0]
    flat_out = out.reshape(-1)
    flat_cols = y[1].reshape(-1)
    for i in numba.prange(flat_out.size):
        flat_out[i] += flat_cols[i]
    return out


def cross_selective_scan_numba(x, x_dbl, dt_weight, dt_bias, A, Ds, height, width, mark=None,
                               threads=None):
    """SS2D's four-direction scan on channels-last token grids, merged; NumPy, no autograd.

    Directions k: 0 row-major, 1 column-major, 2 and 3 the same reversed. The tokens of the M
    modalities are interleaved one for one at each position (M = 1 for SS2D, 2 for the fusion
    block), and each direction's output is summed back at its grid position, as cross_scan,
    interleave, selective_scan, deinterleave and cross_merge do in the torch path, but read and
    written in place through index arithmetic, with the dt projection done on the fly.

    x: (M, B, L, D) tokens, L = height * width in row-major order. x_dbl: (M, B, L, K (R + 2N)),
    each token's projection for each direction k: dt in rank space (R), B (N), C (N).
    dt_weight: (K, D, R); dt_bias, Ds: (K, D); A: (K, D, N); mark: (B, L, D), added to every
    modality's scanned tokens (not to x_dbl's). delta is softplus(dt_weight x_dbl + dt_bias).
    Returns y (M, B, L, D) float32.
    """
    _use_threads(threads)
    has_mark = mark is not None
    mark = _f32(mark) if has_mark else np.zeros((0, 0, 0), np.float32)
    # Channels split evenly into blocks of at most 4 vectors (a task's per-token work is shared
    # by its channels), more blocks while there are fewer tasks than threads.
    batch, d = x.shape[1], x.shape[3]
    nvec = -(-d // _LANES)
    nblocks = -(-nvec // 4)
    while nblocks < nvec and 2 * batch * nblocks < numba.get_num_threads():
        nblocks += 1
    nsub = -(-nvec // nblocks)
    return _cross_scan(_f32(x), mark, has_mark, _f32(x_dbl), _f32(dt_weight), _f32(dt_bias),
                       _f32(A), _f32(Ds), height, width, nsub)
