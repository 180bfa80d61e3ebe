"""The study runner and report: output shape and internal consistency (not the science), resume, crashes."""

import csv
import json
import os
import runpy
from pathlib import Path

import numpy as np
import pytest
import yaml

from hf_specvol.report import bootstrap_difference, summarize, write_report
from hf_specvol.report import main as report_main
from hf_specvol.study import METHODS, StudyConfig, load_records, method_settings, run_study, split_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"ntk_probe_size": 8, "rank_snapshot_epochs": [2], "spectral_expansion_epochs": 1,
        "spectral_decay_epochs": 0.5, "num_train_epochs": 2, "per_device_train_batch_size": 16, "eval_steps": 2,
        "ntk_interval_steps": 2, "rank_interval_steps": 2}
GPT2_CELL = {"name": "maj_gpt2", "why": "tiny GPT-2 cell",
             "settings": {"task": "majority", "n_bits": 7, "k": 3, "train_size": 64, "validation_size": 16,
                          "test_size": 16, "hidden_size": 16, "num_layers": 1, "num_heads": 2},
             "method_settings": {"mup": {"mup_base_width": 8}}}
MLP_CELL = {"name": "par_mlp", "why": "tiny MLP cell",
            "settings": {"task": "parity", "n_bits": 6, "k": 2, "train_size": 32, "validation_size": 16,
                         "test_size": 16, "model_type": "boolean_mlp", "hidden_size": 32, "num_layers": 1,
                         "optim": "sgd", "learning_rate": 0.1}}
METHODS_UNDER_TEST = ["plain", "weight_decay", "mup+specvol_ntk"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    config = StudyConfig(output_dir=str(out), cells=[GPT2_CELL, MLP_CELL], methods=METHODS_UNDER_TEST,
                         seeds=[0, 1], defaults=TINY, workers=1, name="tiny")
    records = run_study(config, progress=False)
    return config, records, write_report(records, str(out), config)


def test_one_record_per_run_with_metrics_and_config(study):
    config, records, _ = study
    assert len(records) == 2 * 3 * 2
    rows = [json.loads(line) for line in Path(config.output_dir, "runs.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in records]
    for r in records:
        assert r["status"] == "ok", r.get("traceback")
        assert r["run_id"] == f"{r['cell']}/{r['method']}/seed{r['seed']}"
        assert r["settings"]["seed"] == r["seed"] and 0 <= r["test_accuracy"] <= 1
        assert r["generalization_gap"] == pytest.approx(r["train_accuracy"] - r["test_accuracy"])
        assert r["solved"] == (r["test_accuracy"] >= 0.99)
        first = next((h["step"] for h in r["eval_history"] if h["accuracy"] >= 0.99), None)
        assert r["steps_to_solve"] == first
        assert r["snapshot_epoch"] == 2 and r["mean_erank"] == pytest.approx(np.mean(list(r["layer_erank"].values())))
        assert r["ntk_history"][0]["step"] == 0 and r["ntk_init"]["step"] == 0
        specvol = "specvol" in r["method"]
        assert (r["lambda"]["max"] > 0) == specvol and (r["settings"]["spectral_volume_coef"] > 0) == specvol
        assert (r["settings"]["weight_decay"] > 0) == (r["method"] == "weight_decay")
        assert (r["settings"].get("mup_base_width") is not None) == ("mup" in r["method"])
    # the composition carries both parts; the cell's mup override reaches the composed method
    composed = next(r for r in records if r["method"] == "mup+specvol_ntk" and r["cell"] == "maj_gpt2")
    assert composed["settings"]["mup_base_width"] == 8 and composed["settings"]["spectral_schedule"] == "ntk_feedback"


def test_summary_and_report_agree_with_the_records(study):
    config, records, summary = study
    with open(os.path.join(config.output_dir, "summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3
    for row in rows:
        mine = [r for r in records if r["cell"] == row["cell"] and r["method"] == row["method"]]
        acc = [r["test_accuracy"] for r in mine]
        assert int(row["runs"]) == 2 and float(row["test_acc_mean"]) == pytest.approx(np.mean(acc))
        assert float(row["test_acc_std"]) == pytest.approx(np.std(acc, ddof=1))
        assert float(row["solved_frac"]) == pytest.approx(np.mean([r["solved"] for r in mine]))
    report = Path(config.output_dir, "report.md").read_text()
    for cell in ("maj_gpt2", "par_mlp"):
        assert report.count(f"| {cell} | ") == 3 + 1  # the table's rows and one CI row (one specvol method)
    assert "95% bootstrap CI" in report and "tiny MLP cell" in report
    for diff in summary["differences"]:
        assert diff["ci_low"] <= diff["difference"] <= diff["ci_high"]
        assert diff["best_baseline"] in ("plain", "weight_decay")
    for name in ("accuracy.png", "erank.png", "ntk.png", "lambda.png", "coord_check.png"):
        assert Path(config.output_dir, name).read_bytes()[:4] == b"\x89PNG", name
        assert f"]({name})" in report


def test_rerun_skips_finished_runs_and_records_crashes(study, monkeypatch):
    config, records, _ = study
    import hf_specvol.study as study_module

    def must_not_run(run):
        raise AssertionError(f"{run['run_id']} was finished and must be skipped")

    monkeypatch.setattr(study_module, "run_one", must_not_run)
    again = run_study(config, progress=False)
    assert [r["run_id"] for r in again] == [r["run_id"] for r in records]
    monkeypatch.undo()

    broken = dict(GPT2_CELL, name="broken", settings={**GPT2_CELL["settings"], "train_size": 1000})  # > 2^7
    config2 = StudyConfig(output_dir=config.output_dir, cells=[GPT2_CELL, broken], methods=["plain"], seeds=[0],
                          defaults=TINY, workers=1, coord_check=False)
    out = {r["run_id"]: r for r in run_study(config2, progress=False)}
    assert out["maj_gpt2/plain/seed0"]["status"] == "ok"  # reused
    failure = out["broken/plain/seed0"]
    assert failure["status"] == "failed" and "train_size" in failure["error"] and failure["traceback"]
    assert {r["run_id"]: r["status"] for r in load_records(config.output_dir)}["broken/plain/seed0"] == "failed"
    summary = summarize(list(out.values()))
    assert next(r for r in summary if r["cell"] == "broken")["failed"] == 1


def test_method_composition_and_unknown_names():
    assert method_settings("plain") == {}
    assert method_settings("mup+specvol_ntk") == {**METHODS["mup"], **METHODS["specvol_ntk"]}
    assert method_settings("specvol_fixed", {"specvol_fixed": {"spectral_volume_coef": 0.5}})[
        "spectral_volume_coef"] == 0.5
    with pytest.raises(ValueError, match="Unknown method 'adam'"):
        method_settings("mup+adam")
    with pytest.raises(ValueError, match="learning_rte"):
        split_settings({"learning_rte": 1e-3, "output_dir": "x"})
    with pytest.raises(ValueError, match="unique `name`"):
        StudyConfig(output_dir="x", cells=[{"name": "a"}, {"name": "a"}])


def test_bootstrap_difference_against_closed_forms():
    diff, low, high = bootstrap_difference([0.9] * 5, [0.5] * 5)
    assert (diff, low, high) == pytest.approx((0.4, 0.4, 0.4))
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 0.1, 400), rng.normal(0.0, 0.1, 400)
    diff, low, high = bootstrap_difference(a, b)
    half_width = 1.96 * np.sqrt(a.var(ddof=1) / 400 + b.var(ddof=1) / 400)  # normal approximation
    assert diff == pytest.approx(a.mean() - b.mean())
    assert high - low == pytest.approx(2 * half_width, rel=0.1)


def test_study_configs_parse_and_quick_is_small():
    for name in ("study_quick", "study_default", "study_gpu", "study_specvol_sweep"):
        config = StudyConfig.from_yaml(os.path.join(ROOT, "recipes", "configs", f"{name}.yaml"))
        for run in config.runs()[:: max(1, len(config.runs()) // 20)]:
            split_settings(run["settings"])
    default = StudyConfig.from_yaml(os.path.join(ROOT, "recipes", "configs", "study_default.yaml"))
    assert len(default.seeds) >= 5 and {"plain", "weight_decay", "dropout", "mup", "specvol_fixed",
                                        "specvol_ntk"} <= set(default.methods)
    with open(os.path.join(ROOT, "recipes", "configs", "study_quick.yaml")) as f:
        assert yaml.safe_load(f)["output_dir"].startswith("outputs/")


def test_report_cli_on_a_single_run(tmp_path):
    from hf_specvol.pipeline import train_boolean_task

    settings = {**GPT2_CELL["settings"], **TINY, "output_dir": str(tmp_path / "run"), "report_to": "none",
                "save_strategy": "no", "disable_tqdm": True, "spectral_volume_coef": 0.1}
    train_boolean_task(*split_settings(settings), save_model=False)
    assert report_main([str(tmp_path / "run")]) == 0
    for name in ("run_accuracy.png", "run_ranks.png", "run_ntk.png", "run_lambda.png"):
        assert (tmp_path / "run" / name).read_bytes()[:4] == b"\x89PNG"


def test_recipe_smoke_parallel_workers(tmp_path, capsys):
    """The recipe's main() with 2 spawned worker processes on a two-run study."""
    config = {"name": "cli", "output_dir": str(tmp_path / "study"), "workers": 2, "seeds": [0, 1],
              "methods": ["plain"], "defaults": TINY, "cells": [MLP_CELL], "coord_check": False}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    recipe = runpy.run_path(os.path.join(ROOT, "recipes", "run_study.py"), run_name="recipe")
    assert recipe["main"](["--config", str(path)]) == 0
    assert "2 runs (0 failed)" in capsys.readouterr().out
    records = load_records(str(tmp_path / "study"))
    assert sorted(r["run_id"] for r in records) == ["par_mlp/plain/seed0", "par_mlp/plain/seed1"]
    assert all(r["status"] == "ok" for r in records)
    assert (tmp_path / "study" / "report.md").is_file() and (tmp_path / "study" / "summary.csv").is_file()
