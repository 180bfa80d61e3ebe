"""(1) Training step time: SpectralVolumeTrainer with the penalty on every optimizer step / plain Trainer.

The model, data and training arguments are the default recipe's (`recipes/configs/majority_default.yaml`:
2-block GPT-2 of width 64, batch 32, 22 tokens). Three variants train side by side in one process, in
rounds of `ntk_interval_steps` optimizer steps (75 in the recipe), each round with a fresh model (same seed)
and a fresh trainer, rotating the order of the variants from round to round:

* `plain`: `transformers.Trainer` (no penalty, no tracker);
* `penalty`: `SpectralVolumeTrainer`, lambda > 0 on every step of the round, tracker off (`track_ranks=False`):
  the pure cost of the penalty;
* `tracked`: the same with the default tracker on (ranks and NTK every 75 steps, ranks at epoch ends).

Step times of fresh models and trainers vary by +-15% from round to round on a shared machine, more than
the penalty costs, so the headline ratio comes from `alternating` runs instead: one `SpectralVolumeTrainer`
run with lambda > 0 on every other step (tracker off), comparing its on-steps with its off-steps.

A step's time runs from one `on_step_begin` to the next (the last step: to its `on_step_end`), so it
includes data loading, the optimizer, callbacks and logging. The first `skip` steps of a round are warm-up.
`penalty` / `plain` compares step-time medians, round by round (the median over rounds of the ratio within
a round, so that load drifting between rounds cancels); the tracker's cost is periodic, so `tracked` is
compared by mean step time (amortized over whole rounds, each of which holds one interval measurement). Both wall
time and process CPU time are recorded: on a shared machine the CPU time of a single-threaded run is the
steadier measure (time spent descheduled does not count), wall time is what a user waits.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from functools import lru_cache

from timing import repo_root, summarize

RECIPE = os.path.join("recipes", "configs", "majority_default.yaml")


@lru_cache(maxsize=1)
def default_recipe():
    """Parsed default recipe, tokenized data, tokenizer and answer ids (built once per process)."""
    import data_builders
    from hf_specvol.cli import RecipeParser
    from hf_specvol.config import SpectralVolumeConfig
    from hf_specvol.models import ModelArguments, load_tokenizer
    from hf_specvol.pipeline import BooleanTaskArguments, build_dataset

    parser = RecipeParser((BooleanTaskArguments, ModelArguments, SpectralVolumeConfig))
    task_args, model_args, training_args = parser.parse_args_and_config(
        ["--config", os.path.join(repo_root(), RECIPE), "--output_dir", os.path.join(repo_root(), "outputs", "bench")])
    tokenizer = load_tokenizer(model_args, data_builders.build_bit_tokenizer())
    data = data_builders.tokenize_for_causal_lm(build_dataset(task_args), tokenizer)
    return task_args, model_args, training_args, data, tokenizer, data_builders.answer_token_ids(tokenizer)


def build_model(seed: int = 0):
    import torch

    from hf_specvol.models import build_causal_lm

    _, model_args, _, data, tokenizer, _ = default_recipe()
    torch.manual_seed(seed)
    return build_causal_lm(model_args, tokenizer, len(data["train"][0]["input_ids"]))


def _clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall-clock and process CPU time of every optimizer step."""

        def __init__(self):
            self.begins, self.last_end = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kwargs):
            self.last_end = (time.perf_counter(), time.process_time())

        def durations(self) -> list[tuple[float, float]]:
            ends = [*self.begins[1:], self.last_end]
            return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.begins, ends)]

    return StepClock()


def train_round(variant: str, steps: int):
    """Train `steps` optimizer steps of one variant; returns per-step durations (s)."""
    from transformers import Trainer, default_data_collator

    from hf_specvol.trainer import SpectralVolumeTrainer

    _, _, training_args, data, tokenizer, answer_ids = default_recipe()
    steps_per_epoch = len(data["train"]) // training_args.per_device_train_batch_size + (
        len(data["train"]) % training_args.per_device_train_batch_size > 0)
    common = dict(max_steps=steps, eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
                  spectral_expansion_epochs=steps / steps_per_epoch, spectral_decay_epochs=0.0)
    model = build_model()
    clock = _clock()
    if variant == "plain":
        args = dataclasses.replace(training_args, **common, spectral_volume_coef=0.0, track_ranks=False)
        trainer = Trainer(model=model, args=args, train_dataset=data["train"], data_collator=default_data_collator)
    else:
        args = dataclasses.replace(training_args, **common, track_ranks=variant == "tracked")
        trainer = SpectralVolumeTrainer(model=model, args=args, train_dataset=data["train"],
                                        eval_dataset=data["validation"], data_collator=default_data_collator,
                                        processing_class=tokenizer, answer_ids=answer_ids)
    trainer.add_callback(clock)  # last, so a step's time includes the tracker's on_step_end
    if variant == "alternating":  # lambda on the steps with an even index only; same cost as Trainer otherwise
        lam = training_args.spectral_volume_coef
        trainer.tracker.lambda_at = lambda step: lam if step % 2 == 0 else 0.0
    trainer.train()
    if variant in ("penalty", "tracked"):
        lambdas = [lam for _, lam in trainer.tracker.lambda_history]
        if not all(lam > 0 for lam in lambdas):
            raise RuntimeError(f"the penalty was off on some steps of the benchmark: {lambdas}")
    return clock.durations()


def alternating(rounds: int, steps: int, skip: int) -> dict:
    """Penalty on every other step of one run: on- and off-steps share the model, the trainer and the moment.

    The ratio median(on) / median(off) within a run, then the median over runs. Off-steps cost what a plain
    `Trainer` step costs (the trainer's own additions are a few microseconds when lambda is 0).
    """
    ratios = {"wall": [], "cpu": []}
    on_off = {"wall": ([], []), "cpu": ([], [])}
    for _ in range(rounds):
        durations = train_round("alternating", steps)[skip:]
        for clock, index in (("wall", 0), ("cpu", 1)):
            on = [d[index] for i, d in enumerate(durations, start=skip) if i % 2 == 0]
            off = [d[index] for i, d in enumerate(durations, start=skip) if i % 2 == 1]
            ratios[clock].append(statistics.median(on) / statistics.median(off))
            on_off[clock][0].extend(on)
            on_off[clock][1].extend(off)
    return {clock: {"penalty_over_plain": statistics.median(ratios[clock]),
                    "per_run": [round(r, 4) for r in ratios[clock]],
                    "on_median_s": statistics.median(on_off[clock][0]),
                    "off_median_s": statistics.median(on_off[clock][1])}
            for clock in ratios}


def run(quick: bool = False) -> dict:
    _, _, training_args, *_ = default_recipe()
    steps = training_args.ntk_interval_steps or 75
    rounds, skip = (2, 5) if quick else (8, 5)
    variants = ["plain", "penalty", "tracked"]
    train_round("penalty", 10)  # warm-up: imports, allocator, first NTK-free step
    per_round: list[dict[str, list[tuple[float, float]]]] = []
    for i in range(rounds):
        per_round.append({})
        for variant in variants[i % 3:] + variants[: i % 3]:
            per_round[-1][variant] = train_round(variant, steps)[skip:]
    _, _, training_args, data, *_ = default_recipe()
    steps_per_epoch = -(-len(data["train"]) // training_args.per_device_train_batch_size)
    # indices (after the warm-up steps) of the steps whose on_step_end / on_epoch_end measure
    measured = [step - 1 - skip for step in range(skip + 1, steps + 1)
                if step % steps_per_epoch == 0 or step % (training_args.rank_interval_steps or steps + 1) == 0
                or step % (training_args.ntk_interval_steps or steps + 1) == 0]
    result = {"model": "recipe default: GPT-2 2 blocks, width 64, batch 32, 22 tokens",
              "rounds": rounds, "steps_per_round": steps, "warmup_steps_per_round": skip}
    for clock, index in (("wall", 0), ("cpu", 1)):
        stats = {}
        for variant in variants:
            values = [p[index] for r in per_round for p in r[variant]]
            stats[variant] = {**summarize(values), "mean_s": statistics.fmean(values)}
            del stats[variant]["samples_s"]

        def paired(a: str, b: str, reduce, index=index) -> float:
            """Median over rounds of reduce(a) / reduce(b) within the round: robust to load that drifts."""
            return statistics.median(reduce([p[index] for p in r[a]]) / reduce([p[index] for p in r[b]])
                                     for r in per_round)

        result[clock] = {
            "steps": stats,
            "penalty_over_plain": paired("penalty", "plain", statistics.median),
            "tracked_over_plain_mean": paired("tracked", "plain", statistics.fmean),
            "tracked_over_penalty_mean": paired("tracked", "penalty", statistics.fmean),
            "pooled_penalty_over_plain": stats["penalty"]["median_s"] / stats["plain"]["median_s"],
        }
        result[clock]["tracker_share_of_wall_time"] = 1.0 - 1.0 / result[clock]["tracked_over_penalty_mean"]
        # In place: the extra time of the steps that end with a measurement (the interval's last step, epoch
        # ends) over the round's median step. Unlike means, load spikes on other steps do not count.
        shares = []
        for r in per_round:
            durations = [p[index] for p in r["tracked"]]
            typical = statistics.median(durations)
            extra = sum(max(durations[i] - typical, 0.0) for i in measured if i < len(durations))
            shares.append(extra / (extra + typical * len(durations)))
        result[clock]["tracker_share_at_measurement_steps"] = statistics.median(shares)
    result["alternating"] = alternating(rounds=2 if quick else 6, steps=150, skip=skip)
    result["target_penalty_over_plain"] = 1.10
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
