"""Native maximal-update parametrization (muP) for HF causal LMs and the Boolean MLP.

muP (Yang & Hu 2021; Yang et al. 2022, "Tensor Programs V") makes the size of every layer's update
independent of width, so hyperparameters tuned at a base width transfer. Widths are compared with a
base width b: the width multiplier is m = width / b. Parameters are classified like microsoft/mup
does, by building the same architecture at the base width (on the meta device, no memory) and
comparing shapes: a dimension that differs is "infinite" (scales with width).

* matrix-like (both dims infinite: attention / MLP matrices, MLP hidden-to-hidden): init variance
  ~ 1/fan_in scaled from the base width (an init with a width-independent std, as in GPT-2 and Llama,
  is multiplied by sqrt(1/m)); Adam learning rate lr / m; SGD learning rate lr.
* vector-like (one infinite dim: embeddings, biases, norms, the MLP's input layer and readout):
  init unchanged; Adam learning rate lr; SGD learning rate lr * m.
* finite (no infinite dim): unchanged.
* readout: the output logits are multiplied by 1/m (`output_multiplier` of models that have one, else
  a forward hook on `get_output_embeddings()`, which also covers a tied LM head); a readout initialized
  with variance 1/fan_in (the Boolean MLP) is multiplied by sqrt(m) so that the effective readout has
  variance ~ 1/width^2, as microsoft/mup's `MuReadout` does; optional zero init.
* attention: scores use 1/d_head instead of 1/sqrt(d_head), as sqrt(d_head_base) / d_head so that the
  base width keeps standard attention (every module with `scaling` and `head_dim`, i.e. GPT-2, Llama,
  and most transformers 5 attention classes); optional zero init of the query projection.

`apply_mup(model, base_width)` does all of this and records `config.mup_base_width`;
`SpectralVolumeTrainer` then builds its optimizer from `mup_param_groups`. After `from_pretrained`,
call `apply_mup(model, model.config.mup_base_width, init=False)` to restore the forward-time parts
(attention scale, readout multiplier), which are not stored in the weights.
The coordinate check (`coord_check`, `plot_coord_check`) is the proof that it works.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

logger = logging.getLogger(__name__)

WIDTH_FIELDS = ("hidden_size", "n_embd", "width", "intermediate_size", "n_inner", "head_dim")
MISSING_BASE_WIDTH = ("muP needs a base width: set `mup_base_width` (ModelArguments / the study's `mup` "
                      "method) or call `hf_specvol.muparam.apply_mup(model, base_width)` before training.")


def model_width(config) -> int:
    """The width of a model: `hidden_size` (HF LMs, alias `n_embd` for GPT-2) or `width` (Boolean MLP)."""
    for name in ("width", "hidden_size", "n_embd"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"Cannot read the width of {type(config).__name__}: it has none of width / hidden_size / "
                     "n_embd; muP supports HF causal LMs and BooleanMLPConfig.")


def width_multiplier(model, base_width: int | None) -> float:
    """m = width / base_width (raises the error that names the fix when `base_width` is None)."""
    if base_width is None:
        raise ValueError(MISSING_BASE_WIDTH)
    if base_width < 1:
        raise ValueError(f"mup_base_width={base_width} must be a positive width.")
    return model_width(model.config) / base_width


def _base_config(config, base_width: int):
    """`config` with every width field scaled from its width to `base_width`."""
    width = model_width(config)
    base = copy.deepcopy(config)
    for name in WIDTH_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            scaled = value * base_width / width
            if scaled != int(scaled) or scaled < 1:
                raise ValueError(f"{name}={value} does not scale to base width {base_width} (width {width}); "
                                 "pick a base width that divides every width-like size.")
            setattr(base, name, int(scaled))
    return base


def infinite_dims(model: nn.Module, base_width: int) -> dict[str, tuple[bool, ...]]:
    """For every parameter, which of its dimensions scale with width (differ at the base width).

    Returns:
        `dict[str, tuple[bool, ...]]`: parameter name -> one flag per dimension of its stored shape.
    """
    base_config = _base_config(model.config, base_width)
    with torch.device("meta"):
        base = type(model)(base_config)
    base_shapes = {n: p.shape for n, p in base.named_parameters()}
    dims = {}
    for name, p in model.named_parameters():
        if name not in base_shapes:
            raise ValueError(f"Parameter {name} has no counterpart in the base-width model; muP cannot classify it.")
        dims[name] = tuple(a != b for a, b in zip(p.shape, base_shapes[name]))
    return dims


def classify_parameters(model: nn.Module, base_width: int) -> dict[str, str]:
    """Parameter name -> `"matrix"` (2 infinite dims), `"vector"` (1) or `"finite"` (0)."""
    kinds = {0: "finite", 1: "vector", 2: "matrix"}
    return {n: kinds[min(sum(d), 2)] for n, d in infinite_dims(model, base_width).items()}


def mup_lr_multipliers(model: nn.Module, base_width: int | None, optimizer: str = "adam") -> dict[str, float]:
    """Learning-rate multiplier of every trainable parameter under muP.

    Adam: matrix-like 1/m, others 1. SGD: vector-like m, others 1 (microsoft/mup's MuAdam / MuSGD,
    with the 1/m readout multiplier in the model).
    """
    m = width_multiplier(model, base_width)
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer={optimizer!r}: muP learning rates are defined for 'adam' and 'sgd'.")
    classes = classify_parameters(model, base_width)
    table = {"adam": {"matrix": 1 / m, "vector": 1.0, "finite": 1.0},
             "sgd": {"matrix": 1.0, "vector": m, "finite": 1.0}}[optimizer]
    return {n: table[classes[n]] for n, p in model.named_parameters() if p.requires_grad}


def mup_param_groups(model: nn.Module, base_width: int | None, lr: float, optimizer: str = "adam",
                     weight_decay: float = 0.0, decay_names: set[str] | None = None) -> list[dict]:
    """Optimizer parameter groups with muP learning rates.

    Args:
        model (`nn.Module`): a model with a `config` (HF causal LM or Boolean MLP).
        base_width (`int`): the base width b (raises an error naming the fix if `None`).
        lr (`float`): the learning rate at the base width.
        optimizer (`str`, defaults to `"adam"`): `"adam"` (Adam/AdamW) or `"sgd"`.
        weight_decay (`float`, defaults to 0.0): applied to the parameters named in `decay_names`.
        decay_names (`set[str]`, *optional*): parameters that get weight decay (default: none).

    Returns:
        `list[dict]`: groups `{"params", "lr", "weight_decay"}`, one per distinct (lr, decay) pair.

    Example:
        ```python
        >>> groups = mup_param_groups(model, base_width=16, lr=1e-3)
        >>> optimizer = torch.optim.AdamW(groups)
        ```
    """
    multipliers = mup_lr_multipliers(model, base_width, optimizer)
    decay_names = decay_names or set()
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if name in multipliers:
            wd = weight_decay if name in decay_names else 0.0
            groups.setdefault((lr * multipliers[name], wd), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


# --- the forward-time parts and the init ------------------------------------------------------------
def _attention_modules(model: nn.Module):
    return [mod for mod in model.modules() if isinstance(getattr(mod, "scaling", None), float)
            and isinstance(getattr(mod, "head_dim", None), int)]


def _zero_init_query(model: nn.Module) -> None:
    done = 0
    for mod in _attention_modules(model):
        if isinstance(getattr(mod, "q_proj", None), nn.Linear):
            nn.init.zeros_(mod.q_proj.weight)
            done += 1
        elif hasattr(mod, "c_attn"):  # GPT-2 fused QKV, Conv1D weight (in, 3d): queries are the first d outputs
            d = mod.c_attn.weight.shape[1] // 3
            nn.init.zeros_(mod.c_attn.weight[:, :d])
            done += 1
    if not done:
        raise ValueError(f"zero_init_query: no attention module with q_proj or c_attn found in {type(model).__name__}.")


def _scale_readout(model: nn.Module, multiplier: float) -> None:
    if hasattr(model.config, "output_multiplier"):  # the model applies it itself
        model.config.output_multiplier = multiplier
        return
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings to scale; muP needs a readout.")
    if getattr(head, "_mup_hook", None) is not None:
        head._mup_hook.remove()
    head._mup_hook = head.register_forward_hook(lambda module, args, output: output * multiplier)


def apply_mup(model: nn.Module, base_width: int | None, *, init: bool = True, zero_init_query: bool = False,
              zero_init_readout: bool = False) -> nn.Module:
    """Turn a freshly initialized model (standard parametrization) into its muP counterpart, in place.

    Args:
        model (`nn.Module`): an HF causal LM (GPT-2, Llama, ...) or a `BooleanMLPForClassification`.
        base_width (`int`): base width b; m = width / b. Raises an error naming the fix if `None`.
        init (`bool`, defaults to `True`): rescale the init of matrix-like weights by sqrt(1/m) (skipped for
            models whose init is already ~1/fan_in, flagged `_mup_fan_in_init`); `False` after `from_pretrained`.
        zero_init_query (`bool`, defaults to `False`): zero the query projection.
        zero_init_readout (`bool`, defaults to `False`): zero the readout weights (untied heads only).

    Returns:
        The same model, with `config.mup_base_width = base_width`.
    """
    m = width_multiplier(model, base_width)
    if init:
        classes = classify_parameters(model, base_width)
        with torch.no_grad():
            if not getattr(model, "_mup_fan_in_init", False):
                for name, p in model.named_parameters():
                    if classes[name] == "matrix":
                        p.mul_(math.sqrt(1.0 / m))
            elif hasattr(model, "readout"):
                # a 1/fan_in readout times the 1/m multiplier must have variance ~ 1/width^2 (mup's MuReadout)
                model.readout.weight.mul_(math.sqrt(m))
            if zero_init_query:
                _zero_init_query(model)
            if zero_init_readout:
                head = model.get_output_embeddings() if not hasattr(model, "readout") else model.readout
                embeddings = model.get_input_embeddings() if not hasattr(model, "readout") else None
                if embeddings is not None and head.weight is embeddings.weight:
                    raise ValueError("zero_init_readout would zero the tied input embedding; build the model with "
                                     "tie_word_embeddings=False or use the readout multiplier alone.")
                nn.init.zeros_(head.weight)
    for mod in _attention_modules(model):
        # standard c / sqrt(d_head) -> c * sqrt(d_head_base) / d_head = c / sqrt(d_head) * sqrt(1/m)
        mod._sp_scaling = getattr(mod, "_sp_scaling", mod.scaling)
        mod.scaling = float(mod._sp_scaling * math.sqrt(1.0 / m))
    _scale_readout(model, 1.0 / m)
    model.config.mup_base_width = base_width
    return model


# --- coordinate check ----------------------------------------------------------------------------------
def coord_check(make_model, batch: dict, widths, *, base_width: int, steps: int = 4, lr: float = 1e-2,
                mup: bool = True, seed: int = 0) -> list[dict]:
    """Train each width for a few Adam steps on one batch and record every layer's mean |output|.

    Args:
        make_model (`callable`): `width -> model` in standard parametrization (returns `loss` given labels).
        batch (`dict`): model inputs with `labels`.
        widths (`list[int]`): widths to compare (e.g. 64, 128, 256, 512).
        base_width (`int`): muP base width.
        steps (`int`): Adam steps; activations are recorded before every step and after the last.
        lr (`float`): Adam learning rate (at the base width under muP).
        mup (`bool`): muP (`apply_mup` + `mup_param_groups`) or standard parametrization.
        seed (`int`): torch seed of every model.

    Returns:
        `list[dict]`: records `{"parametrization", "width", "step", "layer", "mean_abs", "mean_abs_change"}`
        for every `nn.Linear` / `Conv1D` output (the readout included): mean |h_t| and mean |h_t - h_0|
        over the batch and units. Under muP both stay O(1) across widths; under standard
        parametrization the change grows with width (Adam's update of a fan_in-wide matrix is ~ lr * fan_in).
    """
    records = []
    for width in widths:
        torch.manual_seed(seed)
        model = make_model(width)
        if mup:
            apply_mup(model, base_width)
            optimizer = torch.optim.Adam(mup_param_groups(model, base_width, lr))
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        seen, initial, hooks = {}, {}, []
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
                hooks.append(mod.register_forward_hook(
                    lambda module, args, out, name=name, seen=seen: seen.__setitem__(name, out.detach().clone())))
        for step in range(steps + 1):
            seen.clear()
            loss = model(**batch).loss
            if step == 0:
                initial = dict(seen)
            records += [{"parametrization": "muP" if mup else "SP", "width": width, "step": step, "layer": layer,
                         "mean_abs": float(out.abs().mean()),
                         "mean_abs_change": float((out - initial[layer]).abs().mean())}
                        for layer, out in seen.items()]
            if step < steps:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        for hook in hooks:
            hook.remove()
    return records


def coord_check_spread(records: list[dict], step: int | None = None,
                       key: str = "mean_abs_change") -> dict[tuple[str, str], float]:
    """Ratio max/min over widths of each layer's `key` (mean |h_t - h_0| by default) at `step` (default: last).

    Returns:
        `dict[(parametrization, layer), float]`; ~1 means width-independent.
    """
    step = max(r["step"] for r in records) if step is None else step
    values: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r["step"] == step:
            values.setdefault((r["parametrization"], r["layer"]), []).append(r[key])
    return {key: max(v) / max(min(v), 1e-30) for key, v in values.items()}


def plot_coord_check(records: list[dict], save_to: str | None = None):
    """Mean |h_t - h_0| (top) and mean |h_t| (bottom) vs width for every layer at the last step, one column
    per parametrization (flat lines = width-independent updates).

    Returns the matplotlib figure (saved to `save_to` if given).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = max(r["step"] for r in records)
    kinds = sorted({r["parametrization"] for r in records}, reverse=True)
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.0 * len(kinds), 5.6), sharey="row", squeeze=False)
    for col, kind in enumerate(kinds):
        rows = [r for r in records if r["parametrization"] == kind and r["step"] == step]
        for row, key in enumerate(("mean_abs_change", "mean_abs")):
            ax = axes[row][col]
            for layer in dict.fromkeys(r["layer"] for r in rows):
                pts = sorted((r["width"], r[key]) for r in rows if r["layer"] == layer)
                ax.plot(*zip(*pts), marker="o", label=layer)
            ax.set(xscale="log", yscale="log", xlabel="width")
            widths = sorted({r["width"] for r in rows})
            ax.set_xticks(widths, [str(w) for w in widths], minor=False)
            ax.set_xticks([], minor=True)
            ax.grid(alpha=0.3)
        axes[0][col].set_title(f"{kind}, after {step} Adam steps")
    axes[0][0].set_ylabel("mean |h_t - h_0|")
    axes[1][0].set_ylabel("mean |h_t|")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    if save_to:
        fig.savefig(save_to, dpi=80)
    return fig
