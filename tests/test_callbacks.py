"""RankTrackingCallback: what it measures, what it writes, and that it survives a resume."""

import json

import pytest
import torch

from hf_specvol import RankTrackingCallback, SpectralVolumeConfig, SpectralVolumeTrainer
from hf_specvol.ntk import empirical_ntk, kernel_target_alignment


def _trainer(tmp_path, tiny_majority, model, answer_ids, out="out", **overrides):
    data = tiny_majority[1]
    values = dict(output_dir=str(tmp_path / out), report_to="none", use_cpu=True, logging_steps=2,
                  disable_tqdm=True, seed=0, per_device_train_batch_size=16, num_train_epochs=2,
                  learning_rate=3e-3, spectral_volume_coef=0.05, spectral_schedule="ntk_feedback",
                  spectral_expansion_epochs=1.5, spectral_decay_epochs=0.5, ntk_probe_size=8, ntk_window=1,
                  ntk_distance_threshold=0.5, ntk_interval_steps=2, rank_interval_steps=3,
                  rank_snapshot_epochs=[1], save_strategy="steps", save_steps=8, dataloader_num_workers=0)
    values.update(overrides)
    return SpectralVolumeTrainer(model=model, args=SpectralVolumeConfig(**values),
                                 train_dataset=data["train"].select_columns(["input_ids", "attention_mask", "labels"]),
                                 eval_dataset=data["validation"], answer_ids=answer_ids)


@pytest.fixture
def answer_ids(bit_tokenizer):
    from data_builders import answer_token_ids

    return answer_token_ids(bit_tokenizer)


def test_measurements_outputs_and_logs(tmp_path, tiny_majority, make_tiny_gpt2, answer_ids):
    trainer = _trainer(tmp_path, tiny_majority, make_tiny_gpt2(), answer_ids, save_strategy="no")
    trainer.train()
    tracker = trainer.tracker
    assert [r["step"] for r in tracker.ntk_history] == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert tracker.ntk_history[0]["distance"] == pytest.approx(0.0, abs=1e-9)
    # the last kernel, recomputed independently on the same probe, gives the logged alignment
    probe = tracker.probe
    kernel = empirical_ntk(trainer.model, probe.inputs, answer_position=probe.answer_position, answer_ids=answer_ids)
    assert kernel_target_alignment(kernel, probe.labels) == pytest.approx(tracker.ntk_history[-1]["alignment"],
                                                                          rel=1e-6)
    report = json.loads((tmp_path / "out" / "rank_report.json").read_text())
    assert set(report["snapshots"]) == {"1"} and report["snapshots"]["1"]["step"] == 8
    assert len(report["snapshots"]["1"]["layers"]) == 8  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    history = json.loads((tmp_path / "out" / "tracking_history.json").read_text())
    assert [s for s, _ in history["lambda_history"]] == list(range(1, 17))
    logged = {k for h in trainer.state.log_history for k in h}
    assert {"ntk/erank", "ntk/alignment", "ntk/distance", "rank/mean_erank", "spectral/lambda",
            "spectral/penalty", "rank/transformer.h.0.attn.c_attn.weight"} <= logged


def test_state_is_json_and_survives_resume(tmp_path, tiny_majority, make_tiny_gpt2, answer_ids):
    full = _trainer(tmp_path, tiny_majority, make_tiny_gpt2(), answer_ids, out="full")
    full.train()
    state = json.loads(json.dumps(full.tracker.state()))  # ExportableState must be JSON serialisable
    assert state["attributes"]["controller_state"]["type"] == "NTKFeedbackController"

    resumed = _trainer(tmp_path, tiny_majority, make_tiny_gpt2(), answer_ids, out="resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-8"))
    a, b = full.tracker, resumed.tracker
    assert isinstance(b, RankTrackingCallback)
    assert [r["step"] for r in b.ntk_history] == [r["step"] for r in a.ntk_history]
    for ra, rb in zip(a.ntk_history, b.ntk_history):
        for key in ("erank", "alignment", "distance"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9)
    assert [s for s, _ in b.lambda_history] == [s for s, _ in a.lambda_history]  # steps before 8 came back too
    assert [v for _, v in b.lambda_history] == pytest.approx([v for _, v in a.lambda_history], rel=1e-6)
    assert b.controller.state_dict()["current"] == pytest.approx(a.controller.state_dict()["current"])
    assert b.controller.transition_step == a.controller.transition_step
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
