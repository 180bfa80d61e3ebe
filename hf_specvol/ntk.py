"""Empirical neural tangent kernel on a fixed probe set, and its statistics.

Pure math: a model and a batch of probe inputs in, a `(P, P)` kernel and numbers out. The scalar output per
example is the answer margin f(x) = logit("1") - logit("0") (DESIGN.md section 2); J = df/dtheta over the
trainable parameters (P x p) and K = J J^T, accumulated block by block so memory stays bounded.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .spectral import psd_effective_rank

__all__ = [
    "answer_margin",
    "empirical_ntk",
    "kernel_distance",
    "kernel_effective_rank",
    "kernel_target_alignment",
    "margin_output",
    "ntk_statistics",
]


def answer_margin(
    logits: torch.Tensor, answer_position: int | None = None, answer_ids: Sequence[int] | None = None
) -> torch.Tensor:
    """Scalar margin per example from model logits.

    - `(B, T, V)` causal-LM logits: `logits[:, pos, id_1] - logits[:, pos, id_0]` with
      `answer_ids = (id_0, id_1)` the token ids of the answers "0" and "1" and `pos = answer_position`
      (defaults to -1, the last position, which predicts the answer after the prompt).
    - `(B, V)`: `logits[:, id_1] - logits[:, id_0]` if `answer_ids` is given, else `logits[:, 1] - logits[:, 0]`
      for V = 2 or `logits[:, 0]` for V = 1.
    - `(B,)`: the logits themselves.

    Args:
        logits (`torch.Tensor`): see above.
        answer_position (`int`, *optional*): position of the answer logits for `(B, T, V)` inputs.
        answer_ids (`tuple[int, int]`, *optional*): token ids `(id_0, id_1)` of the labels 0 and 1.

    Returns:
        `torch.Tensor` of shape `(B,)`.
    """
    if logits.dim() == 3:
        if answer_ids is None:
            raise ValueError("answer_margin: (B, T, V) logits need answer_ids=(id_of_'0', id_of_'1').")
        logits = logits[:, -1 if answer_position is None else answer_position]
    if logits.dim() == 2:
        if answer_ids is not None:
            return logits[:, answer_ids[1]] - logits[:, answer_ids[0]]
        if logits.shape[-1] == 2:
            return logits[:, 1] - logits[:, 0]
        if logits.shape[-1] == 1:
            return logits[:, 0]
        raise ValueError(
            f"answer_margin: (B, {logits.shape[-1]}) logits need answer_ids to pick two columns."
        )
    if logits.dim() == 1:
        return logits
    raise ValueError(f"answer_margin: unsupported logits shape {tuple(logits.shape)}.")


def _call_kwargs(model: nn.Module) -> dict:
    """Keyword arguments that keep HF causal LMs cache-free (vmap-friendly)."""
    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in accepted else {}


def _logits(out) -> torch.Tensor:
    """Logits from a `ModelOutput`, a tuple (first entry) or a tensor."""
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def margin_output(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    answer_position: int | None = None,
    answer_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """Run `model(**inputs)` and return the answer margins `(B,)` (see `answer_margin`).

    Inputs are fixed-length batches (e.g. `{"input_ids": (B, T)}`); no `attention_mask` is added, since
    sdpa attention with a mask breaks inside `vmap`. The output may be a `ModelOutput` with `logits`, a
    tuple whose first entry is the logits, or a tensor.
    """
    return answer_margin(_logits(model(**inputs, **_call_kwargs(model))), answer_position, answer_ids)


def _plan_blocks(params: dict[str, torch.Tensor], cap: int) -> list[list[tuple[str, int, int]]]:
    """Greedily pack `(name, start, stop)` flat slices of the parameters into blocks of <= cap elements.

    A parameter larger than `cap` is cut into slices of `cap` elements, one per block."""
    blocks: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    size = 0
    for name, p in params.items():
        for start in range(0, p.numel(), cap):
            stop = min(start + cap, p.numel())
            if current and size + stop - start > cap:
                blocks.append(current)
                current, size = [], 0
            current.append((name, start, stop))
            size += stop - start
    if current:
        blocks.append(current)
    return blocks


def _autograd_jacobian(margin_fn, pieces: tuple, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
    """Jacobian rows `(n, sum of piece sizes)` one example at a time with plain autograd.

    The fallback for models with a custom `autograd.Function` that `torch.func` cannot transform (BLOOM's
    GeLU has no `setup_context`): same numbers, one backward pass per example instead of a vmapped call.
    """
    leaves = tuple(p.detach().requires_grad_() for p in pieces)
    rows = []
    for i in range(next(iter(chunk.values())).shape[0]):
        with torch.enable_grad():
            value = margin_fn(leaves, {k: v[i] for k, v in chunk.items()})
            grads = torch.autograd.grad(value, leaves, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(leaf) if g is None else g).reshape(-1)
                               for leaf, g in zip(leaves, grads)]))
    return torch.stack(rows)


_MIN_CHUNK_BUDGET = 64 * 2**20


def _saved_bytes_per_example(model: nn.Module, inputs: dict[str, torch.Tensor], call_kwargs: dict) -> int:
    """Bytes autograd keeps for the backward of a one-example forward, plus the output and its gradient.

    Parameters (and views of them) are not counted: they are shared by every example of a vmapped chunk.
    """
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in storages:
            total += t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _logits(model(**{k: v[:1] for k, v in inputs.items()}, **call_kwargs))
    return total + 2 * out.numel() * out.element_size()


def _chunk_size(block, params: dict[str, torch.Tensor], activation_bytes: int, budget: int, upper: int) -> int:
    """Examples per vmapped call so that the call's working set stays under `budget` bytes.

    Per example: the activations saved for its backward (twice: the backward's buffers are as large) and,
    for every parameter touched by the block, about three full-size per-example tensors (the gradient with
    respect to the whole parameter before slicing, e.g. a dense embedding gradient, and its slices).
    """
    touched = {name for name, _, _ in block}
    per_example = 2 * activation_bytes + 3 * sum(params[n].numel() * params[n].element_size() for n in touched)
    return max(1, min(upper, budget // max(per_example, 1)))


def empirical_ntk(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    answer_position: int | None = None,
    answer_ids: Sequence[int] | None = None,
    max_block_bytes: int = 256 * 2**20,
    example_chunk_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """Empirical NTK K = J J^T of the answer margin over all trainable parameters, on P probe examples.

    J (P x p) is never materialized: the trainable parameters (`requires_grad=True`) are cut into blocks
    whose Jacobian J_b (P x n_b, parameter dtype) holds at most `max_block_bytes`; a parameter larger than
    that is split into flat slices (the slice is the differentiable input and the full parameter is rebuilt
    with `torch.cat` of constant parts and the slice). Each J_b is assembled from chunks of at most
    `example_chunk_size` examples with `vmap(jacrev(functional_call(...)))`; a chunk is made smaller when its
    estimated working set (activations saved for one example's backward, measured once with saved-tensor
    hooks, and full-size per-example gradients of the parameters the block touches, e.g. a dense embedding
    gradient) would exceed `max(max_block_bytes, 64 MiB)`. So the extra memory of a measurement stays around
    two blocks plus one copy of the largest parameter, whatever the model size. Each J_b J_b^T is computed
    in J_b's dtype (float32 for float32 parameters: dot products over at most one block's columns, relative
    error ~1e-6) and K is accumulated in float64. Cost: one forward+backward per example per block. Models
    that `torch.func` cannot transform (a custom `autograd.Function` without `setup_context`, as in BLOOM)
    fall back to one plain autograd backward pass per example.

    The model is measured in eval mode (dropout off) and every module's training flag is restored
    afterwards; parameters and `.grad` are left untouched. Pass the *unwrapped* model under DDP /
    accelerate (`accelerator.unwrap_model(model)`), and fixed-length inputs without `attention_mask`.

    Args:
        model (`nn.Module`): an HF causal LM or any module whose output `answer_margin` understands.
        inputs (`dict[str, torch.Tensor]`): probe batch, every tensor with leading dimension P.
        answer_position (`int`, *optional*): see `answer_margin`.
        answer_ids (`tuple[int, int]`, *optional*): `(id_0, id_1)`; see `answer_margin`.
        max_block_bytes (`int`, *optional*, defaults to `256 * 2**20`): cap on the bytes of one J_b, and on
            the working set of one vmapped call (at least 64 MiB).
        example_chunk_size (`int`, *optional*, defaults to 64): most examples per vmapped Jacobian call.
        progress (`bool`, *optional*, defaults to `False`): show a tqdm bar over blocks.

    Returns:
        `torch.Tensor` of shape `(P, P)`, float64, on the model's device.

    Example:
        ```python
        >>> K = empirical_ntk(model, {"input_ids": probe_ids}, answer_ids=(tok("0"), tok("1")))
        >>> ntk_statistics(K, probe_labels)
        ```
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("empirical_ntk: the model has no trainable parameters (requires_grad=True).")
    device = next(iter(params.values())).device
    inputs = {k: torch.as_tensor(v).to(device) for k, v in inputs.items()}
    num_probes = next(iter(inputs.values())).shape[0]
    if any(v.shape[0] != num_probes for v in inputs.values()):
        raise ValueError("empirical_ntk: every input tensor needs the same leading dimension P.")
    itemsize = max(p.element_size() for p in params.values())
    cap = max(1, max_block_bytes // (num_probes * itemsize))
    constants = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    call_kwargs = _call_kwargs(model)

    def margin(pieces, block, example):
        state = dict(constants)
        for (name, start, stop), piece in zip(block, pieces):
            flat = constants[name].reshape(-1)
            if start == 0 and stop == flat.numel():  # the whole parameter: no copy
                state[name] = piece.view_as(constants[name])
            else:
                state[name] = torch.cat([flat[:start], piece, flat[stop:]]).view_as(constants[name])
        batch = {k: v.unsqueeze(0) for k, v in example.items()}
        out = functional_call(model, state, args=(), kwargs={**batch, **call_kwargs})
        return answer_margin(_logits(out), answer_position, answer_ids)[0]

    blocks = _plan_blocks(params, cap)
    if progress:
        from tqdm.auto import tqdm

        blocks = tqdm(blocks, desc="empirical NTK blocks")
    kernel = torch.zeros(num_probes, num_probes, dtype=torch.float64, device=device)
    use_autograd = False
    modes = {m: m.training for m in model.modules()}
    model.eval()
    # HF's "padding without attention mask" check reads input_ids (data-dependent, breaks vmap); it only
    # warns, and runs only when the config has a pad token, so hide that token while measuring.
    config = getattr(model, "config", None)
    pad_token_id = getattr(config, "pad_token_id", None)
    if pad_token_id is not None:
        config.pad_token_id = None
    try:
        with warnings.catch_warnings():
            # sdpa has no vmap batching rule on CPU: torch loops over examples and warns on every call.
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not")
            activation_bytes = _saved_bytes_per_example(model, inputs, call_kwargs)
            budget = max(max_block_bytes, _MIN_CHUNK_BUDGET)
            for block in blocks:
                pieces = tuple(constants[n].reshape(-1)[a:b] for n, a, b in block)
                jac_fn = vmap(jacrev(lambda ps, ex, blk=block: margin(ps, blk, ex)), in_dims=(None, 0))
                size = _chunk_size(block, params, activation_bytes, budget, example_chunk_size)
                # J_b as one (P, n) matrix per piece; a single chunk's Jacobians are used as they come
                columns = None if size >= num_probes else [
                    torch.empty(num_probes, p.numel(), dtype=p.dtype, device=device) for p in pieces]
                for lo in range(0, num_probes, size):
                    chunk = {k: v[lo : lo + size] for k, v in inputs.items()}
                    if not use_autograd:
                        try:
                            rows = jac_fn(pieces, chunk)
                        except RuntimeError as err:
                            if "setup_context" not in str(err):
                                raise
                            use_autograd = True  # this model's autograd.Functions defeat torch.func
                    if use_autograd:
                        rows = _autograd_jacobian(lambda ps, ex, blk=block: margin(ps, blk, ex), pieces, chunk)
                        rows = rows.split([p.numel() for p in pieces], dim=1)
                    if columns is None:
                        columns = list(rows)
                    else:
                        for column, row in zip(columns, rows):
                            column[lo : lo + size] = row
                for J in columns:
                    if J.element_size() < 4:
                        J = J.float()  # half-precision dot products would lose the kernel's small entries
                    kernel += (J @ J.T).to(torch.float64)
                columns = rows = J = None  # free J_b before the next block allocates its own
    finally:
        for module, mode in modes.items():
            module.training = mode
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
    return (kernel + kernel.T) / 2  # BLAS does not promise an exactly symmetric J J^T


def kernel_target_alignment(K: torch.Tensor, labels01) -> float:
    """Kernel-target alignment (Baratin et al. 2021) with centered +-1 labels.

    y = 2 * labels - 1, then y <- y - mean(y); KTA = y^T K y / (||K||_F ||y||^2). Returns 0.0 if ||y|| = 0
    (all labels equal) or ||K||_F = 0.

    Args:
        K (`torch.Tensor` of shape `(P, P)`): kernel.
        labels01 (`torch.Tensor` / sequence of P labels in {0, 1}).

    Returns:
        `float` in [-1, 1].
    """
    K = K.detach().to(torch.float64)
    y = 2.0 * torch.as_tensor(labels01, dtype=torch.float64, device=K.device).flatten() - 1.0
    y = y - y.mean()
    y_sq, k_norm = float(y @ y), float(torch.linalg.matrix_norm(K))
    if y_sq == 0.0 or k_norm == 0.0:
        return 0.0
    return float(y @ K @ y) / (k_norm * y_sq)


def kernel_distance(K0: torch.Tensor, Kt: torch.Tensor) -> float:
    """Kernel distance d = 1 - <K0, Kt>_F / (||K0||_F ||Kt||_F) in [0, 2]; 0 = same kernel up to scale.

    If a kernel is zero the cosine is undefined: returns 0.0 when both are zero, else 1.0.
    """
    K0, Kt = K0.detach().to(torch.float64), Kt.detach().to(torch.float64)
    n0, nt = float(torch.linalg.matrix_norm(K0)), float(torch.linalg.matrix_norm(Kt))
    if n0 == 0.0 or nt == 0.0:
        return 0.0 if n0 == nt else 1.0
    return max(0.0, 1.0 - float((K0 * Kt).sum()) / (n0 * nt))  # clamp round-off below 0


def kernel_effective_rank(K: torch.Tensor) -> float:
    """Effective rank of the PSD kernel K (Roy & Vetterli, on its eigenvalues); see `psd_effective_rank`."""
    return psd_effective_rank(K)


def ntk_statistics(K: torch.Tensor, labels01, K0: torch.Tensor | None = None) -> dict[str, float]:
    """`{"erank": erank(K), "alignment": KTA(K, labels), "distance": d(K0, K)}`.

    Without `K0`, K is its own reference and the distance is 0.0 (the first measurement).
    """
    return {
        "erank": kernel_effective_rank(K),
        "alignment": kernel_target_alignment(K, labels01),
        "distance": 0.0 if K0 is None else kernel_distance(K0, K),
    }
