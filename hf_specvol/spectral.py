"""Spectral quantities of weight matrices: correlation log-volume, penalty, effective and stable rank.

Pure math (modules / tensors in, tensors / numbers out); the formulas are the contract of DESIGN.md
section 2. Every matrix is taken *as applied*, ``y = W x``, with shape ``(out, in)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .correlation import correlation_logdet

__all__ = [
    "effective_rank",
    "layer_statistics",
    "log_volume",
    "matrix_scope",
    "log_volumes",
    "psd_effective_rank",
    "spectral_penalty",
    "spectrum_effective_rank",
    "stable_rank",
    "weight_matrices",
]



def _embedding_param_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters of the input and output embeddings (LM head), tied or not."""
    ids: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(module, nn.Module):
            ids.update(id(p) for p in module.parameters())
    return ids


def _is_experts(module: nn.Module) -> bool:
    return not isinstance(module, nn.modules.conv._ConvNd) and (
        hasattr(module, "num_experts") or "expert" in type(module).__name__.lower()
    )


def weight_matrices(
    model: nn.Module, include: str | None = None, exclude: str | None = None
) -> dict[str, torch.Tensor]:
    """Collect the weight matrices in scope, as applied (``y = W x``), with gradient flow.

    In scope: the 2-D weight of every `nn.Linear`, of transformers' `Conv1D` (stored `(in, out)`, returned
    transposed), of MoE routers (modules whose class name contains "Router", weight `(num_experts, hidden)`
    applied with `F.linear`), and every expert of 3-D expert parameters (transformers 5 `*Experts` modules,
    e.g. `gate_up_proj` `(E, 2 * intermediate, hidden)` applied as `F.linear(x, W[e])`; modules flagged
    `is_transposed=True` store `(E, in, out)` and are transposed). Fused QKV (GPT-2 `c_attn`) is one matrix.
    Out of scope: the input embedding and the output embedding / LM head (compared by parameter identity,
    so a tied head is excluded too), position embeddings, norms and biases (1-D, or named `*bias*`).
    A model without `get_input_embeddings` (a plain `nn.Module`) has nothing excluded. Frozen parameters
    are included (filter them with `exclude` if needed); `nn.MultiheadAttention.in_proj_weight` is not.

    Args:
        model (`nn.Module`):
            The model (unwrapped from DDP / accelerate).
        include (`str`, *optional*):
            Regex; keep only names where `re.search(include, name)` matches.
        exclude (`str`, *optional*):
            Regex; drop names where `re.search(exclude, name)` matches.

    Returns:
        `dict[str, torch.Tensor]`: parameter-style name -> view of shape `(out, in)` sharing storage and
        autograd history with the parameter, e.g. `transformer.h.0.attn.c_attn.weight` -> `(3d, d)` or
        `model.layers.0.mlp.experts.gate_up_proj.3` -> `(2 * intermediate, hidden)`.

    Example:
        ```python
        >>> mats = weight_matrices(model, exclude=r"\\.gate\\.")
        >>> {k: tuple(v.shape) for k, v in mats.items()}
        ```
    """
    return matrix_scope(model, include, exclude).views()


class MatrixScope:
    """Where the matrices in scope live: `(name, parameter, expert index or None, transpose)` per matrix.

    Finding them walks every module; `views()` only slices and transposes the parameters, so a training
    loop can find them once and take fresh views on every step (see `SpectralVolumeTrainer`).
    """

    def __init__(self, sources: list[tuple[str, torch.Tensor, int | None, bool]]):
        self.sources = sources

    def views(self) -> dict[str, torch.Tensor]:
        """name -> `(out, in)` view sharing storage and autograd history with its parameter."""
        out = {}
        for name, param, expert, transpose in self.sources:
            w = param if expert is None else param[expert]
            out[name] = w.t() if transpose else w
        return out

    def __len__(self) -> int:
        return len(self.sources)


def matrix_scope(model: nn.Module, include: str | None = None, exclude: str | None = None) -> MatrixScope:
    """The `MatrixScope` of `weight_matrices(model, include, exclude)` (same matrices, same order)."""
    skip = _embedding_param_ids(model)
    seen: set[int] = set()
    found: list[tuple[str, torch.Tensor, int | None, bool]] = []

    def add(name: str, param: torch.Tensor, transpose: bool) -> None:
        if id(param) in skip or id(param) in seen or param.dim() != 2:
            return
        seen.add(id(param))
        found.append((name, param, None, transpose))

    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, nn.Linear):
            add(prefix + "weight", module.weight, transpose=False)
        elif isinstance(module, Conv1D):
            add(prefix + "weight", module.weight, transpose=True)
        elif "router" in type(module).__name__.lower() and isinstance(
            getattr(module, "weight", None), nn.Parameter
        ):
            add(prefix + "weight", module.weight, transpose=False)
        elif _is_experts(module):
            transpose = bool(getattr(module, "is_transposed", False))
            for p_name, param in module.named_parameters(recurse=False):
                if param.dim() != 3 or "bias" in p_name or id(param) in skip or id(param) in seen:
                    continue
                seen.add(id(param))
                found.extend((f"{prefix}{p_name}.{e}", param, e, transpose) for e in range(param.shape[0]))
    return MatrixScope([
        source for source in found
        if (include is None or re.search(include, source[0])) and (exclude is None or not re.search(exclude, source[0]))
    ])


def log_volume(W: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Correlation log-volume of a matrix (or of a batch of same-shape matrices), per dimension.

    With A = W if out >= in else W^T (m >= r rows of r coordinates), C = cov of A's rows
    (columns centered over rows, divided by max(m - 1, 1)) and R = D^-1/2 C D^-1/2 the correlation matrix:

        log_volume(W) = logdet(R + eps * I) / r   in [log(eps), log(1 + eps)],

    log(1 + eps) ~ 0 iff the coordinates are uncorrelated, very negative when they are (nearly) collinear.

    R is built from one batched Gram matrix `C^T C` of the centered A, normalized on the r x r side, and its
    logdet comes from a Cholesky factorization (`cholesky_ex`, retried with growing jitter on failure;
    never SVD); the gradient is analytic through the Cholesky factor (`correlation.correlation_logdet`),
    so forward plus backward cost two m x r x r products. Computed in float32 (float64 for float64 input)
    with autocast disabled. The value is scale invariant; the matrix is divided by its (detached) largest
    entry first so tiny scales stay finite.
    A dead coordinate (variance below 1e-10, resp. 1e-24 in float64, of the squared largest entry:
    constant column of A, all-zero matrix, a single row) gets a zero row/column in R, so it counts as
    collapsed volume, contributing log(eps) / r, with zero gradient through it. Rank deficiency is
    absorbed by eps. Values and gradients are always finite.

    Args:
        W (`torch.Tensor` of shape `(..., out, in)`):
            Matrix or batch of matrices, any floating dtype.
        eps (`float`, *optional*, defaults to `1e-4`):
            Ridge added to R before the logdet.

    Returns:
        `torch.Tensor` of shape `(...)`: the log-volumes, float32 (float64 for float64 input).

    Example:
        ```python
        >>> log_volume(torch.randn(512, 64))  # nearly uncorrelated: close to 0
        >>> log_volume(torch.randn(64, 1) @ torch.randn(1, 32))  # rank 1: close to log(eps) * 31 / 32
        ```
    """
    if W.dim() < 2:
        raise ValueError(f"log_volume needs a matrix (..., out, in), got shape {tuple(W.shape)}.")
    A = W.to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    if A.shape[-2] < A.shape[-1]:
        A = A.transpose(-1, -2)
    if A.dim() == 3:
        return correlation_logdet(A, eps)  # autocast is switched off inside
    batch, (m, r) = A.shape[:-2], A.shape[-2:]
    return correlation_logdet(A.reshape(-1, m, r), eps).reshape(batch)


def _as_named(matrices: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(matrices, Mapping):
        return dict(matrices)
    return {str(i): m for i, m in enumerate(matrices)}


def _oriented(w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`w` or `w.t()`, whichever has `shape` (a square matrix is never flipped: its A is W itself)."""
    return w if w.shape == shape else w.t()


# Extra multiply-adds (Gram matrix and gradient of the zero rows) below which matrices of one width but
# different heights share one padded call: about what a separate call's fixed cost buys on a CPU core.
_PADDING_BUDGET_MACS = 2**22


def _stack(named: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """Stack same-shape matrices in the storage orientation of the first one (a contiguous copy)."""
    first = named[names[0]]
    target = first.shape if first.is_contiguous() or not first.t().is_contiguous() else first.t().shape
    return torch.stack([_oriented(named[n], target) for n in names])


def _grouped_log_volumes(
    matrices: Mapping[str, torch.Tensor] | Iterable[torch.Tensor], eps: float
) -> list[tuple[list[str], torch.Tensor]]:
    """`(names, values)` per batched call: one `log_volume` call per upright shape, dtype and device.

    Matrices of one width r whose heights differ share a single call instead, with their rows zero-padded to
    the tallest (`correlation_logdet(..., rows=...)`), when the padding costs fewer than
    `_PADDING_BUDGET_MACS` extra multiply-adds: small models then pay one set of fixed costs (Cholesky,
    inverse, a few dozen tensor operations) per width instead of per shape; large ones never pad.
    """
    named = _as_named(matrices)
    widths: dict[tuple, dict[int, list[str]]] = {}
    for name, w in named.items():
        key = (min(w.shape), w.dtype, w.device)
        widths.setdefault(key, {}).setdefault(max(w.shape), []).append(name)
    out = []
    for (r, dtype, _), by_height in widths.items():
        tallest = max(by_height)
        waste = sum((tallest - m) * len(names) for m, names in by_height.items()) * r * r
        if len(by_height) == 1 or waste > _PADDING_BUDGET_MACS:
            out.extend((names, log_volume(_stack(named, names), eps=eps)) for names in by_height.values())
            continue
        parts, rows, order = [], [], []
        for m, names in by_height.items():
            upright = _stack(named, names)
            upright = upright if upright.shape[-2] == m else upright.transpose(-1, -2)
            parts.append(torch.nn.functional.pad(upright, (0, 0, 0, tallest - m)))
            rows += [m] * len(names)
            order += names
        work = torch.float64 if dtype == torch.float64 else torch.float32
        rows_t = torch.tensor(rows, device=parts[0].device)
        out.append((order, correlation_logdet(torch.cat(parts).to(work), eps, rows=rows_t)))
    return out


def log_volumes(
    matrices: Mapping[str, torch.Tensor] | Iterable[torch.Tensor], eps: float = 1e-4
) -> dict[str, torch.Tensor]:
    """`log_volume` of many matrices, one batched call per distinct shape.

    Matrices of equal upright shape (taller orientation), dtype and device are stacked, and each stack costs a
    single `log_volume` call. log_volume is transpose invariant, so a stack follows the storage orientation
    of its first matrix (GPT-2's `Conv1D` weights are stacked as stored, `(in, out)`): stacking is then a
    contiguous copy rather than a strided transpose. Square matrices keep their orientation (A = W).

    Args:
        matrices (`dict[str, torch.Tensor]` or iterable of `torch.Tensor`):
            Matrices `(out, in)`, e.g. from `weight_matrices`; a list is keyed `"0"`, `"1"`, ...
        eps (`float`, *optional*, defaults to `1e-4`):
            See `log_volume`.

    Returns:
        `dict[str, torch.Tensor]`: name -> 0-dim log-volume tensor (with gradient), in the input order.
    """
    named = _as_named(matrices)
    values = {name: value for names, group in _grouped_log_volumes(named, eps) for name, value in
              zip(names, group.unbind(0))}
    return {name: values[name] for name in named}


def spectral_penalty(
    matrices: Mapping[str, torch.Tensor] | Iterable[torch.Tensor], eps: float = 1e-4
) -> torch.Tensor:
    """Spectral volume penalty P = -(1/L) * sum_l log_volume(W_l) >= -log(1 + eps).

    Sums each group's log-volumes (see `log_volumes`) without splitting them per matrix: the training hot
    path stays a handful of tensor operations per distinct shape.

    Args:
        matrices (`dict[str, torch.Tensor]` or iterable of `torch.Tensor`):
            The L matrices in scope, e.g. `weight_matrices(model)`.
        eps (`float`, *optional*, defaults to `1e-4`):
            See `log_volume`.

    Returns:
        `torch.Tensor`: 0-dim penalty (float32, or float64 if all inputs are), differentiable; 0 if L = 0.

    Example:
        ```python
        >>> loss = task_loss + lam * spectral_penalty(weight_matrices(model))
        ```
    """
    groups = [values for _, values in _grouped_log_volumes(matrices, eps)]
    if not groups:
        return torch.zeros(())
    dtype = torch.float64 if all(v.dtype == torch.float64 for v in groups) else torch.float32
    device = groups[0].device
    total = sum(v.sum().to(device=device, dtype=dtype) for v in groups)
    return total.mul(-1.0 / sum(v.numel() for v in groups))


def spectrum_effective_rank(values: torch.Tensor) -> float:
    """Roy & Vetterli effective rank of a nonnegative 1-D spectrum.

    p_i = s_i / sum_j s_j; erank = exp(-sum_i p_i log p_i), with 0 log 0 = 0; 1 <= erank <= #nonzero.
    Negative entries are clamped to 0. An all-zero (or empty) spectrum returns 0.0 (no rank at all).

    Args:
        values (`torch.Tensor` of shape `(n,)`): singular values or eigenvalues.

    Returns:
        `float`: the effective rank.
    """
    s = torch.as_tensor(values).detach().to(torch.float64).flatten().clamp_min(0.0)
    total = s.sum()
    if s.numel() == 0 or not bool(total > 0):
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def effective_rank(x: torch.Tensor) -> float:
    """Effective rank of a matrix `(out, in)` from its singular values (float64 `svdvals`); 0.0 if x = 0.

    Example:
        ```python
        >>> effective_rank(torch.eye(8))  # 8.0
        ```
    """
    return spectrum_effective_rank(torch.linalg.svdvals(x.detach().to(torch.float64)))


def psd_effective_rank(K: torch.Tensor) -> float:
    """Effective rank of a PSD kernel `(P, P)` from its eigenvalues (symmetrized, `eigvalsh` in float64,
    negatives from round-off clamped to 0); 0.0 if K = 0."""
    K = K.detach().to(torch.float64)
    return spectrum_effective_rank(torch.linalg.eigvalsh((K + K.T) / 2))


def _stable_rank_from_svdvals(s: torch.Tensor) -> float:
    top = float(s.max()) if s.numel() else 0.0
    return float((s**2).sum()) / top**2 if top > 0 else 0.0


def stable_rank(W: torch.Tensor) -> float:
    """Stable rank ||W||_F^2 / ||W||_2^2 (float64); 0.0 for the zero matrix."""
    return _stable_rank_from_svdvals(torch.linalg.svdvals(W.detach().to(torch.float64)))


@torch.no_grad()
def layer_statistics(
    model_or_matrices: nn.Module | Mapping[str, torch.Tensor], eps: float = 1e-4
) -> dict[str, dict]:
    """Per-matrix spectral statistics in float64, for rank tracking (not for the training hot path).

    Args:
        model_or_matrices (`nn.Module` or `dict[str, torch.Tensor]`):
            A model (its `weight_matrices`) or matrices `(out, in)`.
        eps (`float`, *optional*, defaults to `1e-4`):
            See `log_volume`.

    Returns:
        `dict[str, dict]`: name -> `{"erank": float, "stable_rank": float, "log_volume": float,
        "shape": [out, in]}`.
    """
    if isinstance(model_or_matrices, nn.Module):
        model_or_matrices = weight_matrices(model_or_matrices)
    mats = {k: v.detach().to(torch.float64) for k, v in model_or_matrices.items()}
    volumes = log_volumes(mats, eps=eps)
    stats = {}
    for name, w in mats.items():
        s = torch.linalg.svdvals(w)
        stats[name] = {
            "erank": spectrum_effective_rank(s),
            "stable_rank": _stable_rank_from_svdvals(s),
            "log_volume": float(volumes[name]),
            "shape": list(w.shape),
        }
    return stats
