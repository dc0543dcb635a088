"""Cross-modal fusion: the S4Fusion fusion block and the CMSA layer built from it."""

import torch
from torch import nn

from .blocks import cross_merge, cross_scan, deinterleave, interleave, SS2D


class FusionBlock(SS2D):
    """SS2D over two modalities with one interleaved scan per direction (the paper's key idea).

    Shared by IR and VI (the inherited SS2D parameters): in_proj, conv2d, dt projections, A, D,
    out_norm, out_proj. Per modality: the projection that makes each token's (dt, B, C):
    ``x_proj_weight`` for IR and ``y_proj_weight`` for VI (the authors' names). A bias-free
    Linear(2 D -> D) of both modalities' features at the same position, the patch mark, is added
    to both streams. IR and VI tokens are interleaved one for one with their dt/B/C and ONE scan
    runs over the 2L sequence per direction, so every state update sees both modalities' context.
    """

    def __init__(self, d_model, d_state=18, d_conv=3, expand=1.5, device=None, dtype=None):
        super().__init__(d_model, d_state=d_state, d_conv=d_conv, expand=expand, device=device,
                         dtype=dtype)
        kw = {'device': device, 'dtype': dtype}
        self.y_proj_weight = nn.Parameter(torch.empty(self.x_proj_weight.shape, **kw))
        self.mark_proj = nn.Parameter(torch.empty(self.d_inner, 2 * self.d_inner, **kw))
        with torch.no_grad():
            bound = self.d_inner ** -0.5
            nn.init.uniform_(self.y_proj_weight, -bound, bound)
            bound = (2 * self.d_inner) ** -0.5  # nn.Linear's default, as the authors made it
            nn.init.uniform_(self.mark_proj, -bound, bound)

    def forward(self, ir, vi):
        """``(B, H, W, C) x 2 -> (B, H, W, C) x 2``: the IR and VI updates."""
        if self._fused_path(ir, vi):
            return self._forward_fused(ir, vi)
        ir, z_ir = self._project_in(ir)  # (B, D, H, W), (B, H, W, D)
        vi, z_vi = self._project_in(vi)
        height, width = ir.shape[2:]
        irs, vis = cross_scan(ir), cross_scan(vi)  # (B, K, D, L)
        # dt/B/C come from the unmarked features, the scanned inputs carry the mark (as released)
        dt_ir, b_ir, c_ir = self._scan_params(irs, self.x_proj_weight)
        dt_vi, b_vi, c_vi = self._scan_params(vis, self.y_proj_weight)
        # The mark is per position, so it is made once on the grid and scanned like the features.
        mark = cross_scan(torch.einsum('bchw,dc->bdhw', torch.cat([ir, vi], 1), self.mark_proj))
        # Reversed directions were flipped per modality by cross_scan; now interleave:
        # (B, K, D, L) x 2 -> (B, K, D, 2L) as ir_1, vi_1, ir_2, vi_2, ...
        ys = self._scan(interleave(irs + mark, vis + mark), interleave(dt_ir, dt_vi),
                        interleave(b_ir, b_vi), interleave(c_ir, c_vi))
        y_ir, y_vi = deinterleave(ys)  # (B, K, D, L) x 2
        y_ir, y_vi = (cross_merge(y, height, width).transpose(1, 2).reshape(z_ir.shape)
                      for y in (y_ir, y_vi))
        return self._project_out(y_ir, z_ir), self._project_out(y_vi, z_vi)

    def _forward_fused(self, ir, vi):
        """``forward`` for CPU inference, through ``_scan_grid``; equal to float32 rounding."""
        batch = ir.shape[0]
        # The shared projections run on both modalities as one batch.
        x, z = self._project_in(torch.cat([ir, vi]))  # (2 B, D, H, W), (2 B, H, W, D)
        xs = x.permute(0, 2, 3, 1).unflatten(0, (2, batch))  # (2, B, H, W, D)
        mark = torch.cat([xs[0], xs[1]], -1) @ self.mark_proj.t()  # (B, H, W, D)
        y = self._scan_grid(xs, [self.x_proj_weight, self.y_proj_weight], mark)
        out = self._project_out(y.flatten(0, 1), z)
        return out[:batch], out[batch:]


class CMSALayer(nn.Module):
    """Cross-Modal Spatial Awareness: fusion blocks update IR and VI residually; sums them."""

    def __init__(self, dim, depth=3, d_state=18, d_conv=3, expand=1.5, device=None, dtype=None):
        super().__init__()
        self.layers = nn.ModuleList(
            FusionBlock(dim, d_state=d_state, d_conv=d_conv, expand=expand, device=device,
                        dtype=dtype)
            for _ in range(depth))

    def forward(self, ir, vi):
        """``(B, H, W, C) x 2 -> (B, H, W, C)``."""
        for layer in self.layers:
            d_ir, d_vi = layer(ir, vi)
            ir, vi = ir + d_ir, vi + d_vi
        return ir + vi
