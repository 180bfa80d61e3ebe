"""Memory-bounded chunking of the empirical NTK: working-set estimate, chunk sizes, same kernel."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from hf_specvol import ntk
from hf_specvol.ntk import _chunk_size, _plan_blocks, _saved_bytes_per_example, empirical_ntk

ANSWER_IDS = (3, 5)


def brute_force_ntk(model, ids):
    """One autograd backward per example over every parameter, K = J J^T in float64."""
    model.eval()
    rows = []
    for example in ids:
        logits = model(input_ids=example[None]).logits[0, -1]
        grads = torch.autograd.grad(logits[ANSWER_IDS[1]] - logits[ANSWER_IDS[0]], list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    J = torch.stack(rows)
    return J @ J.T


@pytest.fixture(scope="module")
def gpt2():
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=12, n_positions=16)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_saved_bytes_count_activations_not_parameters():
    # y = w2(tanh(w1 x)): autograd saves x (for w1's gradient), tanh's output (for tanh and for w2's
    # gradient); the weights themselves are not counted. Output (1, 3) and its gradient: 2 * 3 floats.
    big = nn.Sequential(nn.Linear(8, 4096, bias=False), nn.Tanh(), nn.Linear(4096, 3, bias=False))
    saved = _saved_bytes_per_example(big, {"input": torch.randn(5, 8)}, {})
    expected = 4 * (8 + 4096 + 4096) + 2 * 4 * 3
    assert saved == expected  # the 180 KB of weights are not in it


def test_saved_bytes_grow_with_sequence_length(gpt2):
    short = _saved_bytes_per_example(gpt2, {"input_ids": torch.zeros(2, 4, dtype=torch.long)}, {"use_cache": False})
    long = _saved_bytes_per_example(gpt2, {"input_ids": torch.zeros(2, 12, dtype=torch.long)}, {"use_cache": False})
    assert 2.5 < long / short < 4.5  # mostly linear in tokens (attention adds a little)


def test_chunk_size_closed_form():
    params = {"a": torch.zeros(1000), "b": torch.zeros(10)}
    block = [("a", 0, 500), ("b", 0, 10)]
    per_example = 2 * 100 + 3 * 4 * (1000 + 10)  # activations twice, touched parameters' full size 3 times
    assert _chunk_size(block, params, 100, 10 * per_example, 64) == 10
    assert _chunk_size(block, params, 100, 10 * per_example, 4) == 4  # the user's upper bound wins
    assert _chunk_size(block, params, 100, per_example - 1, 64) == 1  # never below one example


def test_small_budget_gives_small_chunks_and_the_same_kernel(gpt2, monkeypatch):
    ids = torch.randint(0, 12, (7, 6), generator=torch.Generator().manual_seed(1))
    sizes = []

    def spy(*args):
        sizes.append(_chunk_size(*args))
        return sizes[-1]

    monkeypatch.setattr(ntk, "_chunk_size", spy)
    monkeypatch.setattr(ntk, "_MIN_CHUNK_BUDGET", 0)
    params = dict(gpt2.named_parameters())
    cap_bytes = 7 * 4 * 600
    K = empirical_ntk(gpt2, {"input_ids": ids}, answer_ids=ANSWER_IDS, max_block_bytes=cap_bytes,
                      example_chunk_size=64)
    blocks = _plan_blocks(params, 600)
    assert len(sizes) == len(blocks) and min(sizes) == 1 and max(sizes) < 7  # the bound cut every chunk
    torch.testing.assert_close(K, brute_force_ntk(gpt2, ids), rtol=1e-4, atol=1e-4 * float(K.abs().max()))
    assert torch.equal(K, K.T)
