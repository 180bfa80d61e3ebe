"""Tests for hf_specvol.ntk against a brute-force Jacobian oracle and numpy formulas."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from hf_specvol.ntk import (
    _plan_blocks,
    answer_margin,
    empirical_ntk,
    kernel_distance,
    kernel_effective_rank,
    kernel_target_alignment,
    ntk_statistics,
)

ANSWER_IDS = (3, 5)  # token ids of the answers "0" and "1"


def brute_force_ntk(model, inputs, output_fn):
    """Loop over examples: autograd.grad of the scalar output w.r.t. every trainable parameter, K = J J^T."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    rows = []
    num = next(iter(inputs.values())).shape[0]
    for i in range(num):
        out = output_fn(model, {k: v[i : i + 1] for k, v in inputs.items()})
        grads = torch.autograd.grad(out.reshape(()), params, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
            )
        )
    model.train(was_training)
    J = torch.stack(rows).double()
    return J @ J.T


def lm_margin(position):
    def fn(model, batch):
        logits = model(**batch).logits
        return logits[:, position, ANSWER_IDS[1]] - logits[:, position, ANSWER_IDS[0]]

    return fn


@pytest.fixture(scope="module")
def gpt2_and_probes():
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=16, n_positions=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    probes = {"input_ids": torch.randint(0, 16, (6, 9), generator=torch.Generator().manual_seed(1))}
    return model, probes


def assert_kernels_close(K, K_ref):
    assert K.dtype == torch.float64 and K.shape == K_ref.shape
    torch.testing.assert_close(K, K_ref, rtol=1e-4, atol=1e-4 * K_ref.abs().max().item())


@pytest.mark.parametrize("position", [None, 4])
def test_gpt2_ntk_matches_brute_force(gpt2_and_probes, position):
    model, probes = gpt2_and_probes
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    K = empirical_ntk(model, probes, answer_position=position, answer_ids=ANSWER_IDS)
    # Measurement leaves the model as it was: training mode, parameters, no gradients.
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    K_ref = brute_force_ntk(model, probes, lm_margin(-1 if position is None else position))
    assert_kernels_close(K, K_ref)
    torch.testing.assert_close(K, K.T)


def test_gpt2_ntk_with_tiny_blocks_and_split_parameters(gpt2_and_probes):
    model, probes = gpt2_and_probes
    num_probes, cap = 6, 700
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    blocks = _plan_blocks(params, cap)
    # The plan covers every element exactly once, blocks respect the cap and big parameters are split.
    assert all(sum(b - a for _, a, b in block) <= cap for block in blocks)
    covered = {n: [] for n in params}
    for block in blocks:
        for name, a, b in block:
            covered[name].append((a, b))
    for name, spans in covered.items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == params[name].numel()
        assert all(s[1] == t[0] for s, t in itertools.pairwise(spans))
    assert len(covered["transformer.h.0.mlp.c_fc.weight"]) > 1
    K = empirical_ntk(
        model, probes, answer_ids=ANSWER_IDS, max_block_bytes=num_probes * 4 * cap, example_chunk_size=4
    )
    assert_kernels_close(K, brute_force_ntk(model, probes, lm_margin(-1)))


def test_mlp_ntk_matches_brute_force_and_frozen_parameters_are_skipped():
    torch.manual_seed(2)
    mlp = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))
    inputs = {"input": torch.randn(7, 5, generator=torch.Generator().manual_seed(3))}

    def margin(model, batch):
        out = model(batch["input"])
        return out[:, 1] - out[:, 0]

    mlp.train()
    K = empirical_ntk(mlp, inputs, max_block_bytes=7 * 4 * 30, example_chunk_size=3)
    assert_kernels_close(K, brute_force_ntk(mlp, inputs, margin))
    assert mlp.training
    mlp[0].weight.requires_grad_(False)
    K_frozen = empirical_ntk(mlp, inputs)
    assert_kernels_close(K_frozen, brute_force_ntk(mlp, inputs, margin))
    assert not torch.allclose(K_frozen, K)


def test_answer_margin_shapes():
    lm = torch.arange(2 * 3 * 6, dtype=torch.float32).reshape(2, 3, 6)
    torch.testing.assert_close(answer_margin(lm, None, (1, 4)), lm[:, -1, 4] - lm[:, -1, 1])
    torch.testing.assert_close(answer_margin(lm, 0, (1, 4)), lm[:, 0, 4] - lm[:, 0, 1])
    two = torch.tensor([[1.0, 3.0], [2.0, -1.0]])
    torch.testing.assert_close(answer_margin(two), torch.tensor([2.0, -3.0]))
    torch.testing.assert_close(answer_margin(two[:, :1]), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(answer_margin(two[:, 0]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="answer_ids"):
        answer_margin(lm)


# ---------------------------------------------------------------- statistics


def numpy_kta(K, labels):
    y = 2.0 * np.asarray(labels, dtype=np.float64) - 1.0
    y = y - y.mean()
    return float(y @ K @ y / (np.linalg.norm(K, "fro") * (y @ y)))


def test_kernel_target_alignment():
    labels = [1, 0, 1, 1, 0, 0]
    y = 2.0 * torch.tensor(labels, dtype=torch.float64) - 1.0
    assert kernel_target_alignment(torch.outer(y, y), labels) == pytest.approx(1.0)
    assert kernel_target_alignment(-torch.outer(y, y), labels) == pytest.approx(-1.0)
    X = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    K = X @ X.T
    unbalanced = [1, 1, 1, 0, 1, 0]
    assert kernel_target_alignment(K, unbalanced) == pytest.approx(
        numpy_kta(K.numpy(), unbalanced), rel=1e-12
    )
    assert kernel_target_alignment(K, [1] * 6) == 0.0
    assert kernel_target_alignment(torch.zeros(6, 6), labels) == 0.0


def test_kernel_distance_and_rank():
    X = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    K = X @ X.T
    assert kernel_distance(K, 2 * K) == pytest.approx(0.0, abs=1e-12)
    assert kernel_distance(torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 3.0]))) == 1.0
    K2 = K + torch.eye(5, dtype=torch.float64)
    expected = 1 - (K * K2).sum() / (K.norm() * K2.norm())
    assert kernel_distance(K, K2) == pytest.approx(float(expected), rel=1e-12)
    assert kernel_effective_rank(torch.eye(4)) == pytest.approx(4.0)
    stats = ntk_statistics(K2, [0, 1, 0, 1, 1], K0=K)
    assert set(stats) == {"erank", "alignment", "distance"}
    assert stats["distance"] == pytest.approx(kernel_distance(K, K2))
    assert stats["alignment"] == pytest.approx(numpy_kta(K2.numpy(), [0, 1, 0, 1, 1]))
    lam = np.linalg.eigvalsh(K2.numpy())
    p = lam / lam.sum()
    assert stats["erank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    assert ntk_statistics(K, [0, 1, 0, 1, 1])["distance"] == 0.0
