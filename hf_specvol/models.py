"""Build the causal LM a recipe trains: a small model from scratch by type, or any HF causal LM by path."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

logger = logging.getLogger(__name__)

MLP_TYPE = "boolean_mlp"


@dataclass
class ModelArguments:
    """Which model to train.

    Args:
        model_type (`str`, *optional*, defaults to `"gpt2"`): any HF causal-LM type, built from scratch
            with the sizes below (ignored when `model_name_or_path` is set).
        model_name_or_path (`str`, *optional*): a local directory or Hub id of a causal LM to start from.
        hidden_size, num_layers, num_heads, intermediate_size: sizes of a model built from scratch
            (`intermediate_size` defaults to 4 x hidden_size; it also sets the expert width of MoE types).
        num_experts (`int`, defaults to `4`): experts per MoE layer of a MoE type built from scratch
            (mixtral, qwen3_moe, ...), each token routed to min(2, the type's default) of them.
        model_dropout (`float`, *optional*): dropout rate for every dropout of a model built from scratch
            (GPT-2: resid/embd/attn); `None` keeps the architecture's default.
        trust_remote_code (`bool`, defaults to `False`): allow custom modeling code from the Hub.
        mup_base_width (`int`, *optional*): train in muP (`hf_specvol.muparam`) with this base width;
            `None` keeps the standard parametrization.
        mup_zero_init_query (`bool`, defaults to `False`): under muP, zero-initialize the query projection.
        mlp_activation, mlp_loss, mlp_readout: for `model_type="boolean_mlp"` (the MLP arm, width
            `hidden_size`, `num_layers` hidden layers, dropout `model_dropout`): activation, `"cross_entropy"`
            or `"hinge"`, `"logits"` or `"margin"` (see `BooleanMLPConfig`).
    """

    model_type: str = field(default="gpt2", metadata={"help": "HF causal-LM type built from scratch."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "Local dir or Hub id of a causal LM."})
    hidden_size: int = field(default=64, metadata={"help": "Width of a model built from scratch."})
    num_layers: int = field(default=2, metadata={"help": "Number of blocks of a model built from scratch."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads of a model built from scratch."})
    intermediate_size: int | None = field(default=None, metadata={"help": "MLP width (default 4 x hidden)."})
    num_experts: int = field(default=4, metadata={"help": "Experts per layer of a MoE type built from scratch."})
    model_dropout: float | None = field(default=None, metadata={"help": "Dropout rate (None: architecture default)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modeling code from the Hub."})
    mup_base_width: int | None = field(default=None, metadata={"help": "muP base width (None: standard param.)."})
    mup_zero_init_query: bool = field(default=False, metadata={"help": "muP: zero-init the query projection."})
    mlp_activation: str = field(default="relu", metadata={"help": "boolean_mlp: hidden activation."})
    mlp_loss: str = field(default="cross_entropy", metadata={"help": "boolean_mlp: cross_entropy or hinge."})
    mlp_readout: str = field(default="logits", metadata={"help": "boolean_mlp: logits (2 units) or margin (1)."})

    def __post_init__(self):
        if self.mup_base_width is not None and self.mup_base_width < 1:
            raise ValueError(f"mup_base_width={self.mup_base_width} must be a positive width (or None for no muP).")
        if self.model_type == MLP_TYPE and self.model_name_or_path is None:
            if self.model_dropout is not None and not 0 <= self.model_dropout < 1:
                raise ValueError(f"model_dropout={self.model_dropout} must be in [0, 1).")
            return
        if self.model_name_or_path is None and self.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"model_type={self.model_type!r} is not a causal-LM type of transformers; use "
                             f"{MLP_TYPE!r} (the MLP arm) or one of gpt2, llama, qwen2, mistral, gemma, "
                             "gpt_neox, opt, falcon, bloom, phi3, mixtral, ...")
        for name in ("hidden_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}.")
        if self.model_dropout is not None and not 0 <= self.model_dropout < 1:
            raise ValueError(f"model_dropout={self.model_dropout} must be in [0, 1).")


_DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout",
                 "dropout", "activation_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob")


def load_tokenizer(model_args: ModelArguments, default_tokenizer):
    """The tokenizer saved with a pretrained model, or `default_tokenizer` for a model from scratch."""
    if model_args.model_name_or_path is None:
        return default_tokenizer
    try:
        return AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                             trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(f"No tokenizer could be loaded from model_name_or_path={model_args.model_name_or_path!r} "
                         f"({err}); save the tokenizer next to the model.") from err


# Names under which model types store the MLP / expert width and the number of experts.
_INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "moe_intermediate_size",
                      "shared_expert_intermediate_size")
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")


def _from_scratch_kwargs(model_args: ModelArguments, tokenizer, max_length: int) -> dict:
    """Config kwargs of `model_type` at the requested sizes, under the names this type uses.

    Sizes the type keeps apart from `hidden_size` are tied to it so that small models stay small: the MLP
    width (`n_inner` of gpt2, `ffn_dim` of opt, `ffn_hidden_size` of falcon, the expert width of MoE types),
    `head_dim` (gemma's default is 256) and opt's `word_embed_proj_dim`. MoE types get `num_experts`
    experts. Special-token ids come from the tokenizer; a default id outside its vocabulary (phi3's pad
    32000) is dropped, since the embedding could not hold it.
    """
    defaults = AutoConfig.for_model(model_args.model_type)

    def settable(key: str) -> bool:
        return hasattr(defaults, key) and not isinstance(getattr(type(defaults), key, None), property)

    width, heads = model_args.hidden_size, model_args.num_heads
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=model_args.num_layers,
                  num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(max_length, 8),
                  n_positions=max(max_length, 8), tie_word_embeddings=True)
    intermediate = model_args.intermediate_size or 4 * width
    kwargs.update({key: intermediate for key in _INTERMEDIATE_KEYS if settable(key)})
    if settable("head_dim"):
        kwargs["head_dim"] = width // heads
    if settable("word_embed_proj_dim"):
        kwargs["word_embed_proj_dim"] = width
    moe_keys = [k for k in _EXPERT_COUNT_KEYS if settable(k) and (getattr(defaults, k) or 0) > 1]
    if moe_keys:
        kwargs.update({key: model_args.num_experts for key in moe_keys})
        if settable("num_experts_per_tok"):
            kwargs["num_experts_per_tok"] = min(defaults.num_experts_per_tok, 2, model_args.num_experts)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value, default = getattr(tokenizer, name, None), getattr(defaults, name, None)
        if value is not None:
            kwargs[name] = value
        elif isinstance(default, int) and not 0 <= default < len(tokenizer):
            kwargs[name] = None
    return kwargs


def build_causal_lm(model_args: ModelArguments, tokenizer, max_length: int):
    """A causal LM for sequences of `max_length` tokens of `tokenizer`'s vocabulary."""
    if model_args.model_name_or_path is not None:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path,
                                            trust_remote_code=model_args.trust_remote_code)
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"{model_args.model_name_or_path!r} is a {config.model_type!r} model, not a causal LM; "
                             "pass a model that AutoModelForCausalLM can load.")
        return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path,
                                                    trust_remote_code=model_args.trust_remote_code)
    config = AutoConfig.for_model(model_args.model_type, **_from_scratch_kwargs(model_args, tokenizer, max_length))
    if model_args.model_dropout is not None:
        for key in _DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, model_args.model_dropout)
    return AutoModelForCausalLM.from_config(config)


def build_boolean_mlp(model_args: ModelArguments, n_bits: int):
    """The MLP arm: a `BooleanMLPForClassification` of width `hidden_size` and `num_layers` hidden layers."""
    from .modeling_mlp import BooleanMLPConfig, BooleanMLPForClassification

    if model_args.model_name_or_path is not None:
        return BooleanMLPForClassification.from_pretrained(model_args.model_name_or_path)
    config = BooleanMLPConfig(n_bits=n_bits, width=model_args.hidden_size, depth=model_args.num_layers,
                              activation=model_args.mlp_activation, dropout=model_args.model_dropout or 0.0,
                              loss=model_args.mlp_loss, readout=model_args.mlp_readout)
    return BooleanMLPForClassification(config)


def apply_parametrization(model, model_args: ModelArguments):
    """muP (`hf_specvol.muparam.apply_mup`) when `mup_base_width` is set; the model unchanged otherwise.

    A model loaded with `model_name_or_path` that was trained in muP gets only the forward-time parts
    (attention scale, readout multiplier) again; its weights are kept.
    """
    from .muparam import apply_mup

    base_width = model_args.mup_base_width
    loaded = model_args.model_name_or_path is not None
    if base_width is None and loaded:
        base_width = getattr(model.config, "mup_base_width", None)
    if base_width is None:
        return model
    return apply_mup(model, base_width, init=not loaded, zero_init_query=model_args.mup_zero_init_query)


def check_causal(model, input_ids: list[int]) -> None:
    """Refuse a model that cannot be trained on this sequence as a causal LM.

    The logits before the last position must not depend on the last token: a bidirectional encoder
    (e.g. BERT loaded as `BertLMHeadModel` without `is_decoder=True`) would read the answer it predicts.
    A sequence longer than the model's position table is refused too.
    """
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and len(input_ids) > limit:
        raise ValueError(f"The task's sequences have {len(input_ids)} tokens but the model has only {limit} "
                         "positions; use fewer bits or a model with more positions.")
    ids = torch.tensor([input_ids], device=model.device)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % model.get_input_embeddings().num_embeddings
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before, after = model(input_ids=ids).logits[0, :-1], model(input_ids=changed).logits[0, :-1]
    model.train(was_training)
    if not torch.allclose(before, after, atol=1e-5):
        raise ValueError(f"{type(model).__name__} is not causal: its logits at earlier positions change with the "
                         "last token, so it would see the answer. Use a decoder-only causal LM (for encoder types "
                         "such as BERT set is_decoder=True in the config).")
