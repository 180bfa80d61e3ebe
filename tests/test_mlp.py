"""The Boolean MLP against numpy oracles, the HF save/load interface, and the Trainer / NTK integration."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

import data_builders
from hf_specvol.modeling_mlp import BooleanMLPConfig, BooleanMLPForClassification


def _numpy_forward(model, bits):
    """Independent forward pass: +-1 inputs, ReLU hidden layers, readout times the multiplier."""
    h = 2.0 * bits.astype(np.float64) - 1.0
    for layer in model.layers:
        h = np.maximum(h @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy(), 0.0)
    out = h @ model.readout.weight.detach().double().numpy().T + model.readout.bias.detach().double().numpy()
    return out * model.config.output_multiplier


@pytest.mark.parametrize("depth", [1, 3])
def test_logits_and_cross_entropy_match_numpy(depth):
    torch.manual_seed(0)
    model = BooleanMLPForClassification(BooleanMLPConfig(n_bits=6, width=12, depth=depth)).double()
    model.config.output_multiplier = 0.5
    bits = np.random.default_rng(0).integers(0, 2, (9, 6)).astype(np.int8)
    labels = np.random.default_rng(1).integers(0, 2, 9)
    out = model(bits=torch.tensor(bits), labels=torch.tensor(labels))
    expected = _numpy_forward(model, bits)
    np.testing.assert_allclose(out.logits.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    log_softmax = expected - np.log(np.exp(expected).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.loss.item(), -log_softmax[np.arange(9), labels].mean(), rtol=1e-12)


def test_margin_readout_and_hinge_loss_match_numpy():
    torch.manual_seed(0)
    model = BooleanMLPForClassification(BooleanMLPConfig(n_bits=5, width=8, loss="hinge", readout="margin")).double()
    bits = np.random.default_rng(2).integers(0, 2, (16, 5))
    labels = np.random.default_rng(3).integers(0, 2, 16)
    out = model(bits=torch.tensor(bits), labels=torch.tensor(labels))
    f = _numpy_forward(model, bits)[:, 0]
    logits = out.logits.detach().numpy()
    assert logits.shape == (16, 2)
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], f, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.loss.item(), np.maximum(0, 1 - (2 * labels - 1) * f).mean(), rtol=1e-12)
    assert model(bits=torch.tensor(bits)).loss is None


def test_init_variance_is_one_over_fan_in_and_zero_readout():
    torch.manual_seed(0)
    model = BooleanMLPForClassification(BooleanMLPConfig(n_bits=400, width=300, depth=2, zero_init_readout=True))
    assert model.layers[0].weight.std().item() == pytest.approx(1 / np.sqrt(400), rel=0.02)
    assert model.layers[1].weight.std().item() == pytest.approx(1 / np.sqrt(300), rel=0.02)
    assert torch.count_nonzero(model.readout.weight) == 0 and torch.count_nonzero(model.layers[0].bias) == 0


def test_dropout_only_in_training():
    model = BooleanMLPForClassification(BooleanMLPConfig(n_bits=8, width=64, dropout=0.5))
    bits = torch.randint(0, 2, (4, 8))
    model.train()
    assert not torch.equal(model(bits=bits).logits, model(bits=bits).logits)
    model.eval()
    assert torch.equal(model(bits=bits).logits, model(bits=bits).logits)


@pytest.mark.parametrize("bad, needle", [(dict(loss="mse"), "loss"), (dict(activation="nope"), "activation"),
                                         (dict(dropout=1.0), "dropout"), (dict(readout="x"), "readout"),
                                         (dict(width=0), "width")])
def test_config_errors_name_the_field(bad, needle):
    with pytest.raises(ValueError, match=needle):
        BooleanMLPConfig(**bad)


def test_wrong_input_width_is_a_clear_error():
    model = BooleanMLPForClassification(BooleanMLPConfig(n_bits=8, width=4))
    with pytest.raises(ValueError, match="n_bits=8"):
        model(bits=torch.zeros(2, 7, dtype=torch.long))


def test_save_and_load_with_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = BooleanMLPForClassification(BooleanMLPConfig(n_bits=6, width=10, depth=2, activation="tanh",
                                                         loss="hinge", readout="margin"))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "boolean_mlp"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), BooleanMLPConfig)
    bits = torch.randint(0, 2, (5, 6))
    for loader in (AutoModel, AutoModelForSequenceClassification, BooleanMLPForClassification):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is BooleanMLPForClassification and loaded.config.activation == "tanh"
        torch.testing.assert_close(loaded(bits=bits).logits, model(bits=bits).logits, rtol=0, atol=1e-6)


def test_trainer_pipeline_and_ntk_on_the_mlp(tmp_path):
    """The MLP arm end to end; the tracker's initial NTK equals J J^T from a per-example autograd loop."""
    from hf_specvol.models import ModelArguments
    from hf_specvol.pipeline import BooleanTaskArguments, _model_and_data, train_boolean_task
    from hf_specvol.study import split_settings

    settings = dict(task="parity", n_bits=8, k=2, train_size=128, validation_size=32, test_size=32,
                    model_type="boolean_mlp", hidden_size=16, num_layers=2, optim="sgd", learning_rate=0.1,
                    output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=16,
                    spectral_volume_coef=0.1, spectral_expansion_epochs=0.5, spectral_decay_epochs=0,
                    ntk_probe_size=8, ntk_interval_steps=4, rank_interval_steps=4, rank_snapshot_epochs=[1],
                    report_to="none", save_strategy="no", disable_tqdm=True, seed=3)
    task_args, model_args, training_args = split_settings(settings)
    results = train_boolean_task(task_args, model_args, training_args)
    assert results["model"]["type"] == "boolean_mlp" and results["global_step"] == 8
    assert 0 <= results["test_accuracy"] <= 1 and results["rank_report"]["lambda"]["max"] == pytest.approx(0.1)
    layers = results["rank_report"]["snapshots"]["1"]["layers"]
    assert set(layers) == {"layers.0.weight", "layers.1.weight", "readout.weight"}
    assert (tmp_path / "run" / "model.safetensors").is_file()

    # oracle: rebuild the same initial model and probe, and form J J^T from per-example gradients
    _, data, model, _, _ = _model_and_data(BooleanTaskArguments(**{k: settings[k] for k in (
        "task", "n_bits", "k", "train_size", "validation_size", "test_size")}), ModelArguments(
        model_type="boolean_mlp", hidden_size=16, num_layers=2), seed=3)
    history = json.loads((tmp_path / "run" / "tracking_history.json").read_text())
    rows = np.sort(np.random.default_rng(3).choice(32, size=8, replace=False))
    probe = data["validation"].select(rows)
    grads = []
    for bits in probe["bits"]:
        logits = model(bits=torch.tensor([bits])).logits[0]
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(logits[1] - logits[0],
                                                                           list(model.parameters()))]))
    J = torch.stack(grads).double()
    np.testing.assert_allclose(np.array(history["ntk_history"][0]["erank"]),
                               _erank(J @ J.T), rtol=1e-6)
    labels = np.array(probe["label"]) * 2.0 - 1.0
    labels -= labels.mean()
    K = (J @ J.T).numpy()
    kta = labels @ K @ labels / (np.linalg.norm(K) * labels @ labels)
    assert history["ntk_history"][0]["alignment"] == pytest.approx(kta, rel=1e-6, abs=1e-9)


def _erank(K):
    s = np.clip(np.linalg.eigvalsh(K.numpy()), 0, None)
    p = s / s.sum()
    p = p[p > 0]
    return np.exp(-(p * np.log(p)).sum())


def test_builders_bits_column_is_what_the_model_reads():
    raw = data_builders.parity(6, 2, seed=0, train_size=16, validation_size=8, test_size=8)
    model = BooleanMLPForClassification(BooleanMLPConfig(n_bits=6, width=4))
    out = model(bits=torch.tensor(raw["train"]["bits"]), labels=torch.tensor(raw["train"]["label"]))
    assert out.logits.shape == (16, 2) and out.loss.ndim == 0


@pytest.mark.slow
def test_literature_anchor_plain_sgd_learns_sparse_parity(tmp_path):
    """Barak et al. 2022: width-1000 MLP, SGD lr 0.1, batch 32, parity n=20 k=3 reaches 99% in ~10^3 steps."""
    from hf_specvol.pipeline import train_boolean_task
    from hf_specvol.study import split_settings

    settings = dict(task="parity", n_bits=20, k=3, train_size=5000, validation_size=500, test_size=1000,
                    model_type="boolean_mlp", hidden_size=1000, num_layers=1, mlp_loss="hinge",
                    mlp_readout="margin", optim="sgd", learning_rate=0.1, max_grad_norm=0,
                    per_device_train_batch_size=32, lr_scheduler_type="constant", max_steps=5000,
                    eval_strategy="steps", eval_steps=100,
                    spectral_volume_coef=0.0, ntk_interval_steps=500, rank_interval_steps=500,
                    output_dir=str(tmp_path), report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    results = train_boolean_task(*split_settings(settings), save_model=False)
    solved_at = next(h["step"] for h in results["eval_history"] if h["accuracy"] >= 0.99)
    assert 300 <= solved_at <= 10_000 and results["test_accuracy"] >= 0.99
