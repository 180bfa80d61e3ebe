"""logdet of a regularised correlation matrix, with a hand-written backward.

The training hot path of the spectral volume penalty (DESIGN.md section 2). For A with m >= r rows of r
coordinates, C the centered A (columns minus their mean), S = C^T C, u_j = S_jj^(-1/2), U = diag(u) and
Z = C U (unit-norm columns), the correlation matrix is R = Z^T Z = U S U (the 1 / (m - 1) of the
covariance cancels) and

    value = logdet(M) / r,   M = R + eps * I = L L^T   (Cholesky, never SVD).

The backward is analytic instead of autograd through every intermediate. With G = M^-1 and
g_j = (G R)_jj (the diagonal terms come from u depending on S_jj):

    dvalue/dS = U (G - diag(g)) U / r,
    dvalue/dA = (2 / r) * center_columns((Z G - Z diag(g)) U),   g_j = 1 - ridge * G_jj = colsum(Z G * Z)_j,

computed as one product Z (G - diag(g)) U with G from the Cholesky factor, or, for square matrices with
r > 128, as two triangular solves for Z G. A forward plus backward thus costs two m x r x r products (the
Gram matrix and the gradient) plus O(r^3) for the factor and the inverse; autograd through the same
formula costs three products plus the Cholesky backward and keeps many m x r intermediates alive. Only Z,
the factor and three small vectors are saved.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.autograd.function import once_differentiable

__all__ = ["correlation_logdet"]

# Variance floor relative to the squared largest entry of the matrix: a coordinate whose variance is below
# it is numerically constant ("dead"). float32 rounding of a constant column's mean leaves ~1e-7 noise.
VAR_FLOOR = {torch.float32: 1e-10, torch.float64: 1e-24}
_CHOLESKY_TRIES = 4


def _factorize(M: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor of M (batch of r x r, modified in place), retried with growing jitter where it fails.

    Returns the factor and the ridge actually on the diagonal of every matrix (eps plus any jitter), `(B,)`.
    """
    r, dtype = M.shape[-1], M.dtype
    L, info = torch.linalg.cholesky_ex(M)
    ridge = torch.full(info.shape, eps, dtype=dtype, device=M.device)
    base = max(eps, r * torch.finfo(dtype).eps)
    for j in range(1, _CHOLESKY_TRIES + 1):
        if not bool(info.any()):
            break
        # The last try adds 1.0: R + I has eigenvalues >= 1 and always factorizes.
        jitter = 1.0 if j == _CHOLESKY_TRIES else base * 10.0**j
        added = jitter * (info != 0).to(dtype)
        M.diagonal(dim1=-2, dim2=-1).add_(added[..., None])
        ridge += added
        L, info = torch.linalg.cholesky_ex(M)
    return L, ridge


def _use_explicit_inverse(m: int, r: int) -> bool:
    """Whether the backward forms G = M^-1 (about r^3 multiply-adds) rather than solving with L.

    Two triangular solves cost m r^2 multiply-adds but run at about half the speed of a matrix product on
    CPU (and far slower for small r), and need two more passes over m x r arrays; with G in hand the whole
    gradient is one matrix product. The inverse wins when m >= 2 r or r is small, the solves for square
    matrices (measured on CPU, see docs/benchmarks.md).
    """
    return r <= 128 or m >= 2 * r


def _no_autocast(device_type: str):
    """A context without autocast, entered only when autocast is on (the common case costs nothing)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


class _CorrelationLogDet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A: torch.Tensor, eps: float, rows: torch.Tensor | None) -> torch.Tensor:
        m, r = A.shape[-2], A.shape[-1]
        # The value is scale invariant; dividing by the largest entry keeps tiny / huge scales finite.
        scale = torch.maximum(A.amax(dim=(-2, -1), keepdim=True), A.amin(dim=(-2, -1), keepdim=True).neg_())
        inv_scale = scale.clamp_min_(torch.finfo(A.dtype).tiny).reciprocal_()  # an all-zero A stays zero
        if rows is None:
            C = torch.sub(A, A.mean(dim=-2, keepdim=True)).mul_(inv_scale)
            floor = VAR_FLOOR[A.dtype] * max(m - 1, 1)
        else:  # matrix b has rows[b] rows; the rest is zero padding, kept at zero after centering
            count = rows.to(A.dtype)[:, None, None]
            valid = torch.arange(m, device=A.device)[None, :, None] < rows[:, None, None]
            C = torch.sub(A, A.sum(dim=-2, keepdim=True) / count).mul_(inv_scale * valid)
            floor = VAR_FLOOR[A.dtype] * (count[..., 0] - 1).clamp_min(1)
        S = C.mT @ C
        # dead coordinate: variance S_jj / (m - 1) below the floor; u_j = 0 gives it a zero row / column
        sq = S.diagonal(dim1=-2, dim2=-1)
        u = torch.where(sq > floor, sq.rsqrt(), 0.0)
        M = S.mul_(u.unsqueeze(-1)).mul_(u.unsqueeze(-2))  # R, in place of S
        M.diagonal(dim1=-2, dim2=-1).add_(eps)
        L, ridge = _factorize(M, eps)
        Z = C.mul_(u.unsqueeze(-2))  # C is not needed any more
        ctx.save_for_backward(Z, L, u, inv_scale, ridge, None if rows is None else count)
        return L.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1).mul_(2.0 / r)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        Z, L, u, inv_scale, ridge, count = ctx.saved_tensors
        m, r = Z.shape[-2], Z.shape[-1]

        def column_mean(X):  # over the valid rows; padded rows of Z and Z G are zero
            return X.mean(dim=-2, keepdim=True) if count is None else X.sum(dim=-2, keepdim=True) / count

        with _no_autocast(Z.device.type):
            # dvalue/dA = (2 / r) * center_columns(Z (G - diag(g)) U), times grad and 1 / scale
            column_scale = u * (grad.to(Z.dtype)[..., None] * inv_scale[..., 0] * (2.0 / r))
            if _use_explicit_inverse(m, r):
                G = torch.cholesky_inverse(L)
                diag = G.diagonal(dim1=-2, dim2=-1)
                diag.sub_(1.0 - ridge[..., None] * diag)  # g_j = (G R)_jj = 1 - ridge * G_jj, as R = M - ridge I
                H = G.mul_(column_scale.unsqueeze(-2))
                # one product; Z's columns have zero mean, so centering the result only removes round-off
                product = torch.baddbmm if Z.dim() == 3 else torch.addmm
                return product(-(column_mean(Z) @ H), Z, H), None, None
            Y = torch.linalg.solve_triangular(L.mT, Z, upper=True, left=False)
            Y = torch.linalg.solve_triangular(L, Y, upper=False, left=False)  # Z G
            g = torch.linalg.vecdot(Y, Z, dim=-2).unsqueeze_(-2)  # g_j = (G R)_jj, R = Z^T Z
            Y = Y.addcmul_(Z, g, value=-1.0).mul_(column_scale.unsqueeze(-2))
            return Y.sub_(column_mean(Y)), None, None


def correlation_logdet(A: torch.Tensor, eps: float = 1e-4, rows: torch.Tensor | None = None) -> torch.Tensor:
    """logdet(R + eps * I) / r of the correlation R of A's columns, for a batch of upright matrices.

    Args:
        A (`torch.Tensor` of shape `(B, m, r)` or `(m, r)`, m >= r):
            float32 or float64; m rows (samples) of r coordinates; may be a transposed view.
        eps (`float`, *optional*, defaults to `1e-4`):
            Ridge added to R.
        rows (`torch.Tensor` of shape `(B,)`, *optional*):
            Number of rows of each matrix when matrices with different row counts (and the same r) share
            one batch: matrix b is `A[b, :rows[b]]` and the rows below are zero padding. The Gram matrix
            of zero rows is zero, so padding changes nothing but the cost. Requires a 3-D `A`.

    Returns:
        `torch.Tensor` of shape `(B,)` or `()`, differentiable (first order) with respect to A (on padding
        rows the gradient is round-off, for the padding's own backward to drop). A dead coordinate
        (variance below `VAR_FLOOR` times the squared largest entry) has a zero row and column in R and zero
        gradient; matrices that still fail to factorize get extra jitter (see `log_volume`).
    """
    if A.dtype not in VAR_FLOOR:
        raise ValueError(f"correlation_logdet needs float32 or float64 input, got {A.dtype}; cast it first.")
    if A.shape[-2] < A.shape[-1]:
        raise ValueError(f"correlation_logdet needs m >= r rows, got shape {tuple(A.shape)}; transpose it.")
    if rows is not None and (A.dim() != 3 or rows.shape != A.shape[:1]):
        raise ValueError(f"rows needs shape ({A.shape[0]},) for a (B, m, r) batch; got {tuple(rows.shape)} for "
                         f"A of shape {tuple(A.shape)}.")
    with _no_autocast(A.device.type):
        return _CorrelationLogDet.apply(A, eps, rows)
