"""End-to-end: the train_majority recipe as a user runs it, on a tiny task, in seconds."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_bits", "7", "--k", "3", "--train_size", "96", "--validation_size", "16", "--test_size", "16",
        "--hidden_size", "16", "--num_layers", "1", "--num_heads", "2", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "16", "--spectral_expansion_epochs", "1", "--spectral_decay_epochs", "0",
        "--ntk_probe_size", "8",
        "--ntk_interval_steps", "4", "--rank_interval_steps", "4", "--rank_snapshot_epochs", "2",
        "--logging_steps", "2", "--disable_tqdm", "true"]


def _run(script, *args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "recipes", script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_majority_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = _run("train_majority.py", *TINY, "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "results.json",
                 "rank_report.json", "tracking_history.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["task"] == "majority" and results["task"]["k"] == 3
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert results["generalization_gap"] == pytest.approx(results["train_accuracy"] - results["test_accuracy"])
    report = json.loads((out / "rank_report.json").read_text())
    layers = report["snapshots"]["2"]["layers"]
    assert set(layers) == {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                           "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"}
    assert layers["transformer.h.0.attn.c_attn.weight"]["shape"] == [48, 16]
    assert report["ntk_init"]["step"] == 0 and report["ntk_init"]["distance"] == pytest.approx(0.0, abs=1e-9)
    assert report["ntk_final"]["distance"] > 0  # the kernel moved during training
    assert report["lambda"]["max"] > 0 and report["lambda"]["steps_with_penalty"] == 6  # 1 epoch of 6 steps
    # the printed report
    for needle in ("test accuracy", "train accuracy", "generalization gap", "layer-wise ranks at epoch 2",
                   "NTK at init", "NTK at end", "lambda (FixedSchedule)", "controller step n/a (fixed schedule)"):
        assert needle in proc.stdout, needle
    card = (out / "README.md").read_text()
    assert "test accuracy" in card and "spectral_volume_coef" in card


def test_train_parity_defaults_to_parity(tmp_path):
    out = tmp_path / "run"
    proc = _run("train_parity.py", *TINY, "--output_dir", str(out), "--num_train_epochs", "1",
                "--rank_snapshot_epochs", "1", "--spectral_volume_coef", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["task"]["task"] == "parity"


@pytest.mark.parametrize("flags, needle", [
    (["--k", "9"], "k"),
    (["--model_type", "t5"], "model_type"),
    (["--spectral_volume_coef", "-1"], "spectral_volume_coef"),
    (["--train_size", "1000"], "train_size"),  # 2^7 = 128 strings only
    (["--spectral_expansion_epochs", "5"], "spectral_expansion_epochs"),
])
def test_bad_input_fails_clearly_before_writing(tmp_path, flags, needle):
    out = tmp_path / "run"
    proc = _run("train_majority.py", *TINY, "--output_dir", str(out), *flags)
    assert proc.returncode != 0
    assert needle in proc.stderr.splitlines()[-1] or needle in proc.stderr[-2000:]
    assert not out.exists()


def test_bidirectional_model_is_refused(tmp_path):
    """BERT loads as a 'causal LM' (BertLMHeadModel) but attends both ways: it would read the answer."""
    proc = _run("train_majority.py", *TINY, "--output_dir", str(tmp_path / "run"), "--model_type", "bert")
    assert proc.returncode != 0
    assert "is not causal" in proc.stderr
