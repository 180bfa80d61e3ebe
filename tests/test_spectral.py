"""Tests for hf_specvol.spectral against independent numpy oracles."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from hf_specvol import spectral
from hf_specvol.spectral import (
    effective_rank,
    layer_statistics,
    log_volume,
    log_volumes,
    psd_effective_rank,
    spectral_penalty,
    spectrum_effective_rank,
    stable_rank,
    weight_matrices,
)

EPS = 1e-4


def oracle_log_volume(W, eps=EPS):
    """numpy float64: correlation of the taller orientation's columns, slogdet(R + eps I) / r."""
    A = np.asarray(W, dtype=np.float64)
    A = A if A.shape[0] >= A.shape[1] else A.T
    R = np.corrcoef(A, rowvar=False).reshape(A.shape[1], A.shape[1])
    return np.linalg.slogdet(R + eps * np.eye(A.shape[1]))[1] / A.shape[1]


def hadamard(n):
    H = np.ones((1, 1))
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return H


# ---------------------------------------------------------------- log_volume


@pytest.mark.parametrize("shape", [(20, 5), (5, 20), (12, 12), (64, 16), (3, 2)])
def test_log_volume_matches_numpy_oracle(shape):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    value = log_volume(W)
    assert value.dtype == torch.float32 and value.shape == ()
    assert float(value) == pytest.approx(oracle_log_volume(W.numpy()), rel=1e-4, abs=1e-5)


def test_log_volume_batch_and_transpose_invariance():
    W = torch.randn(4, 10, 6, generator=torch.Generator().manual_seed(0))
    values = log_volume(W)
    assert values.shape == (4,)
    expected = [oracle_log_volume(w) for w in W.numpy()]
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(log_volume(W.transpose(-1, -2)).numpy(), values.numpy(), rtol=1e-6)


def test_uncorrelated_columns_give_zero_log_volume():
    # Columns 1..7 of a Hadamard matrix are centered and mutually orthogonal: R = I.
    H = hadamard(8)[:, 1:]
    A = H * np.linspace(0.5, 3.0, 7) + np.arange(7)  # per-column scale and offset do not matter
    value = float(log_volume(torch.tensor(A, dtype=torch.float64)))
    assert value == pytest.approx(math.log(1 + EPS), abs=1e-12)
    assert float(log_volume(torch.tensor(A.T, dtype=torch.float32))) == pytest.approx(
        math.log(1 + EPS), abs=1e-6
    )


def test_correlated_columns_give_very_negative_log_volume():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(50, 1, generator=g)
    W = base + 1e-3 * torch.randn(50, 8, generator=g)
    value = float(log_volume(W))
    assert value < -5.0
    assert value == pytest.approx(oracle_log_volume(W.double().numpy()), rel=1e-3)


def test_log_volume_float64_path():
    W = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    value = log_volume(W)
    assert value.dtype == torch.float64
    assert float(value) == pytest.approx(oracle_log_volume(W.numpy()), rel=1e-10)


def test_log_volume_bf16_under_autocast_is_float32():
    W = torch.randn(16, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = log_volume(W)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert float(value) == pytest.approx(oracle_log_volume(W.float().numpy()), rel=1e-4)


def _degenerate_cases():
    g = torch.Generator().manual_seed(4)
    random = torch.randn(6, 4, generator=g)
    return {
        "zero": torch.zeros(5, 3),
        "constant_rows": torch.arange(6.0)[:, None].expand(6, 4).clone(),
        "constant_columns": torch.arange(4.0)[None, :].expand(6, 4).clone(),
        "rank_one": torch.randn(6, 1, generator=g) @ torch.randn(1, 4, generator=g),
        "row_vector": torch.randn(1, 7, generator=g),
        "column_vector": torch.randn(7, 1, generator=g),
        "scalar": torch.full((1, 1), 0.3),
        "tiny_scale": 1e-20 * random,
        "huge_scale": 1e20 * random,
    }


@pytest.mark.parametrize("case", list(_degenerate_cases()))
def test_degenerate_matrices_have_finite_values_and_gradients(case):
    W = _degenerate_cases()[case].requires_grad_()
    value = log_volume(W)
    value.backward()
    value = float(value.detach())
    assert math.isfinite(value) and math.log(EPS) - 1e-4 <= value <= math.log(1 + EPS) + 1e-6
    assert W.grad is not None and torch.isfinite(W.grad).all()


def test_degenerate_closed_forms():
    cases = _degenerate_cases()
    # All coordinates dead -> log(eps); one live coordinate -> log(1 + eps).
    assert float(log_volume(cases["zero"])) == pytest.approx(math.log(EPS), rel=1e-6)
    assert float(log_volume(cases["scalar"])) == pytest.approx(math.log(EPS), rel=1e-6)
    assert float(log_volume(cases["column_vector"])) == pytest.approx(math.log(1 + EPS), abs=1e-6)
    assert float(log_volume(cases["row_vector"])) == pytest.approx(math.log(1 + EPS), abs=1e-6)
    # Constant rows: all columns identical, R = ones(4, 4): eigenvalues 4, 0, 0, 0.
    expected = (math.log(4 + EPS) + 3 * math.log(EPS)) / 4
    assert float(log_volume(cases["constant_rows"].double())) == pytest.approx(expected, rel=1e-9)
    tiny = cases["tiny_scale"]
    assert float(log_volume(tiny)) == pytest.approx(oracle_log_volume(tiny.double().numpy() * 1e20), rel=1e-4)


def test_dead_coordinate_counts_as_collapsed_volume_with_zero_gradient():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(10, 4, dtype=torch.float64, generator=g)
    W[:, 2] = 1.5  # constant column of A: a dead coordinate
    live = np.delete(W.numpy(), 2, axis=1)
    R = np.corrcoef(live, rowvar=False)
    expected = (np.linalg.slogdet(R + EPS * np.eye(3))[1] + math.log(EPS)) / 4
    W.requires_grad_()
    value = log_volume(W)
    value.backward()
    assert float(value.detach()) == pytest.approx(expected, rel=1e-10)
    assert torch.all(W.grad[:, 2] == 0)


def test_log_volume_gradcheck_float64():
    W = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: log_volume(w, eps=1e-3), (W,))
    V = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: spectral_penalty([a, b]), (W, V))


# ---------------------------------------------------------------- penalty


def test_spectral_penalty_is_minus_mean_of_oracle(monkeypatch):
    g = torch.Generator().manual_seed(8)
    mats = {
        "a": torch.randn(10, 4, generator=g),
        "b": torch.randn(4, 10, generator=g),  # same group as "a" once put upright
        "c": torch.randn(10, 4, generator=g),
        "d": torch.randn(5, 5, generator=g),
        "e": torch.randn(7, 3, generator=g),
    }
    calls = []
    original = spectral.log_volume
    monkeypatch.setattr(spectral, "log_volume", lambda W, eps: calls.append(W.shape) or original(W, eps))
    penalty = spectral_penalty(mats)
    assert len(calls) == 3  # one batched call per distinct (upright) shape
    expected = -np.mean([oracle_log_volume(m.numpy()) for m in mats.values()])
    assert float(penalty) == pytest.approx(expected, rel=1e-4)
    per_matrix = log_volumes(mats)
    assert list(per_matrix) == list(mats)
    for name, m in mats.items():
        assert float(per_matrix[name]) == pytest.approx(oracle_log_volume(m.numpy()), rel=1e-4)
    assert float(spectral_penalty(list(mats.values()))) == pytest.approx(expected, rel=1e-4)
    assert float(spectral_penalty({})) == 0.0


# ---------------------------------------------------------------- ranks


def test_effective_rank_closed_forms_and_oracle():
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0)
    assert effective_rank(torch.randn(6, 1) @ torch.randn(1, 5)) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.zeros(4, 3)) == 0.0
    for shape in [(8, 5), (5, 8), (16, 16)]:
        W = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0] * shape[1]))
        s = np.linalg.svd(W.double().numpy(), compute_uv=False)
        p = s / s.sum()
        assert effective_rank(W) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)


def test_spectrum_and_psd_effective_rank():
    assert spectrum_effective_rank(torch.tensor([2.0, 2.0, 0.0, 0.0])) == pytest.approx(2.0)
    assert spectrum_effective_rank(torch.zeros(3)) == 0.0
    X = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    K = X @ X.T  # PSD, rank 4, with round-off negative eigenvalues
    lam = np.clip(np.linalg.eigvalsh(K.numpy()), 0, None)
    p = lam[lam > 0] / lam.sum()
    assert psd_effective_rank(K) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-6)
    assert 1.0 <= psd_effective_rank(K) <= 4.0 + 1e-6


def test_stable_rank_matches_numpy():
    W = torch.randn(9, 6, generator=torch.Generator().manual_seed(10))
    A = W.double().numpy()
    expected = np.linalg.norm(A, "fro") ** 2 / np.linalg.norm(A, 2) ** 2
    assert stable_rank(W) == pytest.approx(expected, rel=1e-9)
    assert stable_rank(torch.eye(5)) == pytest.approx(5.0)
    assert stable_rank(torch.zeros(3, 3)) == 0.0


# ---------------------------------------------------------------- weight_matrices


def tiny_gpt2(**kwargs):
    config = AutoConfig.for_model(
        "gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=16, n_positions=32, **kwargs
    )
    torch.manual_seed(0)
    return config, AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("tied", [True, False])
def test_weight_matrices_gpt2(tied):
    config, model = tiny_gpt2(tie_word_embeddings=tied)
    d = config.n_embd
    per_block = {
        "attn.c_attn": (3 * d, d),
        "attn.c_proj": (d, d),
        "mlp.c_fc": (4 * d, d),
        "mlp.c_proj": (d, 4 * d),
    }
    expected = {
        f"transformer.h.{i}.{k}.weight": shape
        for i in range(config.n_layer)
        for k, shape in per_block.items()
    }
    mats = weight_matrices(model)
    assert {k: tuple(v.shape) for k, v in mats.items()} == expected
    # Views of the parameters (Conv1D transposed), not copies.
    c_attn = model.transformer.h[0].attn.c_attn.weight
    assert mats["transformer.h.0.attn.c_attn.weight"].data_ptr() == c_attn.data_ptr()
    assert torch.equal(mats["transformer.h.0.attn.c_attn.weight"], c_attn.T)
    spectral_penalty(mats).backward()
    assert c_attn.grad is not None and c_attn.grad.abs().sum() > 0
    assert model.transformer.wte.weight.grad is None and model.transformer.wpe.weight.grad is None
    assert model.lm_head.weight.grad is None


def test_weight_matrices_include_exclude_and_plain_module():
    _, model = tiny_gpt2()
    assert set(weight_matrices(model, include=r"\.mlp\.")) == {
        f"transformer.h.{i}.mlp.{k}.weight" for i in range(2) for k in ("c_fc", "c_proj")
    }
    assert all("h.0" not in k for k in weight_matrices(model, exclude=r"h\.0\."))
    mlp = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 2))
    assert {k: tuple(v.shape) for k, v in weight_matrices(mlp).items()} == {
        "0.weight": (8, 5),
        "3.weight": (2, 8),
    }


def test_weight_matrices_excludes_tied_linear_by_parameter_identity():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 6)
            self.body = nn.Linear(6, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.embed.weight

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            raise NotImplementedError

    assert list(weight_matrices(TiedLM())) == ["body.weight"]


def test_weight_matrices_llama():
    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=16,
    )
    model = AutoModelForCausalLM.from_config(config)
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    per_layer = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    expected = {
        f"model.layers.{n}.{k}.weight": s
        for n in range(config.num_hidden_layers)
        for k, s in per_layer.items()
    }
    assert {k: tuple(v.shape) for k, v in weight_matrices(model).items()} == expected


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_weight_matrices_moe_experts(model_type):
    common = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 16,
    }
    if model_type == "mixtral":
        config = AutoConfig.for_model("mixtral", intermediate_size=48, num_local_experts=3, **common)
        experts, inter = config.num_local_experts, config.intermediate_size
    else:
        config = AutoConfig.for_model(
            "qwen3_moe", intermediate_size=64, moe_intermediate_size=24, num_experts=3, head_dim=8, **common
        )
        experts, inter = config.num_experts, config.moe_intermediate_size
    model = AutoModelForCausalLM.from_config(config)
    mats = weight_matrices(model)
    h, layers = config.hidden_size, config.num_hidden_layers
    expert_mats = {k: v for k, v in mats.items() if ".experts." in k}
    assert len(expert_mats) == layers * experts * 2
    for n in range(layers):
        for e in range(experts):
            assert mats[f"model.layers.{n}.mlp.experts.gate_up_proj.{e}"].shape == (2 * inter, h)
            assert mats[f"model.layers.{n}.mlp.experts.down_proj.{e}"].shape == (h, inter)
        assert mats[f"model.layers.{n}.mlp.gate.weight"].shape == (experts, h)  # router
    assert not any("embed_tokens" in k or "lm_head" in k or "norm" in k for k in mats)
    spectral_penalty(mats).backward()
    grad = model.model.layers[0].mlp.experts.down_proj.grad
    assert grad is not None and (grad.abs().sum(dim=(1, 2)) > 0).all()


def test_weight_matrices_transposed_experts_and_biases():
    class Experts(nn.Module):
        is_transposed = True

        def __init__(self):
            super().__init__()
            self.num_experts = 2
            self.up = nn.Parameter(torch.randn(2, 5, 7))  # (E, in, out)
            self.up_bias = nn.Parameter(torch.randn(2, 7))

    mats = weight_matrices(nn.ModuleDict({"experts": Experts()}))
    assert {k: tuple(v.shape) for k, v in mats.items()} == {"experts.up.0": (7, 5), "experts.up.1": (7, 5)}


def test_layer_statistics_matches_numpy():
    mlp = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    stats = layer_statistics(mlp)
    assert set(stats) == {"0.weight", "2.weight"}
    W = mlp[2].weight.detach().double().numpy()  # (3, 8)
    s = np.linalg.svd(W, compute_uv=False)
    p = s / s.sum()
    entry = stats["2.weight"]
    assert entry["shape"] == [3, 8]
    assert entry["erank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    assert entry["stable_rank"] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-9)
    assert entry["log_volume"] == pytest.approx(oracle_log_volume(W), rel=1e-9)
    assert all(p.grad is None for p in mlp.parameters())
