"""The study: methods x seeds x cells, resumable, one row per run in `runs.jsonl`.

A *cell* is a task x model x training budget (a flat dict of fields of `BooleanTaskArguments`,
`ModelArguments` and `SpectralVolumeConfig`); a *method* is a named set of overrides (below). A run's
settings are, later entries winning: `STUDY_DEFAULTS`, the study's `defaults`, the cell's `settings`, then
for each part of the method (composed methods such as `mup+specvol_ntk` merge their parts left to right)
its `METHODS` values, the study's `method_settings[part]` and the cell's `method_settings[part]`
(a composed name may also be given its own entry).

Methods (values are the defaults; every one is overridable in the study YAML):

* `plain`: the cell's optimizer (AdamW for GPT-2, SGD for the MLP anchor), no weight decay, no dropout.
* `weight_decay`: decoupled weight decay `weight_decay: 0.1` (AdamW; on matrices and embeddings, not on
  biases and norms, as the Trainer does).
* `dropout`: `model_dropout: 0.1` (GPT-2: resid / embd / attn dropout; the MLP: after every hidden layer).
* `mup`: muP (`hf_specvol.muparam`) with `mup_base_width: 16` (the cell may set another).
* `specvol_fixed`: spectral volume penalty, `spectral_volume_coef: 0.1` on the fixed expansion window.
* `specvol_ntk`: the penalty with the NTK-feedback controller, `spectral_volume_coef: 0.1`
  (raised up to 10x while the NTK is lazy).

`run_study(config)` returns the records (one dict per run); `hf_specvol.report.write_report` turns them
into `summary.csv`, `report.md` and plots. Finished runs are skipped on a rerun; a run that raises is
recorded with `status: "failed"` and its error (and retried on the next rerun). With `workers > 1` runs go
to a pool of spawned processes with `OMP_NUM_THREADS=1` each.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass, field

from .controller import lazy_to_rich_step

logger = logging.getLogger(__name__)

RUNS = "runs.jsonl"
SOLVED_ACCURACY = 0.99

METHODS: dict[str, dict] = {
    "plain": {},
    "weight_decay": {"weight_decay": 0.1},
    "dropout": {"model_dropout": 0.1},
    "mup": {"mup_base_width": 16},
    "specvol_fixed": {"spectral_volume_coef": 0.1, "spectral_schedule": "fixed"},
    "specvol_ntk": {"spectral_volume_coef": 0.1, "spectral_schedule": "ntk_feedback"},
}
BASELINES = ("plain", "weight_decay", "dropout", "mup")

# what every study run starts from: no regularization at all, quiet, no checkpoints
STUDY_DEFAULTS = {
    "spectral_volume_coef": 0.0, "weight_decay": 0.0, "model_dropout": 0.0, "report_to": "none",
    "save_strategy": "no", "disable_tqdm": True, "dataloader_pin_memory": False, "dataloader_num_workers": 0,
    "eval_strategy": "steps", "logging_steps": 1000, "per_device_eval_batch_size": 1000,
}


def method_settings(method: str, overrides: dict | None = None) -> dict:
    """The settings of a (possibly composed, `a+b`) method, with `overrides[part]` applied per part."""
    settings = {}
    for part in method.split("+"):
        if part not in METHODS:
            raise ValueError(f"Unknown method {part!r} in {method!r}; use one of {sorted(METHODS)} or a "
                             "composition such as 'mup+specvol_ntk'.")
        settings.update(METHODS[part])
        settings.update((overrides or {}).get(part, {}))
    settings.update((overrides or {}).get(method, {}) if "+" in method else {})
    return settings


@dataclass
class StudyConfig:
    """What `run_study` runs.

    Args:
        output_dir (`str`): where `runs.jsonl`, `runs/<cell>/<method>/seed<k>/` and the report go.
        methods (`list[str]`): method names (see the module docstring), compositions with `+`.
        seeds (`list[int]`): training seeds (the model init and data order); the data set is the cell's.
        cells (`list[dict]`): each `{"name", "why", "settings": {...}, "methods": [...] (optional subset),
            "method_settings": {method: {...}} (optional)}`.
        defaults (`dict`): settings shared by all cells.
        method_settings (`dict`): per-method overrides for all cells.
        workers (`int`): parallel processes (1: in this process).
        coord_check (`bool` or `list[str]`): run and save the muP coordinate check; `True` means `["mlp"]`,
            a list may also name `"gpt2"` (a 2-block GPT-2, slower).
        retry_failed (`bool`): rerun runs recorded as failed.
    """

    output_dir: str
    cells: list
    methods: list = field(default_factory=lambda: list(METHODS))
    seeds: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    defaults: dict = field(default_factory=dict)
    method_settings: dict = field(default_factory=dict)
    workers: int = 1
    coord_check: bool | list = True
    retry_failed: bool = True
    name: str = "study"
    description: str = ""

    def __post_init__(self):
        if not self.cells:
            raise ValueError("A study needs at least one cell under `cells:`.")
        names = [c.get("name") for c in self.cells]
        if None in names or len(set(names)) != len(names):
            raise ValueError(f"Every cell needs a unique `name`; got {names}.")
        for method in self.methods + [m for c in self.cells for m in c.get("methods", [])]:
            method_settings(method)
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1.")

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> StudyConfig:
        import yaml

        with open(path) as f:
            values = yaml.safe_load(f) or {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown study keys {sorted(unknown)}; valid: "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}.")
        return cls(**values)

    def runs(self) -> list[dict]:
        """Every run of the study: `{"run_id", "cell", "method", "seed", "settings"}`, seed-major (all cells and
        methods of seed 0 first), so that an interrupted study has every cell with fewer seeds."""
        runs = []
        for seed in self.seeds:
            for cell in self.cells:
                cell_overrides = cell.get("method_settings", {})
                overrides = {name: {**self.method_settings.get(name, {}), **cell_overrides.get(name, {})}
                             for name in {*self.method_settings, *cell_overrides}}
                for method in cell.get("methods", self.methods):
                    settings = {**STUDY_DEFAULTS, **self.defaults, **cell.get("settings", {}),
                                **method_settings(method, overrides)}
                    run_id = f"{cell['name']}/{method}/seed{seed}"
                    out = os.path.join(self.output_dir, "runs", cell["name"], method, f"seed{seed}")
                    runs.append({"run_id": run_id, "cell": cell["name"], "method": method, "seed": seed,
                                 "settings": {**settings, "seed": seed, "output_dir": out}})
        return runs


def split_settings(settings: dict):
    """Flat settings -> (BooleanTaskArguments, ModelArguments, SpectralVolumeConfig); unknown keys fail."""
    from .config import SpectralVolumeConfig
    from .models import ModelArguments
    from .pipeline import BooleanTaskArguments

    classes = (BooleanTaskArguments, ModelArguments, SpectralVolumeConfig)
    parts = [{} for _ in classes]
    for key, value in settings.items():
        for i, cls in enumerate(classes):
            if key in {f.name for f in dataclasses.fields(cls) if f.init}:
                parts[i][key] = value
                break
        else:
            raise ValueError(f"Unknown setting {key!r}: it is no field of BooleanTaskArguments, ModelArguments "
                             "or SpectralVolumeConfig.")
    return tuple(cls(**kw) for cls, kw in zip(classes, parts))


# --- one run -> one record ---------------------------------------------------------------------------
def _first_step_at(history: list[dict], threshold: float) -> int | None:
    return next((h["step"] for h in history if h["accuracy"] >= threshold), None)


def _subsample(rows: list, limit: int = 200) -> list:
    stride = max(1, math.ceil(len(rows) / limit))
    return rows[::stride] + ([rows[-1]] if rows and (len(rows) - 1) % stride else [])


def make_record(run: dict, results: dict, history: dict, runtime_s: float) -> dict:
    """The `runs.jsonl` row of a finished run (metrics, trajectories, config)."""
    settings = run["settings"]
    report = results["rank_report"]
    snapshots = report.get("snapshots") or {}
    snap_epoch = max(snapshots, key=int) if snapshots else None
    snap = snapshots.get(snap_epoch) if snap_epoch else None
    layers = {n: s["erank"] for n, s in snap["layers"].items()} if snap else {}
    ntk_history = [{k: h[k] for k in ("step", "erank", "alignment", "distance")} for h in history["ntk_history"]]
    return {
        "run_id": run["run_id"], "cell": run["cell"], "method": run["method"], "seed": run["seed"],
        "status": "ok", "runtime_s": runtime_s,
        "test_accuracy": results["test_accuracy"], "train_accuracy": results["train_accuracy"],
        "generalization_gap": results["generalization_gap"], "loss_gap": results["loss_gap"],
        "test_loss": results["test_loss"], "global_step": results["global_step"],
        "solved": results["test_accuracy"] >= SOLVED_ACCURACY,
        "steps_to_solve": _first_step_at(results["eval_history"], SOLVED_ACCURACY),
        "eval_history": [{"step": h["step"], "accuracy": h["accuracy"]} for h in results["eval_history"]],
        "snapshot_epoch": int(snap_epoch) if snap_epoch else None,
        "snapshot_step": snap["step"] if snap else None,
        "layer_erank": layers,
        "mean_erank": sum(layers.values()) / len(layers) if layers else None,
        "ntk_init": report.get("ntk_init"),
        "ntk_snapshot": snap.get("ntk") if snap else None,
        "ntk_final": report.get("ntk_final"),
        "ntk_history": ntk_history,
        "lambda_history": _subsample(history["lambda_history"]),
        "lambda": report.get("lambda"),
        "transition_step": lazy_to_rich_step(ntk_history, settings.get("ntk_distance_threshold", 0.05),
                                             settings.get("ntk_alignment_threshold", 0.05)),
        "controller_transition_step": (report.get("lambda") or {}).get("transition_step"),
        "task": results["task"], "parameters": results["model"]["parameters"],
        "settings": settings,
    }


def run_one(run: dict) -> dict:
    """Train one run; never raises: a failure becomes a record with `status: "failed"` and the error."""
    import transformers

    from .callbacks import TRACKING_HISTORY
    from .pipeline import train_boolean_task

    transformers.logging.set_verbosity_error()
    start = time.time()
    out_dir = run["settings"]["output_dir"]
    os.makedirs(out_dir, exist_ok=True)
    try:
        task_args, model_args, training_args = split_settings(run["settings"])
        # the Trainer prints its logs: keep them with the run, not on the study's console
        with open(os.path.join(out_dir, "train.log"), "w") as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            results = train_boolean_task(task_args, model_args, training_args, save_model=False)
        with open(os.path.join(training_args.output_dir, TRACKING_HISTORY)) as f:
            history = json.load(f)
        return make_record(run, results, history, time.time() - start)
    except Exception as err:  # recorded, not lost: the study goes on
        logger.warning("run %s failed: %s", run["run_id"], err)
        return {"run_id": run["run_id"], "cell": run["cell"], "method": run["method"], "seed": run["seed"],
                "status": "failed", "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-4000:], "runtime_s": time.time() - start,
                "settings": run["settings"]}


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


# --- the study -----------------------------------------------------------------------------------------
def load_records(output_dir: str) -> list[dict]:
    """The last record of every run in `output_dir/runs.jsonl` (later rows win: a retried run replaces its
    failure); a truncated last line (the process was killed mid-write) is ignored."""
    path = os.path.join(output_dir, RUNS)
    latest: dict[str, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("Ignoring an unreadable line of %s (an interrupted write).", path)
                    continue
                latest[row["run_id"]] = row
    return list(latest.values())


def run_study(config: StudyConfig, progress: bool = True) -> list[dict]:
    """Run every run of `config` not yet finished in `config.output_dir`; return all records.

    Example:
        ```python
        >>> config = StudyConfig.from_yaml("recipes/configs/study_quick.yaml")
        >>> records = run_study(config)
        >>> write_report(records, config.output_dir, config)
        ```
    """
    from tqdm.auto import tqdm

    os.makedirs(config.output_dir, exist_ok=True)
    runs = config.runs()
    wanted = {r["run_id"] for r in runs}
    done = {r["run_id"]: r for r in load_records(config.output_dir)}
    skip = {rid for rid, r in done.items() if r["status"] == "ok" or not config.retry_failed}
    pending = [r for r in runs if r["run_id"] not in skip]
    logger.info("study %s: %d runs, %d already done, %d to run", config.name, len(runs), len(skip), len(pending))
    archs = ["mlp"] if config.coord_check is True else list(config.coord_check or [])
    for arch in archs:
        if not os.path.exists(os.path.join(config.output_dir, COORD_CHECK_FILES[arch])):
            write_coord_check(config.output_dir, arch=arch)
    with open(os.path.join(config.output_dir, "study_config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)

    bar = tqdm(total=len(pending), desc=f"study {config.name}", disable=not progress)

    def collect(record: dict) -> None:
        with open(os.path.join(config.output_dir, RUNS), "a") as f:
            f.write(json.dumps(record) + "\n")
        done[record["run_id"]] = record
        bar.set_postfix_str(f"{record['run_id']}: {record.get('test_accuracy', record['status'])}")
        bar.update(1)

    if config.workers == 1 or len(pending) <= 1:
        for run in pending:
            collect(run_one(run))
    else:
        previous = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # read by the spawned workers at torch import
        try:
            with concurrent.futures.ProcessPoolExecutor(
                    config.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker) as pool:
                futures = [pool.submit(run_one, run) for run in pending]
                for future in concurrent.futures.as_completed(futures):
                    collect(future.result())
        finally:
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = previous
    bar.close()
    return [done[r["run_id"]] for r in runs if r["run_id"] in done and r["run_id"] in wanted]


COORD_CHECK_FILES = {"mlp": "coord_check.json", "gpt2": "coord_check_gpt2.json"}


def write_coord_check(output_dir: str, arch: str = "mlp", widths=(64, 128, 256, 512), base_width: int = 64,
                      steps: int = 3, lr: float = 1e-2) -> list[dict]:
    """muP vs standard parametrization coordinate check (Adam, one batch), saved as JSON in `output_dir`.

    Args:
        arch (`str`): `"mlp"` (a 3-hidden-layer Boolean MLP on 16-bit parity, `coord_check.json`) or `"gpt2"`
            (a 2-block GPT-2 on random 12-token sequences, `coord_check_gpt2.json`).

    Returns:
        The records of `muparam.coord_check` for both parametrizations.
    """
    import torch

    from .muparam import coord_check

    generator = torch.Generator().manual_seed(0)
    if arch == "mlp":
        from .modeling_mlp import BooleanMLPConfig, BooleanMLPForClassification

        bits = torch.randint(0, 2, (256, 16), generator=generator)
        batch = {"bits": bits, "labels": bits[:, :3].sum(-1) % 2}

        def make(width):
            return BooleanMLPForClassification(BooleanMLPConfig(n_bits=16, width=width, depth=3))
    elif arch == "gpt2":
        from transformers import AutoConfig, AutoModelForCausalLM

        ids = torch.randint(0, 12, (16, 12), generator=generator)
        batch = {"input_ids": ids, "labels": ids}

        def make(width):
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(
                "gpt2", vocab_size=12, n_embd=width, n_layer=2, n_head=4, n_positions=16, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        raise ValueError(f"coord_check arch={arch!r} is unknown; use one of {sorted(COORD_CHECK_FILES)}.")
    records = [r for mup in (True, False)
               for r in coord_check(make, batch, widths, base_width=base_width, steps=steps, lr=lr, mup=mup)]
    with open(os.path.join(output_dir, COORD_CHECK_FILES[arch]), "w") as f:
        json.dump(records, f)
    return records
