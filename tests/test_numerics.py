"""Mixed precision and non-finite values through the Trainer.

The matrix-level cases (zero, constant rows, rank one, 1 x N, bf16 input under autocast) are checked
against closed forms in tests/test_spectral.py; here the same degenerate matrices are trained on with
bf16 autocast, and the penalty the trainer adds is compared with a float64 oracle computed on the fly.
"""

import logging
import math

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback

import hf_specvol.trainer as trainer_module
from hf_specvol import SpectralVolumeConfig, SpectralVolumeTrainer
from hf_specvol.spectral import weight_matrices

EPS = 1e-4


def oracle_penalty(matrices) -> float:
    """-(1/L) sum logdet(corr(A) + eps I) / r in float64 numpy-free torch (dead coordinates: variance 0)."""
    values = []
    for W in matrices.values():
        A = W.detach().double()
        A = A if A.shape[0] >= A.shape[1] else A.T
        centered = A - A.mean(0)
        var = (centered**2).sum(0) / max(A.shape[0] - 1, 1)
        scale = (A.abs().max() ** 2).clamp_min(1e-300)
        alive = var > 1e-10 * scale
        inv = torch.where(alive, var.clamp_min(1e-300).rsqrt(), torch.zeros_like(var))
        R = (centered * inv).T @ (centered * inv) / max(A.shape[0] - 1, 1)
        values.append(torch.logdet(R + EPS * torch.eye(A.shape[1], dtype=torch.float64)).item() / A.shape[1])
    return -sum(values) / len(values)


class DegenerateNet(nn.Module):
    """A classifier whose matrices start zero, rank one, with constant rows, and 1 x N."""

    def __init__(self, width=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():  # the same initial weights for every instance
            torch.manual_seed(0)
            self.zero = nn.Linear(width, width)
            self.rank_one = nn.Linear(width, width)
            self.constant_rows = nn.Linear(width, width)
            self.readout = nn.Linear(width, 1)  # a 1 x N matrix
        self.autocast_seen = []
        with torch.no_grad():
            self.zero.weight.zero_()
            self.rank_one.weight.copy_(torch.randn(width, 1, generator=g) @ torch.randn(1, width, generator=g))
            self.constant_rows.weight.copy_(torch.randn(width, 1, generator=g).expand(width, width))

    def forward(self, x, labels=None):
        self.autocast_seen.append(torch.is_autocast_enabled(x.device.type))
        h = torch.tanh(self.zero(x) + self.rank_one(x) + self.constant_rows(x))
        logits = self.readout(h).squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return {"loss": loss, "logits": logits}


def _dataset(n=64, width=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, width, generator=g)
    return Dataset.from_dict({"x": x.tolist(), "labels": (x[:, 0] > 0).long().tolist()})


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                  logging_steps=1, disable_tqdm=True, seed=0, per_device_train_batch_size=16, max_steps=4,
                  learning_rate=1e-2, spectral_volume_coef=1.0, spectral_expansion_epochs=0, spectral_decay_epochs=0,
                  track_ranks=False, dataloader_num_workers=0)
    values.update(overrides)
    if values["spectral_expansion_epochs"] == 0:
        values["spectral_expansion_epochs"] = 1.0  # 4 steps per epoch: lambda = coef on every step
    return SpectralVolumeConfig(**values)


class GradientProbe(TrainerCallback):
    """Records, before every optimizer step, whether all gradients are finite."""

    def __init__(self):
        self.finite = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.finite.append(all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None))


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16], ids=["fp32-weights", "bf16-weights"])
def test_bf16_autocast_penalty_in_float32_with_finite_gradients(tmp_path, monkeypatch, weights_dtype):
    calls = []
    real_penalty = trainer_module.spectral_penalty

    def spy(matrices, eps):
        value = real_penalty(matrices, eps=eps)
        calls.append({"dtype": value.dtype, "value": value.item(), "oracle": oracle_penalty(matrices)})
        return value

    monkeypatch.setattr(trainer_module, "spectral_penalty", spy)
    model = DegenerateNet().to(weights_dtype)
    assert {tuple(w.shape) for w in weight_matrices(model).values()} == {(8, 8), (1, 8)}
    probe = GradientProbe()
    trainer = SpectralVolumeTrainer(model=model, args=_args(tmp_path, bf16=True), train_dataset=_dataset(),
                                    callbacks=[probe])
    trainer.train()
    assert model.autocast_seen == [True] * 4  # the forward passes really ran under bf16 autocast
    assert len(calls) == 4
    for c in calls:
        assert c["dtype"] == torch.float32
        assert math.isfinite(c["value"])
        # float32 Cholesky of the correlation matrix: close to float64; a bf16 matmul would be off by ~1e-2
        assert c["value"] == pytest.approx(c["oracle"], rel=2e-4, abs=2e-4)
    assert calls[0]["value"] > -math.log(EPS) / 2  # the degenerate start is far from full volume
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["loss"]) and h["spectral/skipped"] == 0 for h in logged)
    assert probe.finite == [True] * 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs a GPU")
def test_fp16_autocast_penalty_in_float32_on_gpu(tmp_path, monkeypatch):
    dtypes = []
    real_penalty = trainer_module.spectral_penalty
    monkeypatch.setattr(trainer_module, "spectral_penalty",
                        lambda m, eps: dtypes.append(real_penalty(m, eps=eps)) or dtypes[-1])
    probe = GradientProbe()
    model = DegenerateNet()
    trainer = SpectralVolumeTrainer(model=model, args=_args(tmp_path, fp16=True, use_cpu=False),
                                    train_dataset=_dataset(), callbacks=[probe])
    trainer.train()
    assert len(dtypes) == 4 and all(v.dtype == torch.float32 and torch.isfinite(v) for v in dtypes)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["spectral/skipped"] == 0 for h in logged)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_penalty_is_never_trained_on(tmp_path, monkeypatch, caplog, bad):
    """A non-finite penalty (here: carrying a gradient that would poison every weight) is skipped, warned
    about and counted; training then equals plain training (coef 0) step for step."""

    def poisoned(matrices, eps):
        return bad * sum(w.sum() for w in matrices.values())

    plain = SpectralVolumeTrainer(model=DegenerateNet(), args=_args(tmp_path, spectral_volume_coef=0.0),
                                  train_dataset=_dataset())
    plain.train()
    monkeypatch.setattr(trainer_module, "spectral_penalty", poisoned)
    model = DegenerateNet()
    with caplog.at_level(logging.WARNING, logger="hf_specvol.trainer"):
        trainer = SpectralVolumeTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset())
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.name == "hf_specvol.trainer"]
    assert len(warnings) == 4 and all("skipped" in w for w in warnings)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["spectral/skipped"] for h in logged] == [1.0] * 4
    assert "spectral/penalty" not in logged[0]  # no fake value is averaged into the logs
    assert [h["loss"] for h in logged] == [h["loss"] for h in plain.state.log_history if "loss" in h]
    for p, q in zip(model.parameters(), plain.model.parameters()):
        assert torch.equal(p, q)
