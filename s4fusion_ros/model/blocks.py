"""Building blocks of S4Fusion, laid out as VMamba (v0) and the authors' code lay them out.

Token maps are channels-last ``(B, H, W, C)`` between blocks, as in VMamba; the selective scan
works on ``(B, K * D, L)`` with ``K = 4`` scan directions. CPU inference takes a fused path
instead (``SS2D._scan_grid``): one numba kernel scans the directions straight from the
channels-last grid, with the same result to float32 rounding. Parameter names and shapes follow
the authors' code, so their state dict maps onto these modules by renaming a few prefixes only
(see ``checkpoint.convert_authors_state_dict``).
"""

import math

import torch
from torch import nn
import torch.nn.functional as F

from .scan import cross_selective_scan, numba_cross_scan_fn, selective_scan


def cross_scan(x):
    """Unfold a grid into the four scan orders.

    ``(B, D, H, W) -> (B, 4, D, H * W)``: row-major, column-major, then both reversed.
    """
    batch, d, height, width = x.shape
    # Filled in place: stack/cat of these views costs several extra passes over the tensor.
    xs = x.new_empty(batch, 4, d, height * width)
    xs[:, 0] = x.flatten(2)
    xs[:, 1] = x.transpose(2, 3).flatten(2)  # column-major: the transpose, read row-major
    xs[:, 2:] = xs[:, :2].flip(-1)
    return xs


def cross_merge(ys, height, width):
    """Map the four scan orders back to row-major order and sum them.

    ``(B, 4, D, H * W) -> (B, D, H * W)``; the inverse of ``cross_scan`` per direction.
    """
    batch, _, d, length = ys.shape
    rows = ys[:, 0] + ys[:, 2].flip(-1)  # undo the reversals
    cols = ys[:, 1] + ys[:, 3].flip(-1)
    # column-major (B, D, W, H) -> row-major (B, D, H, W)
    return rows + cols.reshape(batch, d, width, height).transpose(2, 3).reshape(batch, d, length)


def interleave(a, b):
    """Interleave two token sequences one for one: ``(..., L) x 2 -> (..., 2L)``, a first."""
    return torch.stack([a, b], dim=-1).flatten(-2)


def deinterleave(ab):
    """Split an interleaved sequence: ``(..., 2L) -> (..., L) x 2``; the inverse of interleave."""
    return ab[..., 0::2], ab[..., 1::2]


class PatchEmbed(nn.Module):
    """One-channel image to tokens: Conv2d(1 -> C, kernel 4, stride 3) + LayerNorm.

    The overlapping 4x4 patches at stride 3 turn a side of 12k + 1 pixels into 4k tokens.
    """

    def __init__(self, embed_dim, patch_size=4, stride=3, in_chans=1, device=None, dtype=None):
        super().__init__()
        kw = {'device': device, 'dtype': dtype}
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, **kw)
        self.norm = nn.LayerNorm(embed_dim, **kw)

    def forward(self, x):
        """``(B, 1, H, W) -> (B, h, w, C)``."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SS2D(nn.Module):
    """2-D selective scan (VMamba v0): four-direction Mamba mixer over a token grid.

    in_proj makes x and the gate z; x goes through a depthwise conv and SiLU, then four
    selective scans (one per direction, each with its own dt/B/C projection, dt projection, A
    and D), whose outputs are mapped back to the grid and summed, normalised and gated by SiLU(z).
    """

    def __init__(self, d_model, d_state=12, d_conv=3, expand=1.5, dt_min=0.001, dt_max=0.1,
                 dt_init_floor=1e-4, device=None, dtype=None):
        super().__init__()
        kw = {'device': device, 'dtype': dtype}
        self.d_state = d_state
        self.d_inner = d_inner = int(expand * d_model)
        self.dt_rank = dt_rank = math.ceil(d_model / 16)
        k = 4

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False, **kw)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2,
                                groups=d_inner, **kw)
        # Per direction: tokens -> (dt in rank space, B, C); then dt rank -> d_inner.
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner, **kw))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank, **kw))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner, **kw))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state, **kw))
        self.Ds = nn.Parameter(torch.empty(k * d_inner, **kw))
        self.out_norm = nn.LayerNorm(d_inner, **kw)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **kw)
        # None picks per call (scan.scan_backend, and the fused grid kernel for CPU inference);
        # a name forces that backend, e.g. to compare backends (S4Fusion.set_scan_backend).
        self.scan_backend = None
        # On the meta device (load_checkpoint's shape check) values mean nothing, and its
        # random ops would import torch._dynamo and sympy: 0.8 s of every model load.
        if self.A_logs.device.type != 'meta':
            self._init_ssm(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _init_ssm(self, dt_min, dt_max, dt_init_floor):
        """Mamba's initialisation: S4D-real A, D = 1, softplus(dt bias) in [dt_min, dt_max]."""
        bound = self.d_inner ** -0.5  # nn.Linear's default for the stacked x projections
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        bound = self.dt_rank ** -0.5  # preserves variance through the low-rank dt projection
        nn.init.uniform_(self.dt_projs_weight, -bound, bound)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        n = torch.arange(1, self.d_state + 1, device=self.A_logs.device)
        self.A_logs.copy_(torch.log(n.to(self.A_logs.dtype)).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def _scan_params(self, xs, proj_weight):
        """Per-token dt, B, C of cross-scanned tokens ``xs`` (B, K, D, L).

        Returns dt (B, K, D, L) before bias and softplus, B and C (B, K, N, L).
        """
        x_dbl = torch.einsum('bkdl,kcd->bkcl', xs, proj_weight)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        return torch.einsum('bkrl,kdr->bkdl', dts, self.dt_projs_weight), bs, cs

    def _scan(self, us, dts, bs, cs):
        """Run the four directions' scans at once: u and dt (B, K, D, L'), B and C (B, K, N, L')
        -> (B, K, D, L') float32 (merged and normed in float32 too: see ``_project_out``)."""
        batch, k, d, length = us.shape
        # float32 scan whatever the autocast or model dtype, as the authors do
        ys = selective_scan(
            us.float().reshape(batch, k * d, length), dts.float().reshape(batch, k * d, length),
            -torch.exp(self.A_logs.float()), bs.float().contiguous(), cs.float().contiguous(),
            self.Ds.float(), delta_bias=self.dt_projs_bias.float().flatten(),
            delta_softplus=True, backend=self.scan_backend)
        return ys.reshape(batch, k, d, length)

    def _project_in(self, x):
        """``(B, H, W, C) -> x (B, D, H, W) after conv and SiLU, z (B, H, W, D)``."""
        x, z = self.in_proj(x).chunk(2, dim=-1)
        return F.silu(self.conv2d(x.permute(0, 3, 1, 2))), z

    def _project_out(self, y, z):
        """``y, z (B, H, W, D) -> (B, H, W, C)``. The norm runs in float32 whatever the model
        or autocast dtype, as the authors': trained scan outputs pass float16's range (6.5e4)
        before it (the shipped compact weights reach 2e5), and would become inf, then NaN."""
        norm = self.out_norm
        y = F.layer_norm(y.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(),
                         norm.eps)
        return self.out_proj(y.to(z.dtype) * F.silu(z))

    def _fused_path(self, *inputs):
        """Whether ``_scan_grid`` runs: CPU float32 inference (no autograd) with numba, unless
        another backend is forced."""
        x = inputs[0]
        return (self.scan_backend in (None, 'numba')
                and x.device.type == 'cpu' and x.dtype == torch.float32
                and not (torch.is_grad_enabled()
                         and any(t.requires_grad for t in (*inputs, *self.parameters())))
                and numba_cross_scan_fn() is not None)

    def _scan_grid(self, xs, proj_weights, mark=None):
        """The CPU inference path of the scan: ``(M, B, H, W, D) -> (M, B, H, W, D)``.

        One numba kernel reads each direction's (and modality's) tokens from the channels-last
        grids through index arithmetic and sums the directions' outputs in place, instead of
        cross_scan, interleave, deinterleave and cross_merge copies. Equals the torch path to
        float32 rounding. ``proj_weights``: each modality's x projection; ``mark`` (B, H, W, D).
        """
        k, c, d = self.x_proj_weight.shape
        weight = torch.stack([w.reshape(k * c, d) for w in proj_weights])  # (M, K c, D)
        # A token's (dt, B, C) for a direction does not depend on the order it is scanned in,
        # so all four come from the grid: (M, B H W, D) -> (M, B H W, K c)
        x_dbl = torch.matmul(xs.flatten(1, 3), weight.transpose(1, 2))
        return cross_selective_scan(
            xs, x_dbl.view(*xs.shape[:4], k * c), self.dt_projs_weight, self.dt_projs_bias,
            -torch.exp(self.A_logs.float()).view(k, d, self.d_state), self.Ds.view(k, d), mark)

    def forward(self, x):
        """``(B, H, W, C) -> (B, H, W, C)``."""
        x, z = self._project_in(x)  # (B, D, H, W), (B, H, W, D)
        if self._fused_path(x):
            # the conv's output is channels-last in memory: the permute is free
            y = self._scan_grid(x.permute(0, 2, 3, 1)[None], [self.x_proj_weight])[0]
        else:
            height, width = x.shape[2:]
            xs = cross_scan(x)  # (B, K, D, L)
            ys = self._scan(xs, *self._scan_params(xs, self.x_proj_weight))
            y = cross_merge(ys, height, width).transpose(1, 2).reshape(z.shape)
        return self._project_out(y, z)


class VSSBlock(nn.Module):
    """VSS block without MLP, as S4Fusion uses it: ``x + SS2D(LayerNorm(x))``."""

    def __init__(self, dim, d_state=12, d_conv=3, expand=1.5, device=None, dtype=None):
        super().__init__()
        kw = {'device': device, 'dtype': dtype}
        self.ln_1 = nn.LayerNorm(dim, **kw)
        self.self_attention = SS2D(dim, d_state=d_state, d_conv=d_conv, expand=expand, **kw)

    def forward(self, x):
        """``(B, H, W, C) -> (B, H, W, C)``."""
        return x + self.self_attention(self.ln_1(x))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (4C), LayerNorm, Linear 4C -> 2C."""

    def __init__(self, dim, device=None, dtype=None):
        super().__init__()
        kw = {'device': device, 'dtype': dtype}
        self.norm = nn.LayerNorm(4 * dim, **kw)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False, **kw)

    def forward(self, x):
        """``(B, H, W, C) -> (B, H/2, W/2, 2C)``; H and W must be even."""
        # Swin's neighbour order: (0, 0), (1, 0), (0, 1), (1, 1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """Linear C -> 2C, pixel shuffle x2, LayerNorm: ``(B, H, W, C) -> (B, 2H, 2W, C/2)``."""

    def __init__(self, dim, device=None, dtype=None):
        super().__init__()
        kw = {'device': device, 'dtype': dtype}
        self.expand = nn.Linear(dim, 2 * dim, bias=False, **kw)
        self.norm = nn.LayerNorm(dim // 2, **kw)

    def forward(self, x):
        """``(B, H, W, C) -> (B, 2H, 2W, C/2)``."""
        batch, height, width, dim = x.shape
        # (B, H, W, (2, 2, C/2)) -> (B, H, 2, W, 2, C/2) -> (B, 2H, 2W, C/2)
        x = self.expand(x).reshape(batch, height, width, 2, 2, dim // 2)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, 2 * height, 2 * width, dim // 2)
        return self.norm(x)


class VSSLayer(nn.Module):
    """One stage at width ``dim``: optional PatchExpand, VSS blocks, optional PatchMerging.

    Encoder stages merge (to 2 dim) after their blocks; decoder stages with ``upsample`` take
    2 dim channels and expand them to dim at twice the resolution before their blocks.
    """

    def __init__(self, dim, depth, d_state=12, d_conv=3, expand=1.5, downsample=False,
                 upsample=False, device=None, dtype=None):
        super().__init__()
        kw = {'device': device, 'dtype': dtype}
        self.upsample = PatchExpand(2 * dim, **kw) if upsample else None
        self.blocks = nn.ModuleList(
            VSSBlock(dim, d_state=d_state, d_conv=d_conv, expand=expand, **kw)
            for _ in range(depth))
        self.downsample = PatchMerging(dim, **kw) if downsample else None

    def forward(self, x):
        """``(B, H, W, C_in) -> (B, H', W', C_out)``."""
        if self.upsample is not None:
            x = self.upsample(x)
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x
