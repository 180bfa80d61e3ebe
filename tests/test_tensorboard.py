"""`report_to tensorboard` shows the spectral, rank and NTK scalars: the event file is read back.

transformers 5 has no `logging_dir`; the TensorBoard callback writes where `TENSORBOARD_LOGGING_DIR`
points (default: a run folder under `output_dir`).
"""

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from data_builders import answer_token_ids  # noqa: E402
from hf_specvol import SpectralVolumeConfig, SpectralVolumeTrainer  # noqa: E402


def test_spectral_rank_and_ntk_scalars_reach_tensorboard(tmp_path, monkeypatch, tiny_majority, make_tiny_gpt2,
                                                         bit_tokenizer):
    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    args = SpectralVolumeConfig(
        output_dir=str(tmp_path / "out"), report_to=["tensorboard"], use_cpu=True, save_strategy="no",
        disable_tqdm=True, seed=0, logging_steps=2, per_device_train_batch_size=16, max_steps=8,
        spectral_volume_coef=0.1, spectral_expansion_epochs=0.5, spectral_decay_epochs=0.25, ntk_probe_size=4,
        ntk_interval_steps=4, rank_interval_steps=4, rank_snapshot_epochs=[1], dataloader_num_workers=0,
    )
    data = tiny_majority[1]
    train = data["train"].select_columns(["input_ids", "attention_mask", "labels"])
    trainer = SpectralVolumeTrainer(model=make_tiny_gpt2(), args=args, answer_ids=answer_token_ids(bit_tokenizer),
                                    train_dataset=train, eval_dataset=data["validation"])
    trainer.train()
    events = list(logdir.rglob("events.out.tfevents.*"))
    assert events, f"no event file under {logdir}"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/spectral/penalty", "train/spectral/lambda", "train/spectral/skipped",
                "train/spectral/mean_log_volume", "train/rank/mean_erank", "train/ntk/erank", "train/ntk/alignment",
                "train/ntk/distance", "train/rank/transformer.h.0.attn.c_attn.weight"}
    assert expected <= tags, sorted(expected - tags)

    # the values are those of the log history, step for step (TensorBoard stores float32)
    for key in ("spectral/lambda", "spectral/penalty", "ntk/erank", "ntk/alignment", "ntk/distance",
                "rank/mean_erank"):
        logged = {h["step"]: h[key] for h in trainer.state.log_history if key in h}
        written = {e.step: e.value for e in acc.Scalars(f"train/{key}")}
        assert logged and written.keys() == logged.keys(), key
        for step, value in logged.items():
            assert written[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, step)
    lam = {e.step: e.value for e in acc.Scalars("train/spectral/lambda")}
    assert lam[2] == pytest.approx(0.1) and lam[8] == 0.0  # on in the window, decayed to 0 after it
    ntk_steps = sorted(e.step for e in acc.Scalars("train/ntk/erank"))
    assert ntk_steps == [2, 4, 8]  # the kernel at init goes out with the first training log (step 2)
