"""SpectralVolumeTrainer against independent oracles: the plain Trainer and brute-force autograd."""

import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

import hf_specvol.trainer as trainer_module
from hf_specvol import SpectralVolumeConfig, SpectralVolumeTrainer
from hf_specvol.spectral import weight_matrices

TRAIN_COLUMNS = ["input_ids", "attention_mask", "labels"]


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                  logging_steps=1, disable_tqdm=True, seed=0, per_device_train_batch_size=8,
                  per_device_eval_batch_size=32, num_train_epochs=1, max_steps=6, learning_rate=1e-2,
                  spectral_expansion_epochs=0.5, ntk_probe_size=8, ntk_interval_steps=2, rank_interval_steps=2,
                  rank_snapshot_epochs=[1], dataloader_num_workers=0)
    values.update(overrides)
    return SpectralVolumeConfig(**values)


def _train_set(tiny_majority):
    return tiny_majority[1]["train"].select_columns(TRAIN_COLUMNS)


def test_coef_zero_matches_plain_trainer(tmp_path, tiny_majority, make_tiny_gpt2, bit_tokenizer):
    from data_builders import answer_token_ids

    data = tiny_majority[1]
    args = _config(tmp_path, spectral_volume_coef=0.0)
    ours = SpectralVolumeTrainer(model=make_tiny_gpt2(), args=args, train_dataset=_train_set(tiny_majority),
                                 eval_dataset=data["validation"], answer_ids=answer_token_ids(bit_tokenizer))
    ours.train()
    plain_args = TrainingArguments(**{k: getattr(args, k) for k in (
        "output_dir", "report_to", "use_cpu", "save_strategy", "logging_steps", "disable_tqdm", "seed",
        "per_device_train_batch_size", "num_train_epochs", "max_steps", "learning_rate", "dataloader_num_workers")})
    plain = Trainer(model=make_tiny_gpt2(), args=plain_args, train_dataset=_train_set(tiny_majority))
    plain.train()
    our_losses = [h["loss"] for h in ours.state.log_history if "loss" in h]
    plain_losses = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert len(our_losses) == 6 and our_losses == plain_losses  # bit-identical, tracker included
    for p, q in zip(ours.model.parameters(), plain.model.parameters()):
        assert torch.equal(p, q)
    # the tracker did measure, it just did not perturb training
    assert any("ntk/alignment" in h for h in ours.state.log_history)


@pytest.mark.parametrize("loss_scaled", [True, False], ids=["scaled-path", "unscaled-path"])
def test_penalty_update_matches_autograd_under_accumulation(tmp_path, tiny_majority, make_tiny_gpt2, loss_scaled):
    """One SGD step with batch 8 equals w - lr * grad(task + lam * P) whatever the accumulation split."""
    lam, lr = 0.5, 0.1
    train = _train_set(tiny_majority).select(range(8))
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    reference = make_tiny_gpt2(**no_dropout)
    batch = {k: torch.tensor(train[k]) for k in TRAIN_COLUMNS}
    loss = reference(**batch).loss + lam * trainer_module.spectral_penalty(weight_matrices(reference))
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    expected = [p.detach() - lr * g for p, g in zip(reference.parameters(), grads)]

    for micro_batch, accumulation in ((8, 1), (4, 2), (2, 4)):
        args = _config(tmp_path, spectral_volume_coef=lam, per_device_train_batch_size=micro_batch,
                       gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=lr,
                       lr_scheduler_type="constant", max_grad_norm=0.0, spectral_expansion_epochs=1.0,
                       track_ranks=False)
        trainer = SpectralVolumeTrainer(model=make_tiny_gpt2(**no_dropout), args=args, train_dataset=train)
        if not loss_scaled:
            trainer.model_accepts_loss_kwargs = False  # Trainer then divides each micro-batch loss by GA
        trainer.get_train_dataloader = _sequential_loader(trainer, train, micro_batch)
        trainer.train()
        worst = max((p.detach() - e).abs().max().item() for p, e in zip(trainer.model.parameters(), expected))
        assert worst < 2e-6, f"GA={accumulation}: max deviation {worst}"


def _sequential_loader(trainer, dataset, batch_size):
    """The same 8 examples in the same order for every accumulation split."""
    from torch.utils.data import DataLoader

    def loader():
        return trainer.accelerator.prepare(DataLoader(dataset.with_format("torch"), batch_size=batch_size,
                                                      shuffle=False, collate_fn=trainer.data_collator))
    return loader


def test_penalty_absent_in_eval_and_logged_in_train(tmp_path, tiny_majority, make_tiny_gpt2, bit_tokenizer):
    from data_builders import answer_token_ids

    data = tiny_majority[1]
    args = _config(tmp_path, spectral_volume_coef=1.0, max_steps=4, spectral_expansion_epochs=0.25)
    model = make_tiny_gpt2()
    trainer = SpectralVolumeTrainer(model=model, args=args, train_dataset=_train_set(tiny_majority),
                                    eval_dataset=data["validation"].select_columns(TRAIN_COLUMNS + ["label"]),
                                    answer_ids=answer_token_ids(bit_tokenizer))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["spectral/lambda"] == 1.0 for h in logged[:2])  # window: 0.25 epoch = 4 of 16 steps
    assert all(h["spectral/penalty"] > 0 for h in logged[:2])
    eval_loss = trainer.evaluate()["eval_loss"]
    model.eval()
    with torch.no_grad():
        batch = {k: torch.tensor(data["validation"][k]) for k in TRAIN_COLUMNS}
        direct = model(**batch).loss.item()
    assert eval_loss == pytest.approx(direct, rel=1e-5)


def test_non_finite_penalty_is_skipped_and_counted(tmp_path, tiny_majority, make_tiny_gpt2, monkeypatch):
    monkeypatch.setattr(trainer_module, "spectral_penalty", lambda *a, **k: torch.tensor(float("nan")))
    args = _config(tmp_path, spectral_volume_coef=1.0, max_steps=2, spectral_expansion_epochs=0.125,
                   track_ranks=False)
    trainer = SpectralVolumeTrainer(model=make_tiny_gpt2(), args=args, train_dataset=_train_set(tiny_majority))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["loss"]) for h in logged)
    assert sum(h["spectral/skipped"] for h in logged) == 2


def test_expansion_window_longer_than_training_fails_before_writing(tmp_path, tiny_majority, make_tiny_gpt2):
    args = _config(tmp_path, spectral_volume_coef=0.1, max_steps=3, spectral_expansion_epochs=1.0,
                   track_ranks=False)
    trainer = SpectralVolumeTrainer(model=make_tiny_gpt2(), args=args, train_dataset=_train_set(tiny_majority))
    with pytest.raises(ValueError, match="spectral_expansion_epochs"):
        trainer.train()
    out = tmp_path / "out"  # Trainer.__init__ itself makes the (empty) output dir
    assert not out.exists() or not any(out.iterdir())


def test_needs_a_spectral_config(tmp_path, make_tiny_gpt2):
    with pytest.raises(TypeError, match="SpectralVolumeConfig"):
        SpectralVolumeTrainer(model=make_tiny_gpt2(), args=TrainingArguments(output_dir=str(tmp_path)))
