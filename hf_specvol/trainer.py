"""`SpectralVolumeTrainer`: the HF `Trainer` plus lambda_t * spectral volume penalty.

The penalty (`spectral.spectral_penalty`) is added once per optimizer step, on the micro-batch
where gradients synchronise, and scaled so that gradient accumulation and data parallelism give
the update of one big batch:

* `Trainer.training_step` divides the loss by the accumulation steps unless it counts as already
  scaled (`loss_is_scaled_for_ga`, or the model normalised by `num_items_in_batch`). Added once on
  the sync micro-batch, the penalty therefore needs factor 1 on the scaled path and
  `current_gradient_accumulation_steps` on the unscaled one.
* Under DDP every rank adds the same penalty and DDP averages identical gradients: no world-size
  factor.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections import defaultdict

import numpy as np
import torch
from transformers import Trainer

from .callbacks import ProbeSet, RankTrackingCallback
from .config import SpectralVolumeConfig
from .model_card import model_card
from .spectral import matrix_scope, spectral_penalty, weight_matrices

logger = logging.getLogger(__name__)

_NOT_MODEL_INPUTS = {"labels", "label", "attention_mask"}


def weight_sharding(accelerator) -> str | None:
    """The name of the setup if `accelerator` shards weight matrices across processes, else `None`.

    FSDP (1 and 2) and DeepSpeed ZeRO-3 keep only a shard of every matrix on each process; DDP and
    DeepSpeed ZeRO-1/2 keep full matrices (ZeRO-1/2 shard optimizer state and gradients only).
    """
    state = accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None:
        return "FSDP"
    deepspeed = getattr(state, "deepspeed_plugin", None)
    if deepspeed is not None and deepspeed.zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return None


def build_probe(model, dataset, size: int, seed: int, answer_ids: tuple[int, int] | None) -> ProbeSet:
    """Draw the fixed NTK probe set: `size` examples of `dataset` chosen with `seed`.

    Model inputs are the dataset columns that `model.forward` accepts (labels and attention mask
    excluded: probes are fixed-length). Targets come from the `label` column. For a causal LM the
    answer position is the one before the single label that is not -100.
    """
    if "label" not in dataset.column_names:
        raise ValueError("The NTK probe needs a 0/1 `label` column in the evaluation dataset "
                         "(the data_builders datasets have one); or set track_ranks=False.")
    accepted = set(inspect.signature(model.forward).parameters)
    columns = [c for c in dataset.column_names if c in accepted and c not in _NOT_MODEL_INPUTS]
    if not columns:
        raise ValueError(f"No column of the evaluation dataset ({dataset.column_names}) is an input of "
                         f"{type(model).__name__}.forward; tokenize the dataset first.")
    rng = np.random.default_rng(seed)
    rows = dataset.select(np.sort(rng.choice(len(dataset), size=min(size, len(dataset)), replace=False)))
    inputs = {c: torch.as_tensor(np.asarray(rows[c])) for c in columns}
    labels = torch.as_tensor(np.asarray(rows["label"]), dtype=torch.float64)
    answer_position = None
    if answer_ids is not None:
        positions = np.argmax(np.asarray(rows["labels"]) != -100, axis=-1)
        if len(set(positions.tolist())) != 1:
            raise ValueError("NTK probes must share one answer position: use fixed-length prompts.")
        answer_position = int(positions[0]) - 1
    return ProbeSet(inputs, labels, answer_position, answer_ids)


class SpectralVolumeTrainer(Trainer):
    """`Trainer` whose training loss is task loss + lambda_t * P(theta).

    Args:
        model, args, ...: as for `Trainer`; `args` must be a `SpectralVolumeConfig`.
        answer_ids (`tuple[int, int]`, *optional*): token ids of the answers "0" and "1" for a causal
            LM (see `data_builders.answer_token_ids`); needed for the NTK probe of a causal LM.
            Leave `None` for a classifier with (batch, 2) logits.

    Attributes:
        run_results (`dict` or `None`): the results of the finished run (the content of `results.json`, set by
            `train_boolean_task`). When set, `create_model_card` (which `push_to_hub` calls before uploading)
            writes hf_specvol's card: method, its config, dataset, metrics, rank report.

    Weight sharding (FSDP, DeepSpeed ZeRO-3) is refused with an error while the penalty or the tracker is on:
    both need whole matrices. One process, DDP and DeepSpeed ZeRO-1/2 are supported.

    Example:
        ```python
        args = SpectralVolumeConfig(output_dir="out", spectral_volume_coef=0.1, num_train_epochs=10)
        trainer = SpectralVolumeTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                                        processing_class=tokenizer, answer_ids=answer_token_ids(tokenizer))
        trainer.train()
        ```
    """

    def __init__(self, model=None, args: SpectralVolumeConfig | None = None, *trainer_args,
                 answer_ids: tuple[int, int] | None = None, **trainer_kwargs):
        if not isinstance(args, SpectralVolumeConfig):
            raise TypeError(f"SpectralVolumeTrainer needs args=SpectralVolumeConfig(...), got {type(args).__name__}; "
                            "SpectralVolumeConfig accepts every TrainingArguments field.")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        sharding = weight_sharding(self.accelerator)
        if sharding is not None and (args.spectral_volume_coef > 0 or args.track_ranks):
            raise ValueError(
                f"{sharding} shards every weight matrix across processes: the spectral volume penalty and the rank/"
                "NTK tracker need whole matrices and are not supported there. Supported setups: one process (CPU or "
                "GPU), DDP (accelerate multi-GPU / multi-CPU, torchrun) and DeepSpeed ZeRO-1/2; or set "
                "spectral_volume_coef=0 and track_ranks=False to train without them.")
        self.answer_ids = answer_ids
        self.run_results: dict | None = None
        self._metrics = defaultdict(list)
        if not any(isinstance(cb, RankTrackingCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(RankTrackingCallback())
        if args.spectral_volume_coef > 0 and not weight_matrices(self.model, args.spectral_include,
                                                                  args.spectral_exclude):
            raise ValueError(f"{type(self.model).__name__} has no weight matrix in scope for the penalty; "
                             "check spectral_include / spectral_exclude.")

    @property
    def tracker(self) -> RankTrackingCallback:
        # looked up each time: a resume replaces the callback instance
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, RankTrackingCallback))

    # --- schedule and probe ------------------------------------------------------------------------
    def _steps_per_epoch(self) -> int:
        try:
            batches = len(self.get_train_dataloader())
        except TypeError:
            raise ValueError("spectral_expansion_epochs needs a training dataset with a length (a map-style "
                             "Dataset); for a streaming dataset set max_steps and num_train_epochs.") from None
        return max(math.ceil(batches / self.args.gradient_accumulation_steps), 1)

    def _attach_tracker(self) -> None:
        """Give the (possibly freshly restored) tracker its probe set and schedule lengths."""
        args = self.args
        steps_per_epoch = self._steps_per_epoch()
        total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        expansion_steps = round(args.spectral_expansion_epochs * steps_per_epoch)
        if args.spectral_volume_coef > 0 and expansion_steps > total_steps:
            raise ValueError(f"spectral_expansion_epochs={args.spectral_expansion_epochs} ({expansion_steps} steps) "
                             f"is longer than training ({total_steps} steps); shorten it or train longer.")
        probe = None
        if args.track_ranks:
            if self.eval_dataset is None:
                raise ValueError("The rank/NTK tracker draws its probe from eval_dataset: pass one, "
                                 "or set track_ranks=False.")
            probe = build_probe(self.model, self.eval_dataset, args.ntk_probe_size, args.seed, self.answer_ids)
            probe.inputs = {k: v.to(self.args.device) for k, v in probe.inputs.items()}
        self.tracker.attach(probe, expansion_steps, round(args.spectral_decay_epochs * steps_per_epoch))

    def train(self, *args, **kwargs):
        self._attach_tracker()
        self._matrix_scope = None  # found again on the first step: the model may have changed since
        return super().train(*args, **kwargs)

    def _load_callback_state(self) -> None:
        probe, expansion, decay = self.tracker.probe, self.tracker.expansion_steps, self.tracker.decay_steps
        super()._load_callback_state()
        self.tracker.attach(probe, expansion, decay)

    # --- muP optimizer ---------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with muP per-parameter-group learning rates when the model is in muP.

        A model prepared by `hf_specvol.muparam.apply_mup` carries `config.mup_base_width`; its Adam/AdamW or
        SGD optimizer then gets the groups of `muparam.mup_param_groups` (weight decay on the parameters the
        Trainer would decay). Other models get the Trainer's default optimizer.
        """
        opt_model = self.model if model is None else model
        base_width = getattr(getattr(opt_model, "config", None), "mup_base_width", None)
        if self.optimizer is not None or base_width is None:
            return super().create_optimizer(model)
        from .muparam import mup_param_groups

        optim = str(getattr(self.args.optim, "value", self.args.optim))
        kind = "sgd" if "sgd" in optim else "adam" if "adam" in optim else None
        if kind is None:
            raise ValueError(f"optim={optim!r} has no muP learning-rate rule; use an Adam/AdamW optim or 'sgd' "
                             "with a muP model (mup_base_width).")
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        groups = mup_param_groups(opt_model, base_width, self.args.learning_rate, optimizer=kind,
                                  weight_decay=self.args.weight_decay,
                                  decay_names=set(self.get_decay_parameter_names(opt_model)))
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # --- model card ----------------------------------------------------------------------------------
    def create_model_card(self, *args, **kwargs) -> None:
        """Write `output_dir/README.md`: hf_specvol's card from `run_results` if set, else the Trainer's card."""
        if self.run_results is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
                f.write(model_card(self.run_results))
        return None

    # --- the loss ------------------------------------------------------------------------------------
    def _penalty_scale(self, num_items_in_batch) -> float:
        """1 if `training_step` will not divide the loss by the accumulation steps, else that count."""
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)
        return 1.0 if scaled else float(self.current_gradient_accumulation_steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and self.accelerator.sync_gradients:
            lam = self.tracker.lambda_at(self.state.global_step)
            self._metrics["spectral/lambda"].append(lam)
            if lam > 0:
                if getattr(self, "_matrix_scope", None) is None:  # walk the modules once per train()
                    self._matrix_scope = matrix_scope(self.model, self.args.spectral_include,
                                                      self.args.spectral_exclude)
                penalty = spectral_penalty(self._matrix_scope.views(), eps=self.args.spectral_eps)
                if torch.isfinite(penalty):
                    loss = loss + (lam * self._penalty_scale(num_items_in_batch)) * penalty.to(loss.dtype)
                    self._metrics["spectral/penalty"].append(penalty.detach())  # no device sync here
                    self._metrics["spectral/skipped"].append(0.0)
                else:
                    logger.warning("Spectral volume penalty is %s at step %d; skipped for this step.",
                                   penalty.item(), self.state.global_step)
                    self._metrics["spectral/skipped"].append(1.0)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: merge the averaged step metrics
            for key, values in self._metrics.items():
                if key == "spectral/skipped":
                    logs[key] = float(sum(values))
                elif values:
                    logs[key] = sum(float(v) for v in values) / len(values)
            self._metrics.clear()
        logs.update(self.tracker.pop_logs())
        super().log(logs, start_time)
