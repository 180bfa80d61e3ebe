"""Interrupting and resuming a run changes nothing; the seed alone fixes a run.

Oracle for the resume: the same run without interruption. The `ntk_feedback` controller is set up so
that lambda is raised twice before the interruption (step 8) and the lazy -> rich transition happens
after it (step 10): the resumed run only matches if the controller state, the initial kernel and the
histories come back from the checkpoint. (tests/test_callbacks.py checks that the tracker's state is
JSON and restorable from a finished run's checkpoint.)
"""

import json
import math
import os
import sys

import pytest
import torch
from transformers import TrainerCallback

from data_builders import answer_token_ids
from hf_specvol import AnswerTokenMetrics, SpectralVolumeConfig, SpectralVolumeTrainer
from hf_specvol.models import ModelArguments
from hf_specvol.pipeline import BooleanTaskArguments, train_boolean_task

TRAIN_COLUMNS = ["input_ids", "attention_mask", "labels"]
TIMING_KEYS = ("runtime", "per_second")


class Interrupted(Exception):
    pass


class InterruptAfterSave(TrainerCallback):
    """Kills the run right after the checkpoint of `step` is written, as a preemption would."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(f"interrupted after the checkpoint of step {self.step}")


def _trainer(output_dir, tiny_majority, make_tiny_gpt2, bit_tokenizer, callbacks=None):
    # 128 examples / batch 16: 8 steps per epoch, 16 in all; checkpoints every 4 steps. Defaults are kept for
    # everything else, restore_callback_states_from_checkpoint included.
    args = SpectralVolumeConfig(
        output_dir=str(output_dir), report_to="none", use_cpu=True, disable_tqdm=True, seed=0, logging_steps=2,
        per_device_train_batch_size=16, num_train_epochs=2, learning_rate=3e-3, save_strategy="steps",
        save_steps=4, dataloader_num_workers=0, spectral_volume_coef=0.05, spectral_schedule="ntk_feedback",
        spectral_expansion_epochs=1.5, spectral_decay_epochs=0.5, ntk_window=1, ntk_distance_threshold=5e-5,
        ntk_probe_size=8, ntk_interval_steps=2, rank_interval_steps=3, rank_snapshot_epochs=[1],
    )
    data = tiny_majority[1]
    metrics = AnswerTokenMetrics(answer_token_ids(bit_tokenizer))
    return SpectralVolumeTrainer(
        model=make_tiny_gpt2(), args=args, train_dataset=data["train"].select_columns(TRAIN_COLUMNS),
        eval_dataset=data["validation"], answer_ids=answer_token_ids(bit_tokenizer), callbacks=callbacks,
        compute_metrics=metrics, preprocess_logits_for_metrics=metrics.preprocess_logits,
    )


def _close(a, b, tol=1e-6, path="$"):
    """Recursive comparison of JSON-like records: equal keys/lengths, numbers within `tol` (rel. and abs.)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _close(a[key], b[key], tol, f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, tol, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=tol, abs_tol=tol), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _without_timings(log_history):
    # also without the summary's `train_loss`: the Trainer averages it over the steps of the current session only
    return [{k: v for k, v in h.items() if not any(t in k for t in TIMING_KEYS) and k != "train_loss"}
            for h in log_history]


def test_default_config_restores_callback_state(tmp_path):
    assert SpectralVolumeConfig(output_dir=str(tmp_path)).restore_callback_states_from_checkpoint is True


def test_interrupted_then_resumed_run_equals_uninterrupted(tmp_path, tiny_majority, make_tiny_gpt2, bit_tokenizer):
    full_dir = tmp_path / "full"
    full = _trainer(full_dir, tiny_majority, make_tiny_gpt2, bit_tokenizer)
    full.train()
    full_log_history = list(full.state.log_history)
    full_metrics = full.evaluate()
    controller = full.tracker.controller
    assert controller.transition_step == 10  # after the interruption at step 8 ...
    assert [h["lambda"] for h in controller.history][:5] == pytest.approx([0.075, 0.1125, 0.16875, 0.253125, 0.3796875])

    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        _trainer(out, tiny_majority, make_tiny_gpt2, bit_tokenizer, [InterruptAfterSave(8)]).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    resumed = _trainer(out, tiny_majority, make_tiny_gpt2, bit_tokenizer)
    resumed.train(resume_from_checkpoint=True)  # the latest checkpoint: step 8

    a, b = full.tracker, resumed.tracker
    _close(a.controller.state_dict(), b.controller.state_dict())  # lambda, streak, transition step, history
    _close(a.lambda_history, b.lambda_history)
    _close(a.ntk_history, b.ntk_history)
    _close(a.rank_history, b.rank_history)
    _close(a.snapshots, b.snapshots)
    _close(a.kernel_at_init, b.kernel_at_init)
    _close(_without_timings(full_log_history), _without_timings(resumed.state.log_history))
    _close({k: v for k, v in full_metrics.items() if not any(t in k for t in TIMING_KEYS)},
           {k: v for k, v in resumed.evaluate().items() if not any(t in k for t in TIMING_KEYS)})
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-6), name
    for name in ("rank_report.json", "tracking_history.json"):
        _close(json.loads((full_dir / name).read_text()), json.loads((out / name).read_text()))


def _pipeline_run(tmp_path, seed, name):
    task = BooleanTaskArguments(n_bits=7, k=3, train_size=64, validation_size=16, test_size=16)
    model = ModelArguments(hidden_size=16, num_layers=1, num_heads=2)
    args = SpectralVolumeConfig(
        output_dir=str(tmp_path / name), report_to="none", use_cpu=True, disable_tqdm=True, seed=seed,
        per_device_train_batch_size=16, num_train_epochs=2, logging_steps=1, eval_strategy="no",
        save_strategy="no", spectral_expansion_epochs=1, ntk_probe_size=8, ntk_interval_steps=4,
        rank_interval_steps=4, rank_snapshot_epochs=[2],
    )
    results = train_boolean_task(task, model, args)
    history = json.loads((tmp_path / name / "tracking_history.json").read_text())
    return results, history


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    first, first_history = _pipeline_run(tmp_path, 0, "a")
    torch.randn(1000)  # whatever ran before must not matter
    again, again_history = _pipeline_run(tmp_path, 0, "b")
    other, other_history = _pipeline_run(tmp_path, 1, "c")
    drop = ("train_runtime_s",)
    same = {k: v for k, v in first.items() if k not in drop}
    assert same == {k: v for k, v in again.items() if k not in drop}  # bit-identical
    assert first_history == again_history
    # another seed: other initial weights (the step-0 ranks) and another trajectory
    assert other_history["rank_history"][0]["layers"] != first_history["rank_history"][0]["layers"]
    assert other_history["lambda_history"] == first_history["lambda_history"]  # the schedule is seed-free
    assert other["rank_report"]["ntk_final"] != first["rank_report"]["ntk_final"]


def test_recipe_passes_resume_from_checkpoint(tmp_path, monkeypatch):
    """`--resume_from_checkpoint DIR` on the recipe's command line reaches `Trainer.train`."""
    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
    monkeypatch.syspath_prepend(recipes)
    sys.modules.pop("train_majority", None)
    import train_majority

    seen = {}
    monkeypatch.setattr(train_majority, "train_boolean_task", lambda *a, **k: seen.update(k) or {})
    monkeypatch.setattr(train_majority, "format_report", lambda results: "")
    train_majority.run("majority", ["--output_dir", str(tmp_path), "--resume_from_checkpoint", "ckpt/checkpoint-8",
                                    "--use_cpu", "true"])
    assert seen == {"resume_from_checkpoint": "ckpt/checkpoint-8"}
