"""Any HF causal LM: tiny models of many architectures train with the penalty and the tracker.

The matrices expected in scope are written down per architecture from its config (layer count, widths,
head sizes, experts) and the architecture's published layout, not from `weight_matrices`: the input
embedding, the LM head, norms and biases are out; every projection is in, fused QKV as one matrix, MoE
routers as one matrix and 3-D expert tensors expert by expert.
"""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import data_builders
from hf_specvol import SpectralVolumeConfig, SpectralVolumeTrainer
from hf_specvol.models import ModelArguments, build_causal_lm
from hf_specvol.pipeline import BooleanTaskArguments, train_boolean_task
from hf_specvol.spectral import weight_matrices

TRAIN_COLUMNS = ["input_ids", "attention_mask", "labels"]


def _head_dim(c):
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _llama_like(c, prefix="model.layers"):
    h, i, hd = c.hidden_size, c.intermediate_size, _head_dim(c)
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    per_layer = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return {f"{prefix}.{n}.{k}.weight": s for n in range(c.num_hidden_layers) for k, s in per_layer.items()}


def _gpt2(c):
    h = c.n_embd
    i = c.n_inner or 4 * h
    per_layer = {"attn.c_attn": (3 * h, h), "attn.c_proj": (h, h), "mlp.c_fc": (i, h), "mlp.c_proj": (h, i)}
    return {f"transformer.h.{n}.{k}.weight": s for n in range(c.n_layer) for k, s in per_layer.items()}


def _gpt_neox(c):
    h, i = c.hidden_size, c.intermediate_size
    per_layer = {"attention.query_key_value": (3 * h, h), "attention.dense": (h, h),
                 "mlp.dense_h_to_4h": (i, h), "mlp.dense_4h_to_h": (h, i)}
    return {f"gpt_neox.layers.{n}.{k}.weight": s for n in range(c.num_hidden_layers) for k, s in per_layer.items()}


def _opt(c):
    h, f = c.hidden_size, c.ffn_dim
    per_layer = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
                 "self_attn.out_proj": (h, h), "fc1": (f, h), "fc2": (h, f)}
    expected = {f"model.decoder.layers.{n}.{k}.weight": s for n in range(c.num_hidden_layers)
                for k, s in per_layer.items()}
    if c.word_embed_proj_dim != h:
        expected |= {"model.decoder.project_in.weight": (h, c.word_embed_proj_dim),
                     "model.decoder.project_out.weight": (c.word_embed_proj_dim, h)}
    return expected


def _falcon(c):
    h, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    if c.new_decoder_architecture:
        qkv = (c.num_attention_heads + 2 * c.num_kv_heads) * hd
    elif c.multi_query:
        qkv = h + 2 * hd
    else:
        qkv = 3 * h
    f = c.ffn_hidden_size
    per_layer = {"self_attention.query_key_value": (qkv, h), "self_attention.dense": (h, h),
                 "mlp.dense_h_to_4h": (f, h), "mlp.dense_4h_to_h": (h, f)}
    return {f"transformer.h.{n}.{k}.weight": s for n in range(c.num_hidden_layers) for k, s in per_layer.items()}


def _bloom(c):
    h = c.hidden_size
    per_layer = {"self_attention.query_key_value": (3 * h, h), "self_attention.dense": (h, h),
                 "mlp.dense_h_to_4h": (4 * h, h), "mlp.dense_4h_to_h": (h, 4 * h)}
    return {f"transformer.h.{n}.{k}.weight": s for n in range(c.n_layer) for k, s in per_layer.items()}


def _phi3(c):
    h, i, hd = c.hidden_size, c.intermediate_size, _head_dim(c)
    q = c.num_attention_heads * hd
    per_layer = {"self_attn.qkv_proj": (q + 2 * c.num_key_value_heads * hd, h), "self_attn.o_proj": (h, q),
                 "mlp.gate_up_proj": (2 * i, h), "mlp.down_proj": (h, i)}
    return {f"model.layers.{n}.{k}.weight": s for n in range(c.num_hidden_layers) for k, s in per_layer.items()}


def _moe(c, experts, width):
    h, hd = c.hidden_size, _head_dim(c)
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    expected = {}
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}"
        expected |= {f"{p}.self_attn.q_proj.weight": (q, h), f"{p}.self_attn.k_proj.weight": (kv, h),
                     f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, q),
                     f"{p}.mlp.gate.weight": (experts, h)}  # the router
        for e in range(experts):
            expected |= {f"{p}.mlp.experts.gate_up_proj.{e}": (2 * width, h),
                         f"{p}.mlp.experts.down_proj.{e}": (h, width)}
    return expected


def _qwen3_moe(c):
    assert c.decoder_sparse_step == 1 and not c.mlp_only_layers  # every layer is sparse
    return _moe(c, c.num_experts, c.moe_intermediate_size)


EXPECTED = {
    "gpt2": _gpt2, "llama": _llama_like, "qwen2": _llama_like, "mistral": _llama_like, "gemma": _llama_like,
    "gpt_neox": _gpt_neox, "opt": _opt, "falcon": _falcon, "bloom": _bloom, "phi3": _phi3,
    "mixtral": lambda c: _moe(c, c.num_local_experts, c.intermediate_size), "qwen3_moe": _qwen3_moe,
}


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                  disable_tqdm=True, seed=0, logging_steps=1, per_device_train_batch_size=16, max_steps=3,
                  learning_rate=1e-2, spectral_volume_coef=0.5, spectral_expansion_epochs=0.25,
                  ntk_probe_size=4, ntk_interval_steps=3, rank_interval_steps=3, rank_snapshot_epochs=[1],
                  dataloader_num_workers=0)
    values.update(overrides)
    return SpectralVolumeConfig(**values)


def _train_and_check(tmp_path, model, tiny_majority, answer_ids, expected):
    data = tiny_majority[1]
    before = {k: v.detach().clone() for k, v in weight_matrices(model).items()}
    trainer = SpectralVolumeTrainer(model=model, args=_args(tmp_path), answer_ids=answer_ids,
                                    train_dataset=data["train"].select_columns(TRAIN_COLUMNS),
                                    eval_dataset=data["validation"])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(h["spectral/penalty"] > 0 and h["spectral/skipped"] == 0 for h in logged)
    after = weight_matrices(model)
    # every matrix in scope (every single expert included) got the penalty's gradient and moved
    still = [k for k in expected if torch.equal(after[k], before[k])]
    assert not still, f"matrices that did not move: {still}"
    tracker = trainer.tracker
    assert [r["step"] for r in tracker.ntk_history] == [0, 3]
    assert all(r["erank"] >= 1 - 1e-9 and 0 <= r["distance"] <= 1 for r in tracker.ntk_history)
    assert set(tracker.rank_history[-1]["layers"]) == set(expected)


@pytest.mark.parametrize("model_type", list(EXPECTED))
def test_tiny_model_trains_with_penalty_and_tracker(model_type, tmp_path, tiny_majority, bit_tokenizer):
    args = ModelArguments(model_type=model_type, hidden_size=16, num_layers=2, num_heads=2, num_experts=3)
    seq_len = len(tiny_majority[1]["train"][0]["input_ids"])
    torch.manual_seed(0)
    model = build_causal_lm(args, bit_tokenizer, seq_len)
    expected = EXPECTED[model_type](model.config)
    assert {k: tuple(v.shape) for k, v in weight_matrices(model).items()} == expected
    _train_and_check(tmp_path, model, tiny_majority, data_builders.answer_token_ids(bit_tokenizer), expected)


def _byte_level_bpe(merges: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained offline on bit prompts, with up to `merges` merges.

    With 3 merges " 0", " 1" and " =" become single tokens ("Ġ0", "Ġ1", "Ġ="); with 0 merges " 0" is two.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = trainers.BpeTrainer(vocab_size=len(alphabet) + 1 + merges, initial_alphabet=alphabet,
                              special_tokens=["<|endoftext|>"], show_progress=False)
    backend.train_from_iterator(["1 0 1 1 = 1", "0 0 1 = 0"] * 20, bpe)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


TASK = dict(n_bits=7, k=3, train_size=48, validation_size=16, test_size=16)


def test_model_saved_and_loaded_by_path_with_its_own_tokenizer(tmp_path, monkeypatch):
    tokenizer = _byte_level_bpe(merges=3)
    ids = tokenizer.convert_tokens_to_ids(["Ġ0", "Ġ1"])
    assert ids != [4, 5] and tokenizer.unk_token_id is None  # answer ids must be looked up
    source = tmp_path / "pretrained"
    torch.manual_seed(0)
    build_causal_lm(ModelArguments(model_type="llama", hidden_size=16, num_layers=1, num_heads=2),
                    tokenizer, 16).save_pretrained(source)
    tokenizer.save_pretrained(source)
    assert (source / "model.safetensors").is_file()
    original = AutoModelForCausalLM.from_pretrained(source)

    trainers_seen = []
    original_train = SpectralVolumeTrainer.train
    monkeypatch.setattr(SpectralVolumeTrainer, "train",
                        lambda self, *a, **k: trainers_seen.append(self) or original_train(self, *a, **k))
    out = tmp_path / "run"
    args = _args(tmp_path, output_dir=str(out), max_steps=-1, num_train_epochs=1, spectral_expansion_epochs=1,
                 ntk_interval_steps=2, rank_snapshot_epochs=[1])
    results = train_boolean_task(BooleanTaskArguments(**TASK), ModelArguments(model_name_or_path=str(source)), args)

    (trainer,) = trainers_seen
    assert trainer.answer_ids == tuple(ids)
    answers = {t for row in trainer.train_dataset["labels"] for t in row if t != -100}
    assert answers == set(ids)
    assert results["model"]["type"] == "llama" and results["global_step"] == 3
    assert set(results["rank_report"]["snapshots"]["1"]["layers"]) == set(_llama_like(original.config))
    # trained from the saved weights (not re-initialized), saved back with the tokenizer, as safetensors
    trained = AutoModelForCausalLM.from_pretrained(out)
    name = "model.layers.0.mlp.down_proj.weight"
    start, end = original.state_dict()[name], trained.state_dict()[name]
    assert 0 < (end - start).abs().max() < 0.2
    assert (out / "model.safetensors").is_file() and not list(out.glob("pytorch_model*.bin"))
    assert json.loads((out / "tokenizer_config.json").read_text())  # the tokenizer travelled with the model


def test_answer_split_into_two_tokens_is_a_clear_error(tmp_path):
    tokenizer = _byte_level_bpe(merges=0)
    assert len(tokenizer(" 0", add_special_tokens=False)["input_ids"]) == 2
    source = tmp_path / "pretrained"
    build_causal_lm(ModelArguments(model_type="gpt2", hidden_size=16, num_layers=1, num_heads=2),
                    tokenizer, 16).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"maps the answer ' 0' to .* one known token per answer"):
        train_boolean_task(BooleanTaskArguments(**TASK), ModelArguments(model_name_or_path=str(source)),
                           _args(tmp_path, output_dir=str(out)))
    assert not out.exists() or not any(out.iterdir())


def test_remote_code_is_off_unless_asked(tmp_path, bit_tokenizer):
    assert ModelArguments().trust_remote_code is False
    source = tmp_path / "custom"
    build_causal_lm(ModelArguments(model_type="gpt2", hidden_size=16, num_layers=1, num_heads=2),
                    bit_tokenizer, 16).save_pretrained(source)
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (source / "config.json").write_text(json.dumps(config))
    (source / "configuration_evil.py").write_text("raise SystemExit('remote code ran')\n")
    model = build_causal_lm(ModelArguments(model_name_or_path=str(source)), bit_tokenizer, 16)
    assert type(model).__name__ == "GPT2LMHeadModel"  # the library's class; the repository's code never ran
    with pytest.raises(SystemExit, match="remote code ran"):  # only when asked for
        build_causal_lm(ModelArguments(model_name_or_path=str(source), trust_remote_code=True), bit_tokenizer, 16)


def test_ntk_of_a_model_torch_func_cannot_transform_matches_brute_force(bit_tokenizer):
    """BLOOM's GeLU is an autograd.Function without setup_context: the NTK falls back to plain autograd."""
    from hf_specvol.ntk import empirical_ntk

    torch.manual_seed(0)
    model = build_causal_lm(ModelArguments(model_type="bloom", hidden_size=16, num_layers=1, num_heads=2),
                            bit_tokenizer, 10).eval()
    ids = torch.randint(4, 7, (5, 8), generator=torch.Generator().manual_seed(1))
    kernel = empirical_ntk(model, {"input_ids": ids}, answer_ids=(4, 5), max_block_bytes=2000)  # several blocks
    rows = []
    for example in ids:
        logits = model(input_ids=example[None]).logits[0, -1]
        grads = torch.autograd.grad(logits[5] - logits[4], list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    jacobian = torch.stack(rows)
    torch.testing.assert_close(kernel, jacobian @ jacobian.T, rtol=1e-5, atol=1e-5)  # float32 Jacobians
