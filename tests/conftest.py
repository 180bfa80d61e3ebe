"""Shared fixtures: offline Hub, tiny models built from configs, tiny Boolean datasets."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One intra-op thread for every test and the subprocesses they start: the models are tiny, and OpenMP
# threads spin-wait for each other when other processes compete for the two CI cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import data_builders  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_single_thread():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def bit_tokenizer():
    return data_builders.build_bit_tokenizer()


@pytest.fixture(scope="session")
def tiny_majority(bit_tokenizer):
    """Tokenized 3-sparse majority of 8 bits: 128 train / 64 validation / 64 test."""
    raw = data_builders.majority(8, 3, seed=0, train_size=128, validation_size=64, test_size=64)
    return raw, data_builders.tokenize_for_causal_lm(raw, bit_tokenizer)


def tiny_gpt2(tokenizer, seq_len=16, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2,
                                  n_positions=seq_len, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture
def make_tiny_gpt2(bit_tokenizer):
    return lambda **overrides: tiny_gpt2(bit_tokenizer, **overrides)
