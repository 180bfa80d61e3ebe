"""`RankTrackingCallback`: layer-wise ranks, the empirical NTK and the lambda controller.

The callback measures, on a fixed probe set, the layer-wise effective rank / stable rank /
log-volume of every matrix in scope and the empirical NTK (effective rank, kernel-target
alignment, distance from the initial kernel). It feeds the NTK signal to the lambda controller
(`controller.py`), which the trainer asks for lambda_t on every optimizer step. Everything it
holds is JSON-serialisable (`ExportableState`), so a run resumed from a checkpoint continues with
the same controller state and history.

Outputs (main process only) in `args.output_dir`:
    rank_report.json     layer-wise snapshot at the end of each epoch in `rank_snapshot_epochs`
                         (10 by default) with the NTK there, the NTK at init and at the end, and
                         the lambda summary.
    tracking_history.json  every rank and NTK measurement and the lambda trajectory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .controller import build_controller, controller_from_state, lazy_to_rich_step
from .ntk import empirical_ntk, ntk_statistics
from .spectral import layer_statistics, weight_matrices

logger = logging.getLogger(__name__)

RANK_REPORT = "rank_report.json"
TRACKING_HISTORY = "tracking_history.json"


@dataclass
class ProbeSet:
    """A fixed batch of validation examples for the NTK.

    Args:
        inputs (`dict[str, torch.Tensor]`): model inputs of P examples, all of one length.
        labels (`torch.Tensor`): (P,) 0/1 targets, for kernel-target alignment.
        answer_position (`int` or `None`): sequence position whose logits predict the answer
            (causal LMs); `None` for classifiers.
        answer_ids (`tuple[int, int]` or `None`): token ids of answers "0" and "1" (causal LMs).
    """

    inputs: dict
    labels: torch.Tensor
    answer_position: int | None = None
    answer_ids: tuple[int, int] | None = None


def _broadcast_from_main(obj):
    """Every rank takes the main process's value, so all ranks feed the controller alike."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _write_json(path: str, payload) -> None:
    """Write atomically: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


class RankTrackingCallback(TrainerCallback, ExportableState):
    """Measures ranks and the NTK, and owns the lambda controller.

    Settings come from the `SpectralVolumeConfig` passed to every hook (`rank_interval_steps`,
    `ntk_interval_steps`, `rank_snapshot_epochs`, ...). `SpectralVolumeTrainer` adds this callback
    and calls `attach()` with the probe set and the schedule length before training.
    """

    def __init__(self):
        # state saved in checkpoints
        self.controller_state: dict | None = None
        self.kernel_at_init: list | None = None
        self.rank_history: list = []
        self.ntk_history: list = []
        self.lambda_history: list = []
        self.snapshots: dict = {}
        # runtime only
        self.controller = None
        self.probe: ProbeSet | None = None
        self.expansion_steps = 0
        self.decay_steps = 0
        self.pending_logs: dict = {}
        self.transition_thresholds = (0.05, 0.05)  # (kernel distance, alignment gain), from the config
        self._epoch_end_step: int | None = None

    # --- wiring -------------------------------------------------------------------------------
    def attach(self, probe: ProbeSet | None, expansion_steps: int, decay_steps: int) -> None:
        self.probe, self.expansion_steps, self.decay_steps = probe, expansion_steps, decay_steps

    def state(self) -> dict:
        if self.controller is not None:
            self.controller_state = self.controller.state_dict()
        names = ("controller_state", "kernel_at_init", "rank_history", "ntk_history", "lambda_history", "snapshots")
        return {"args": {}, "attributes": {name: getattr(self, name) for name in names}}

    def lambda_at(self, step: int) -> float:
        return 0.0 if self.controller is None else self.controller.value(step)

    def pop_logs(self) -> dict:
        logs, self.pending_logs = self.pending_logs, {}
        return logs

    # --- measurements ---------------------------------------------------------------------------
    def _measure_ranks(self, args, state, model) -> dict:
        matrices = weight_matrices(model, include=args.spectral_include, exclude=args.spectral_exclude)
        layers = layer_statistics(matrices, eps=args.spectral_eps)
        record = {"step": state.global_step, "epoch": state.epoch, "layers": layers}
        self.rank_history.append(record)
        for name, stats in layers.items():
            self.pending_logs[f"rank/{name}"] = stats["erank"]
        if layers:
            self.pending_logs["rank/mean_erank"] = sum(s["erank"] for s in layers.values()) / len(layers)
            self.pending_logs["spectral/mean_log_volume"] = (
                sum(s["log_volume"] for s in layers.values()) / len(layers))
        return record

    def _measure_ntk(self, args, state, model) -> dict | None:
        if self.probe is None:
            return None
        if self.ntk_history and self.ntk_history[-1]["step"] == state.global_step:
            return self.ntk_history[-1]
        kernel = empirical_ntk(
            model, self.probe.inputs, answer_position=self.probe.answer_position, answer_ids=self.probe.answer_ids,
            max_block_bytes=int(args.ntk_max_block_mb * 2**20), example_chunk_size=args.ntk_example_chunk_size,
        )
        kernel = _broadcast_from_main(kernel.cpu())
        if self.kernel_at_init is None:
            self.kernel_at_init = kernel.tolist()
        initial = torch.tensor(self.kernel_at_init, dtype=kernel.dtype)
        stats = ntk_statistics(kernel, self.probe.labels, initial)
        record = {"step": state.global_step, "epoch": state.epoch, **{k: float(v) for k, v in stats.items()}}
        self.ntk_history.append(record)
        self.controller.observe(state.global_step, record["distance"], record["alignment"])
        self.pending_logs.update({f"ntk/{k}": record[k] for k in ("erank", "alignment", "distance")})
        return record

    def _due(self, interval: int, step: int) -> bool:
        return interval > 0 and step % interval == 0

    # --- hooks ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.transition_thresholds = (args.ntk_distance_threshold, args.ntk_alignment_threshold)
        if self.controller_state is not None:
            self.controller = controller_from_state(self.controller_state)
        else:
            self.controller = build_controller(args, self.expansion_steps, self.decay_steps)
        if args.track_ranks and state.global_step == 0 and not self.ntk_history:
            self._measure_ranks(args, state, model)
            self._measure_ntk(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        self.lambda_history.append([step, self.lambda_at(step - 1)])
        if not args.track_ranks:
            return
        measured = False
        if self._due(args.rank_interval_steps, step):
            self._measure_ranks(args, state, model)
            measured = True
        if self._due(args.ntk_interval_steps, step):
            self._measure_ntk(args, state, model)
            measured = True
        if measured:
            control.should_log = True
        if state.epoch is not None and state.epoch == round(state.epoch):
            # The last optimizer step of an epoch: do the epoch-end work now, before the Trainer saves a
            # checkpoint of this step, so that a run resumed from that checkpoint has it too.
            self._end_epoch(args, state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if args.track_ranks and self._epoch_end_step != state.global_step:  # not already done in on_step_end
            self._end_epoch(args, state, control, model)

    def _end_epoch(self, args, state, control, model) -> None:
        self._epoch_end_step = state.global_step
        epoch = round(state.epoch)
        last = self.rank_history[-1] if self.rank_history else None
        record = last if last and last["step"] == state.global_step else self._measure_ranks(args, state, model)
        if epoch in args.rank_snapshot_epochs:
            ntk = self._measure_ntk(args, state, model)
            self.snapshots[str(epoch)] = {"step": state.global_step, "layers": record["layers"], "ntk": ntk}
            self._write_outputs(args, state)
        control.should_log = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if args.track_ranks:
            if not self.rank_history or self.rank_history[-1]["step"] != state.global_step:
                self._measure_ranks(args, state, model)
            self._measure_ntk(args, state, model)
        self._write_outputs(args, state)

    # --- outputs ------------------------------------------------------------------------------------
    def lambda_summary(self) -> dict:
        values = [v for _, v in self.lambda_history]
        positive = [s for s, v in self.lambda_history if v > 0]
        return {
            "schedule": None if self.controller is None else type(self.controller).__name__,
            "max": max(values, default=0.0),
            "mean": sum(values) / len(values) if values else 0.0,
            "first_step": positive[0] if positive else None,
            "last_positive_step": positive[-1] if positive else None,
            "steps_with_penalty": len(positive),
            "transition_step": None if self.controller is None else self.controller.transition_step,
        }

    def report(self) -> dict:
        """The content of `rank_report.json`."""
        return {
            "snapshots": self.snapshots,
            "final": self.rank_history[-1] if self.rank_history else None,
            "ntk_init": self.ntk_history[0] if self.ntk_history else None,
            "ntk_final": self.ntk_history[-1] if self.ntk_history else None,
            # the controller's lazy -> rich rule applied to the measured kernels, whatever the schedule
            "ntk_transition_step": lazy_to_rich_step(self.ntk_history, *self.transition_thresholds),
            "lambda": self.lambda_summary(),
        }

    def _write_outputs(self, args, state) -> None:
        if not state.is_world_process_zero:
            return
        _write_json(os.path.join(args.output_dir, RANK_REPORT), self.report())
        _write_json(os.path.join(args.output_dir, TRACKING_HISTORY), {
            "rank_history": self.rank_history, "ntk_history": self.ntk_history,
            "lambda_history": self.lambda_history,
            "controller": None if self.controller is None else self.controller.state_dict(),
        })
