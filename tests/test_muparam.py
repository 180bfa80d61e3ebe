"""muP: the coordinate check, the parameter classes, LR groups, attention scale and readout against oracles."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_specvol import SpectralVolumeConfig, SpectralVolumeTrainer
from hf_specvol.modeling_mlp import BooleanMLPConfig, BooleanMLPForClassification
from hf_specvol.muparam import (
    apply_mup,
    classify_parameters,
    coord_check,
    coord_check_spread,
    mup_lr_multipliers,
    mup_param_groups,
    plot_coord_check,
)

WIDTHS = (64, 128, 256, 512)


def _mlp(width, depth=3, n_bits=16):
    return BooleanMLPForClassification(BooleanMLPConfig(n_bits=n_bits, width=width, depth=depth))


def _gpt2(width=64, **kw):
    config = AutoConfig.for_model("gpt2", vocab_size=12, n_embd=width, n_layer=2, n_head=4, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _llama(width=64):
    config = AutoConfig.for_model("llama", vocab_size=12, hidden_size=width, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, intermediate_size=2 * width,
                                  max_position_embeddings=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_coordinate_check_mup_is_width_stable_and_sp_is_not(tmp_path):
    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2, (256, 16), generator=generator)
    batch = {"bits": bits, "labels": bits[:, :3].sum(-1) % 2}
    records = [r for mup in (True, False)
               for r in coord_check(_mlp, batch, WIDTHS, base_width=64, steps=3, lr=1e-2, mup=mup)]
    spread = coord_check_spread(records)  # max / min over widths of mean |h_t - h_0|
    for layer in ("layers.0", "layers.1", "layers.2", "readout"):
        assert spread[("muP", layer)] < 2.0, (layer, spread)
    # standard parametrization: the updates of the hidden matrices and of the output grow with width
    assert spread[("SP", "layers.1")] > 4.0 and spread[("SP", "readout")] > 4.0, spread
    sp = {r["width"]: r["mean_abs_change"] for r in records
          if r["parametrization"] == "SP" and r["layer"] == "layers.1" and r["step"] == 3}
    assert sp[512] > 4 * sp[64]
    plot_coord_check(records, save_to=str(tmp_path / "cc.png"))
    assert (tmp_path / "cc.png").read_bytes()[:4] == b"\x89PNG"


def test_parameter_classes_of_gpt2_llama_and_mlp():
    gpt2 = classify_parameters(_gpt2(), base_width=16)
    assert gpt2["transformer.h.0.attn.c_attn.weight"] == "matrix"
    assert gpt2["transformer.h.1.mlp.c_proj.weight"] == "matrix"
    assert gpt2["transformer.wte.weight"] == gpt2["transformer.wpe.weight"] == "vector"
    assert gpt2["transformer.h.0.ln_1.weight"] == gpt2["transformer.h.0.attn.c_attn.bias"] == "vector"
    llama = classify_parameters(_llama(), base_width=16)
    assert llama["model.layers.0.self_attn.q_proj.weight"] == llama["model.layers.1.mlp.down_proj.weight"] == "matrix"
    assert llama["model.embed_tokens.weight"] == llama["model.norm.weight"] == "vector"
    mlp = classify_parameters(_mlp(256), base_width=64)
    assert mlp == {"layers.0.weight": "vector", "layers.0.bias": "vector", "layers.1.weight": "matrix",
                   "layers.1.bias": "vector", "layers.2.weight": "matrix", "layers.2.bias": "vector",
                   "readout.weight": "vector", "readout.bias": "finite"}


def test_learning_rate_multipliers_adam_and_sgd():
    model = _mlp(256)
    adam = mup_lr_multipliers(model, 64, "adam")
    sgd = mup_lr_multipliers(model, 64, "sgd")
    assert adam["layers.1.weight"] == pytest.approx(1 / 4) and adam["layers.0.weight"] == 1.0
    assert sgd["layers.1.weight"] == 1.0 and sgd["layers.0.weight"] == pytest.approx(4.0)
    assert sgd["readout.bias"] == adam["readout.bias"] == 1.0
    groups = mup_param_groups(model, 64, lr=1e-3, weight_decay=0.1, decay_names={"layers.1.weight"})
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["layers.1.weight"])] == (pytest.approx(2.5e-4), 0.1)
    assert by_param[id(named["layers.2.weight"])] == (pytest.approx(2.5e-4), 0.0)
    assert by_param[id(named["readout.weight"])] == (pytest.approx(1e-3), 0.0)
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_missing_base_width_names_the_fix():
    with pytest.raises(ValueError, match="mup_base_width"):
        mup_param_groups(_mlp(64), None, lr=1e-3)
    with pytest.raises(ValueError, match="mup_base_width"):
        apply_mup(_mlp(64), None)


@pytest.mark.parametrize("builder, query", [(_gpt2, "gpt2"), (_llama, "llama")])
def test_attention_scale_and_readout_multiplier_against_an_sp_oracle(builder, query):
    """muP attention c/d_head * sqrt(d_base) equals SP attention with queries scaled by sqrt(1/m), and the logits
    are divided by m: build that SP model by hand and compare logits."""
    base, m = 16, 4
    sp = builder(64)
    mup = apply_mup(copy.deepcopy(sp), base, init=False)
    oracle = copy.deepcopy(sp)
    with torch.no_grad():
        for block in (oracle.transformer.h if query == "gpt2" else oracle.model.layers):
            if query == "gpt2":
                block.attn.c_attn.weight[:, :64] *= m ** -0.5
                block.attn.c_attn.bias[:64] *= m ** -0.5
            else:
                block.self_attn.q_proj.weight *= m ** -0.5
    ids = torch.randint(0, 12, (3, 10))
    torch.testing.assert_close(mup(input_ids=ids).logits, oracle(input_ids=ids).logits / m, rtol=1e-4, atol=1e-6)
    assert mup.config.mup_base_width == base


def test_init_rescale_zero_query_and_reapply_after_loading(tmp_path):
    sp = _gpt2(64)
    model = apply_mup(copy.deepcopy(sp), 16, zero_init_query=True)
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.weight[:, :64]) == 0
    torch.testing.assert_close(model.transformer.h[1].mlp.c_fc.weight, sp.transformer.h[1].mlp.c_fc.weight / 2)
    torch.testing.assert_close(model.transformer.wte.weight, sp.transformer.wte.weight)  # vector-like: unchanged
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.mup_base_width == 16
    apply_mup(loaded, loaded.config.mup_base_width, init=False)
    ids = torch.randint(0, 12, (2, 8))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    apply_mup(loaded, 16, init=False)  # idempotent
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_mlp_readout_scaled_and_tied_zero_readout_refused():
    torch.manual_seed(0)
    sp = _mlp(256, depth=1)
    model = apply_mup(copy.deepcopy(sp), 64)
    torch.testing.assert_close(model.readout.weight, sp.readout.weight * 2)  # sqrt(m) for the 1/fan_in readout
    assert model.config.output_multiplier == pytest.approx(1 / 4)
    bits = torch.randint(0, 2, (4, 16))
    bias = sp.readout.bias
    # readout (W h + b) becomes (2 W h + b) / 4: weights times sqrt(m) = 2, output times 1/m = 1/4
    torch.testing.assert_close(model(bits=bits).logits, (2 * (sp(bits=bits).logits - bias) + bias) / 4)
    with pytest.raises(ValueError, match="tied"):
        apply_mup(_gpt2(64), 16, zero_init_readout=True)


def test_trainer_builds_the_mup_optimizer(tmp_path, tiny_majority, bit_tokenizer):
    from data_builders import answer_token_ids

    model = apply_mup(_gpt2(64, pad_token_id=bit_tokenizer.pad_token_id), 16)
    model.resize_token_embeddings(len(bit_tokenizer))
    args = SpectralVolumeConfig(output_dir=str(tmp_path), report_to="none", max_steps=2, learning_rate=1e-3,
                                weight_decay=0.1, spectral_volume_coef=0.0, track_ranks=False, save_strategy="no",
                                disable_tqdm=True, per_device_train_batch_size=8)
    train = tiny_majority[1]["train"].select_columns(["input_ids", "attention_mask", "labels"])
    trainer = SpectralVolumeTrainer(model=model, args=args, train_dataset=train,
                                    answer_ids=answer_token_ids(bit_tokenizer))
    trainer.train()
    lrs = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            lrs[id(p)] = (group["initial_lr"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert lrs[id(named["transformer.h.0.attn.c_attn.weight"])] == (pytest.approx(2.5e-4), 0.1)
    assert lrs[id(named["transformer.wte.weight"])] == (pytest.approx(1e-3), 0.1)
    assert lrs[id(named["transformer.h.0.ln_1.weight"])] == (pytest.approx(1e-3), 0.0)


@pytest.mark.slow
def test_coordinate_check_gpt2(tmp_path):
    """The same check on a 2-block GPT-2 (widths 64..512): muP within 2x across widths, SP grows > 5x."""
    from hf_specvol.study import write_coord_check

    records = write_coord_check(str(tmp_path), arch="gpt2")
    spread = coord_check_spread(records)
    layers = {layer for _, layer in spread}
    assert "lm_head" in layers and "transformer.h.1.mlp.c_proj" in layers
    assert all(spread[("muP", layer)] < 2.0 for layer in layers), spread
    assert all(spread[("SP", layer)] > 5.0 for layer in layers if layer != "lm_head"), spread
