"""`BooleanMLPForClassification`: a fully connected network on +-1 bits, behind the HF interface.

The MLP arm of the study (and the literature anchor: one hidden layer of width 1000 trained with SGD on
sparse parity). Input: the int8 `bits` column of a data_builders dataset (0/1), mapped to x = 2 * bits - 1.
Output: logits `(B, 2)`; with `readout="margin"` a single unit f(x) is returned as logits `(-f/2, f/2)`, so
that logit("1") - logit("0") = f (the NTK margin) and softmax cross-entropy is the logistic loss on f.
Loss: cross-entropy, or the hinge loss max(0, 1 - y f) on the margin f = logit 1 - logit 0 with y = +-1.

It works with `SpectralVolumeTrainer` (the matrices in scope are every `nn.Linear`, readout included),
the NTK probe (`bits` is its only input), `save_pretrained` / `from_pretrained` / `push_to_hub`, and
`AutoConfig` / `AutoModel` / `AutoModelForSequenceClassification` once this module is imported.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import SequenceClassifierOutput

LOSSES = ("cross_entropy", "hinge")
READOUTS = ("logits", "margin")


class BooleanMLPConfig(PretrainedConfig):
    r"""Configuration of [`BooleanMLPForClassification`].

    Args:
        n_bits (`int`, defaults to 20): input length n.
        width (`int`, defaults to 1000): units of every hidden layer.
        depth (`int`, defaults to 1): number of hidden layers.
        activation (`str`, defaults to `"relu"`): any key of `transformers.activations.ACT2FN`.
        dropout (`float`, defaults to 0.0): dropout after every hidden activation.
        loss (`str`, defaults to `"cross_entropy"`): `"cross_entropy"` or `"hinge"` (on the margin).
        readout (`str`, defaults to `"logits"`): `"logits"` (2 output units) or `"margin"` (1 unit f).
        init_scale (`float`, defaults to 1.0): weights are drawn from N(0, init_scale^2 / fan_in).
        bias (`bool`, defaults to `True`): biases in every layer (initialized to 0).
        output_multiplier (`float`, defaults to 1.0): the readout is multiplied by this (muP sets
            base_width / width, see `hf_specvol.muparam`).
        zero_init_readout (`bool`, defaults to `False`): initialize the readout weights to 0.
        mup_base_width (`int`, *optional*): set by `hf_specvol.muparam.apply_mup`; when present the
            trainer builds muP per-parameter-group learning rates.
    """

    model_type = "boolean_mlp"

    def __init__(self, n_bits: int = 20, width: int = 1000, depth: int = 1, activation: str = "relu",
                 dropout: float = 0.0, loss: str = "cross_entropy", readout: str = "logits",
                 init_scale: float = 1.0, bias: bool = True, output_multiplier: float = 1.0,
                 zero_init_readout: bool = False, mup_base_width: int | None = None, **kwargs):
        errors = []
        if n_bits < 1 or width < 1 or depth < 1:
            errors.append(f"n_bits={n_bits}, width={width}, depth={depth} must all be >= 1.")
        if activation not in ACT2FN:
            errors.append(f"activation={activation!r} is unknown; use one of relu, gelu, tanh, silu, ...")
        if not 0 <= dropout < 1:
            errors.append(f"dropout={dropout} must be in [0, 1).")
        if loss not in LOSSES:
            errors.append(f"loss={loss!r} is unknown; use one of {LOSSES}.")
        if readout not in READOUTS:
            errors.append(f"readout={readout!r} is unknown; use one of {READOUTS}.")
        if errors:
            raise ValueError("Invalid BooleanMLPConfig:\n  - " + "\n  - ".join(errors))
        self.n_bits, self.width, self.depth = n_bits, width, depth
        self.activation, self.dropout, self.loss, self.readout = activation, dropout, loss, readout
        self.init_scale, self.bias = init_scale, bias
        self.output_multiplier, self.zero_init_readout = output_multiplier, zero_init_readout
        self.mup_base_width = mup_base_width
        kwargs.setdefault("num_labels", 2)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class BooleanMLPReadout(nn.Linear):
    """The readout layer: `nn.Linear` whose output is multiplied by `config.output_multiplier` (muP's 1/m)."""

    def __init__(self, config: BooleanMLPConfig):
        super().__init__(config.width, 1 if config.readout == "margin" else 2, bias=config.bias)
        self.config = config

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden) * self.config.output_multiplier


class BooleanMLPPreTrainedModel(PreTrainedModel):
    config_class = BooleanMLPConfig
    base_model_prefix = "mlp"
    main_input_name = "bits"
    # hidden weights are already drawn with variance ~ 1/fan_in: muP only changes LRs and the readout
    _mup_fan_in_init = True

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            if module is getattr(self, "readout", None) and self.config.zero_init_readout:
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=self.config.init_scale / math.sqrt(module.in_features))
            if module.bias is not None:
                init.zeros_(module.bias)


class BooleanMLPForClassification(BooleanMLPPreTrainedModel):
    """MLP f: {0,1}^n -> logits (B, 2), with a loss when `labels` (B,) in {0, 1} are given.

    Example:
        ```python
        >>> config = BooleanMLPConfig(n_bits=20, width=1000, depth=1, loss="hinge", readout="margin")
        >>> model = BooleanMLPForClassification(config)
        >>> out = model(bits=torch.randint(0, 2, (32, 20)), labels=torch.randint(0, 2, (32,)))
        >>> out.logits.shape, out.loss.shape
        (torch.Size([32, 2]), torch.Size([]))
        ```
    """

    def __init__(self, config: BooleanMLPConfig):
        super().__init__(config)
        sizes = [config.n_bits] + [config.width] * config.depth
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=config.bias) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = ACT2FN[config.activation]
        self.dropout = nn.Dropout(config.dropout)
        self.readout = BooleanMLPReadout(config)
        self.post_init()

    def features(self, bits: torch.Tensor) -> torch.Tensor:
        """Last hidden layer's activations (B, width) for 0/1 `bits` (B, n)."""
        h = 2.0 * bits.to(self.readout.weight.dtype) - 1.0
        for layer in self.layers:
            h = self.dropout(self.act(layer(h)))
        return h

    def forward(self, bits: torch.Tensor, labels: torch.Tensor | None = None,
                return_dict: bool | None = None) -> SequenceClassifierOutput:
        """
        Args:
            bits (`torch.Tensor` of shape `(B, n_bits)`): 0/1 inputs (any integer or float dtype).
            labels (`torch.Tensor` of shape `(B,)`, *optional*): 0/1 targets; the loss is returned with them.

        Returns:
            `SequenceClassifierOutput` with `logits` (B, 2) and `loss` (scalar) when labels are given.
        """
        if bits.shape[-1] != self.config.n_bits:
            raise ValueError(f"bits has {bits.shape[-1]} columns but the model expects n_bits={self.config.n_bits}.")
        out = self.readout(self.features(bits))
        logits = torch.cat([-out / 2, out / 2], dim=-1) if out.shape[-1] == 1 else out
        loss = None
        if labels is not None:
            labels = labels.to(logits.device).long()
            if self.config.loss == "hinge":
                y = 2.0 * labels.to(logits.dtype) - 1.0
                loss = torch.relu(1.0 - y * (logits[:, 1] - logits[:, 0])).mean()
            else:
                loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModel` / `AutoModelForSequenceClassification` know "boolean_mlp"."""
    try:
        AutoConfig.register(BooleanMLPConfig.model_type, BooleanMLPConfig)
        AutoModel.register(BooleanMLPConfig, BooleanMLPForClassification)
        AutoModelForSequenceClassification.register(BooleanMLPConfig, BooleanMLPForClassification)
    except ValueError:  # already registered (module reloaded)
        pass


register_auto_classes()
