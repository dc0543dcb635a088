"""Selective scan with mamba-ssm's ``selective_scan_fn`` contract (placeholder: float reference only)."""

import torch


def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ; y_t = C_t h_t + D u_t.

    u, delta: (batch, d, L); A: (d, N); B, C: (batch, groups, N, L) or (batch, N, L);
    D, delta_bias: (d,). Returns (batch, d, L).
    """
    batch, d, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    groups = B.shape[1]
    B = B.repeat_interleave(d // groups, dim=1)  # (batch, d, N, L)
    C = C.repeat_interleave(d // groups, dim=1)
    h = u.new_zeros(batch, d, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[..., t] * u[:, :, t, None]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[None, :, None] * u
    return y
