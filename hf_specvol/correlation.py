"""logdet of a regularised correlation matrix, with a hand-written backward.

The training hot path of the spectral volume penalty (DESIGN.md section 2). For A with m >= r rows of r
coordinates, C the centered A, S = C^T C, d_j = (S_jj / (m - 1))^(-1/2), D = diag(d) and
R = D S D / (m - 1) (the correlation matrix):

    value = logdet(M) / r,   M = R + eps * I = L L^T   (Cholesky, never SVD).

The backward is analytic instead of autograd through every intermediate. With G = M^-1, Z = C D (the
standardized coordinates) and g_j = (G R)_jj (the diagonal terms come from d depending on S_jj):

    dvalue/dS = D (G - diag(g)) D / (r (m - 1)),
    dvalue/dA = 2 / (r (m - 1)) * center_columns((Z G - Z diag(g)) D),   g = colsum(Z G * Z) / (m - 1),

where Z G = Z L^-T L^-1 comes from two triangular solves. A forward plus backward thus costs two
m x r x r products (the Gram matrix and the solves) and r^3 / 3 for the factor; autograd through the
same formula costs three products plus the Cholesky backward and keeps many m x r intermediates alive.
Only Z, the factor and two vectors are saved.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["correlation_logdet"]

# Variance floor relative to the squared largest entry of the matrix: a coordinate whose variance is below
# it is numerically constant ("dead"). float32 rounding of a constant column's mean leaves ~1e-7 noise.
VAR_FLOOR = {torch.float32: 1e-10, torch.float64: 1e-24}
_CHOLESKY_TRIES = 4


def _factorize(M: torch.Tensor, eps: float) -> torch.Tensor:
    """Cholesky factor of M (batch of r x r, modified in place), retried with growing jitter where it fails."""
    r, dtype = M.shape[-1], M.dtype
    L, info = torch.linalg.cholesky_ex(M)
    base = max(eps, r * torch.finfo(dtype).eps)
    for j in range(1, _CHOLESKY_TRIES + 1):
        failed = info != 0
        if not bool(failed.any()):
            break
        # The last try adds 1.0: R + I has eigenvalues >= 1 and always factorizes.
        jitter = 1.0 if j == _CHOLESKY_TRIES else base * 10.0**j
        M.diagonal(dim1=-2, dim2=-1).add_(jitter * failed[..., None].to(dtype))
        L, info = torch.linalg.cholesky_ex(M)
    return L


class _CorrelationLogDet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A: torch.Tensor, eps: float) -> torch.Tensor:
        m, r = A.shape[-2], A.shape[-1]
        denom = max(m - 1, 1)
        floor = VAR_FLOOR[A.dtype]
        # The value is scale invariant; dividing by the largest entry keeps tiny / huge scales finite.
        scale = torch.maximum(A.amax(dim=(-2, -1), keepdim=True), -A.amin(dim=(-2, -1), keepdim=True))
        inv_scale = torch.where(scale > 0, scale.reciprocal(), torch.ones_like(scale))
        C = torch.sub(A, A.mean(dim=-2, keepdim=True)).mul_(inv_scale)
        S = C.mT @ C
        var = S.diagonal(dim1=-2, dim2=-1) / denom
        alive = var > floor
        inv_std = torch.where(alive, var.clamp_min(floor).rsqrt(), torch.zeros_like(var))
        M = S.mul_(inv_std[..., :, None] * (inv_std[..., None, :] / denom))  # R, in place of S
        M.diagonal(dim1=-2, dim2=-1).add_(eps)  # dead coordinates: a zero row / column, eps on the diagonal
        L = _factorize(M, eps)
        Z = C.mul_(inv_std[..., None, :])  # standardized coordinates, Z^T Z = (m - 1) R; C is not kept
        ctx.save_for_backward(Z, L, inv_std, inv_scale)
        return 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1) / r

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        Z, L, inv_std, inv_scale = ctx.saved_tensors
        m, r = Z.shape[-2], Z.shape[-1]
        with torch.autocast(device_type=Z.device.type, enabled=False):
            # Y = Z G = Z L^-T L^-1 by two triangular solves (m r^2 multiply-adds, no explicit inverse).
            Y = torch.linalg.solve_triangular(L.mT, Z, upper=True, left=False)
            Y = torch.linalg.solve_triangular(L, Y, upper=False, left=False)
            g = (Y * Z).sum(dim=-2, keepdim=True) / max(m - 1, 1)  # g_j = (G R)_jj
            coef = (2.0 / (r * max(m - 1, 1))) * grad.to(Z.dtype)[..., None, None] * inv_scale
            # C H = (Z G - Z diag(g)) D; then the centering's backward removes the column means.
            Y = Y.addcmul_(Z, g, value=-1.0).mul_(inv_std[..., None, :] * coef)
            return Y.sub_(Y.mean(dim=-2, keepdim=True)), None


def correlation_logdet(A: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """logdet(R + eps * I) / r of the correlation R of A's columns, for a batch of upright matrices.

    Args:
        A (`torch.Tensor` of shape `(B, m, r)` or `(m, r)`, m >= r):
            float32 or float64; m rows (samples) of r coordinates; may be a transposed view.
        eps (`float`, *optional*, defaults to `1e-4`):
            Ridge added to R.

    Returns:
        `torch.Tensor` of shape `(B,)` or `()`, differentiable (first order) with respect to A. A dead
        coordinate (variance below `VAR_FLOOR` times the squared largest entry) has a zero row and column in
        R and zero gradient; matrices that still fail to factorize get extra jitter (see `log_volume`).
    """
    if A.dtype not in VAR_FLOOR:
        raise ValueError(f"correlation_logdet needs float32 or float64 input, got {A.dtype}; cast it first.")
    if A.shape[-2] < A.shape[-1]:
        raise ValueError(f"correlation_logdet needs m >= r rows, got shape {tuple(A.shape)}; transpose it.")
    with torch.autocast(device_type=A.device.type, enabled=False):
        return _CorrelationLogDet.apply(A, eps)
