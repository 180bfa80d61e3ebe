"""Train a causal LM on a Boolean task end to end; shared by the recipes and the study.

`train_boolean_task` builds the dataset (data_builders), the tokenizer and the model, trains with
`SpectralVolumeTrainer`, measures train / test accuracy on equally many examples, and writes the
model, tokenizer, model card, `results.json` and the tracker's `rank_report.json` to the output dir.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np
from datasets import load_from_disk
from transformers import default_data_collator, set_seed

import data_builders
from data_builders.boolean import validate_task_args

from .callbacks import _write_json
from .config import SpectralVolumeConfig
from .metrics import AnswerTokenMetrics
from .models import (
    MLP_TYPE,
    ModelArguments,
    apply_parametrization,
    build_boolean_mlp,
    build_causal_lm,
    check_causal,
    load_tokenizer,
)
from .trainer import SpectralVolumeTrainer

logger = logging.getLogger(__name__)

TASKS = ("majority", "parity")
RESULTS = "results.json"


@dataclass
class BooleanTaskArguments:
    """The Boolean task (see data_builders).

    Args:
        task (`str`, defaults to `"majority"`): `"majority"` or `"parity"`.
        n_bits (`int`): input length n.  k (`int`, *optional*): support size (default n: the full function).
        tie (`str`, *optional*): tie rule for even-k majority: `"one"` or `"drop"`.
        dataset_seed (`int`): seed of the support and of the splits.
        train_size / validation_size / test_size (`int`): split sizes (disjoint bit strings).
        dataset_path (`str`, *optional*): a DatasetDict saved by `python -m data_builders`; replaces the above.
    """

    task: str = field(default="majority", metadata={"help": "Boolean task: majority or parity.", "choices": TASKS})
    n_bits: int = field(default=21, metadata={"help": "Number of input bits n (odd: full majority has no ties)."})
    k: int | None = field(default=None, metadata={"help": "Support size k (default n: the full function)."})
    tie: str | None = field(default=None, metadata={"help": "Tie rule for even-k majority: one | drop."})
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the support set and the splits."})
    train_size: int = field(default=2000, metadata={"help": "Training examples."})
    validation_size: int = field(default=500, metadata={"help": "Validation examples (NTK probe, eval curve)."})
    test_size: int = field(default=1000, metadata={"help": "Test examples."})
    dataset_path: str | None = field(default=None, metadata={"help": "Load a saved DatasetDict instead."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is unknown; use one of {TASKS}.")
        for name in ("validation_size", "test_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1: the recipe evaluates on it "
                                 "(validation: NTK probe and eval curve; test: final accuracy).")
        if self.dataset_path is None:  # fail at parse time, not after the model is built
            sizes = {"train": self.train_size, "validation": self.validation_size, "test": self.test_size}
            k = self.n_bits if self.k is None else self.k
            validate_task_args(self.task, self.n_bits, k, seed=self.dataset_seed, sizes=sizes, tie=self.tie)


def build_dataset(task_args: BooleanTaskArguments):
    """The DatasetDict of `task_args` (raises before anything is written if the request is impossible)."""
    if task_args.dataset_path is not None:
        return load_from_disk(task_args.dataset_path)
    builder = getattr(data_builders, task_args.task)
    kwargs = dict(seed=task_args.dataset_seed, train_size=task_args.train_size,
                  validation_size=task_args.validation_size, test_size=task_args.test_size)
    if task_args.task == "majority":
        kwargs["tie"] = task_args.tie
    k = task_args.n_bits if task_args.k is None else task_args.k
    return builder(task_args.n_bits, k, **kwargs)


def _accuracy_subset(dataset, size: int, seed: int):
    rows = np.random.default_rng(seed).choice(len(dataset), size=min(size, len(dataset)), replace=False)
    return dataset.select(np.sort(rows))


def _model_and_data(task_args: BooleanTaskArguments, model_args: ModelArguments, seed: int):
    """(raw DatasetDict, training DatasetDict, model, tokenizer or None, answer ids or None).

    Causal LMs train on the tokenized view; the MLP arm (`model_type="boolean_mlp"`) on the `bits` column,
    with `label` turned into `labels` by `default_data_collator`. muP is applied when asked.
    """
    raw = build_dataset(task_args)
    if model_args.model_type == MLP_TYPE:
        data = raw.select_columns(["bits", "label"])
        tokenizer = answer_ids = None
        set_seed(seed)
        model = build_boolean_mlp(model_args, len(raw["train"][0]["bits"]))
    else:
        tokenizer = load_tokenizer(model_args, data_builders.build_bit_tokenizer())
        answer_ids = data_builders.answer_token_ids(tokenizer)
        data = data_builders.tokenize_for_causal_lm(raw, tokenizer)
        seq_len = len(data["train"][0]["input_ids"])
        set_seed(seed)  # the initial weights depend on --seed only (not on earlier RNG use)
        model = build_causal_lm(model_args, tokenizer, seq_len)
        check_causal(model, data["train"][0]["input_ids"])
    return raw, data, apply_parametrization(model, model_args), tokenizer, answer_ids


def train_boolean_task(task_args: BooleanTaskArguments, model_args: ModelArguments,
                       training_args: SpectralVolumeConfig, resume_from_checkpoint=None, *,
                       callbacks=None, save_model: bool = True) -> dict:
    """Train, evaluate and save one run. Returns the content of `results.json`.

    Args:
        task_args, model_args, training_args: the three argument dataclasses of the recipes.
        resume_from_checkpoint (`str` or `bool`, *optional*): passed to `Trainer.train`.
        callbacks (`list[TrainerCallback]`, *optional*): extra callbacks (e.g. `EarlyStoppingCallback`).
        save_model (`bool`, defaults to `True`): save the weights (and tokenizer, model card); the study
            switches it off to keep hundreds of runs small.
    """
    raw, tokenized, model, tokenizer, answer_ids = _model_and_data(task_args, model_args, training_args.seed)
    metrics = AnswerTokenMetrics(answer_ids)
    trainer = SpectralVolumeTrainer(
        model=model, args=training_args, train_dataset=tokenized["train"], eval_dataset=tokenized["validation"],
        processing_class=tokenizer, answer_ids=answer_ids, compute_metrics=metrics, callbacks=callbacks,
        data_collator=default_data_collator,  # fixed-length rows; padding collators would turn `label` into `labels`
        preprocess_logits_for_metrics=metrics.preprocess_logits,
    )
    train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)

    test = trainer.evaluate(tokenized["test"], metric_key_prefix="test")
    train_subset = _accuracy_subset(tokenized["train"], len(tokenized["test"]), training_args.seed)
    train = trainer.evaluate(train_subset, metric_key_prefix="train_eval")
    report = trainer.tracker.report()
    results = {
        "task": data_builders.task_metadata(raw),
        "model": {"type": model.config.model_type, "parameters": model.num_parameters(), **asdict(model_args)},
        "method": {k: v for k, v in training_args.to_dict().items() if k.startswith(("spectral_", "ntk_", "rank_"))},
        "train_accuracy": train["train_eval_accuracy"],
        "test_accuracy": test["test_accuracy"],
        "test_accuracy_unrestricted": test["test_accuracy_unrestricted"],
        "generalization_gap": train["train_eval_accuracy"] - test["test_accuracy"],
        "train_loss": train["train_eval_loss"],
        "test_loss": test["test_loss"],
        "loss_gap": test["test_loss"] - train["train_eval_loss"],
        "accuracy_examples": len(train_subset),
        "global_step": train_output.global_step,
        "train_runtime_s": train_output.metrics.get("train_runtime"),
        "eval_history": [{"step": h["step"], "epoch": h.get("epoch"), "accuracy": h["eval_accuracy"]}
                         for h in trainer.state.log_history if "eval_accuracy" in h],
        "rank_report": report,
    }
    trainer.run_results = results  # the model card (trainer.create_model_card) is built from them
    if trainer.is_world_process_zero():
        _write_json(os.path.join(training_args.output_dir, RESULTS), results)
    if training_args.push_to_hub:
        # saves the model, writes our card and uploads output_dir (checkpoints excluded), from the main process
        trainer.push_to_hub(commit_message=f"hf_specvol run: test accuracy {results['test_accuracy']:.4f}")
    elif save_model:
        trainer.save_model(training_args.output_dir)
        trainer.create_model_card()
    return results


def _fmt(value, spec=".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def format_report(results: dict) -> str:
    """A short plain-text report of one run (printed by the recipes)."""
    task, report = results["task"], results["rank_report"]
    lines = [
        f"task: {task.get('task')} n={task.get('n')} k={task.get('k')} support={task.get('support')}  "
        f"model: {results['model']['type']} ({results['model']['parameters']:,} parameters)  "
        f"steps: {results['global_step']}",
        f"test accuracy {_fmt(results['test_accuracy'])}   train accuracy {_fmt(results['train_accuracy'])}   "
        f"generalization gap {_fmt(results['generalization_gap'], '+.4f')}   "
        f"(loss gap {_fmt(results['loss_gap'], '+.4f')}, {results['accuracy_examples']} examples each)",
    ]
    for epoch, snap in sorted(report["snapshots"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"layer-wise ranks at epoch {epoch} (step {snap['step']}):")
        lines.append(f"  {'matrix':<40} {'shape':>11} {'erank':>8} {'stable':>8} {'logvol':>8}")
        for name, s in snap["layers"].items():
            shape = "x".join(map(str, s["shape"]))
            lines.append(f"  {name:<40} {shape:>11} {s['erank']:>8.2f} {s['stable_rank']:>8.2f} "
                         f"{s['log_volume']:>8.4f}")
    if not report["snapshots"]:
        lines.append("layer-wise ranks: no snapshot epoch was reached (see rank_snapshot_epochs).")
    for label, ntk in (("init", report["ntk_init"]), ("end", report["ntk_final"])):
        if ntk:
            lines.append(f"NTK at {label:<4} (step {ntk['step']:>5}): effective rank {ntk['erank']:.2f}  "
                         f"alignment {ntk['alignment']:.4f}  distance from init {ntk['distance']:.4f}")
    lam = report["lambda"]
    controller_step = ("n/a (fixed schedule)" if lam["schedule"] == "FixedSchedule"
                       else lam["transition_step"])
    lines.append(f"lambda ({lam['schedule']}): max {lam['max']:.4g}, mean {lam['mean']:.4g}, "
                 f"on for {lam['steps_with_penalty']} steps (last at {lam['last_positive_step']}); "
                 f"lazy->rich transition: kernel moved at step {report.get('ntk_transition_step')}, "
                 f"controller step {controller_step}")
    return "\n".join(lines)


def load_results(output_dir: str) -> dict:
    with open(os.path.join(output_dir, RESULTS)) as f:
        return json.load(f)
