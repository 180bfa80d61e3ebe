"""`SpectralVolumeConfig`: `TrainingArguments` plus the spectral volume, rank and NTK settings."""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

logger = logging.getLogger(__name__)

SCHEDULES = ("fixed", "ntk_feedback")
# NaN passes every `<` check, so these are checked for finiteness first
_FINITE_FIELDS = ("learning_rate", "spectral_volume_coef", "spectral_expansion_epochs", "spectral_decay_epochs",
                  "spectral_lambda_cap", "spectral_eps", "ntk_distance_threshold", "ntk_alignment_threshold",
                  "ntk_lambda_growth", "ntk_max_block_mb")


@dataclass(repr=False)  # keep TrainingArguments' repr, which masks hub_token
class SpectralVolumeConfig(TrainingArguments):
    r"""
    Configuration for [`SpectralVolumeTrainer`]: every `TrainingArguments` field plus the ones below.

    Parameters:
        > Spectral volume penalty

        spectral_volume_coef (`float`, *optional*, defaults to `0.1`):
            lambda_max: weight of the penalty P = -(1/L) sum_l log_volume(W_l) in the training loss
            (initial lambda for the `ntk_feedback` schedule). `0` trains exactly like `Trainer`.
        spectral_schedule (`str`, *optional*, defaults to `"fixed"`):
            `"fixed"` (lambda_max inside the expansion window, then linear decay) or `"ntk_feedback"`
            (raise lambda while the NTK is lazy, anneal it at the lazy -> rich transition).
        spectral_expansion_epochs (`float`, *optional*, defaults to `3.0`):
            Length E of the expansion window in epochs; must not exceed the training length.
        spectral_decay_epochs (`float`, *optional*, defaults to `1.0`):
            Epochs over which lambda falls linearly to 0 after the window or the transition.
        spectral_lambda_cap (`float` or `None`, *optional*, defaults to `None`):
            Upper bound for the `ntk_feedback` controller; `None` means 10 x `spectral_volume_coef`.
        spectral_eps (`float`, *optional*, defaults to `1e-4`):
            eps in logdet(R + eps I): bounds the log-volume of rank-deficient matrices.
        spectral_include (`str` or `None`, *optional*, defaults to `None`):
            Regex; only matrices whose name matches are in scope.
        spectral_exclude (`str` or `None`, *optional*, defaults to `None`):
            Regex; matrices whose name matches are left out.

        > NTK feedback controller

        ntk_distance_threshold (`float`, *optional*, defaults to `0.05`):
            Kernel distance from init above which the kernel counts as moved.
        ntk_alignment_threshold (`float`, *optional*, defaults to `0.05`):
            Gain of kernel-target alignment over its initial value that counts as aligned.
        ntk_window (`int`, *optional*, defaults to `2`):
            Consecutive lazy NTK measurements before lambda is raised once more.
        ntk_lambda_growth (`float`, *optional*, defaults to `1.5`):
            Factor by which lambda is raised while lazy.

        > Tracking

        ntk_probe_size (`int`, *optional*, defaults to `64`):
            Number P of validation examples in the fixed NTK probe set (drawn once with `seed`).
        ntk_interval_steps (`int`, *optional*, defaults to `100`):
            Measure the NTK every this many optimizer steps (also at init, snapshot epochs and the
            end); `0` keeps only those. One measurement on 64 probes costs about 4 training steps of
            the default recipe model on CPU, so 100 keeps the tracker near 4% of training time
            (docs/benchmarks.md); it costs more, relative to a step, for larger models.
        ntk_max_block_mb (`float`, *optional*, defaults to `256`):
            Cap on one Jacobian block (P x parameters) in MiB, and on the estimated working set of one
            vectorized Jacobian call (at least 64 MiB); bounds NTK memory on large models (about 1 GiB on
            GPT-2 small).
        ntk_example_chunk_size (`int`, *optional*, defaults to `64`):
            Most probe examples per vectorized Jacobian call; fewer when the call would exceed the memory
            bound above.
        rank_interval_steps (`int`, *optional*, defaults to `50`):
            Measure layer-wise effective rank / stable rank / log-volume every this many steps
            (also at every epoch end); `0` keeps only epoch ends.
        rank_snapshot_epochs (`list[int]`, *optional*, defaults to `[10]`):
            Epochs at whose end the layer-wise snapshot goes to `rank_report.json`.
        track_ranks (`bool`, *optional*, defaults to `True`):
            Attach the `RankTrackingCallback`. Required by the `ntk_feedback` schedule.
    """

    spectral_volume_coef: float = field(
        default=0.1, metadata={"help": "lambda_max, the weight of the spectral volume penalty (0 = plain Trainer)."}
    )
    spectral_schedule: str = field(
        default="fixed", metadata={"help": "Schedule of lambda: 'fixed' or 'ntk_feedback'.", "choices": SCHEDULES}
    )
    spectral_expansion_epochs: float = field(
        default=3.0, metadata={"help": "Length of the expansion window in epochs."}
    )
    spectral_decay_epochs: float = field(
        default=1.0, metadata={"help": "Epochs over which lambda decays linearly to 0 after the window."}
    )
    spectral_lambda_cap: float | None = field(
        default=None, metadata={"help": "Cap on lambda for 'ntk_feedback' (default 10 x spectral_volume_coef)."}
    )
    spectral_eps: float = field(default=1e-4, metadata={"help": "eps in logdet(R + eps I)."})
    spectral_include: str | None = field(
        default=None, metadata={"help": "Regex: only matrices whose name matches are penalized and tracked."}
    )
    spectral_exclude: str | None = field(
        default=None, metadata={"help": "Regex: matrices whose name matches are left out."}
    )
    ntk_distance_threshold: float = field(
        default=0.05, metadata={"help": "Kernel distance from init that marks the lazy -> rich transition."}
    )
    ntk_alignment_threshold: float = field(
        default=0.05, metadata={"help": "Gain in kernel-target alignment that marks the transition."}
    )
    ntk_window: int = field(default=2, metadata={"help": "Lazy NTK measurements before lambda is raised."})
    ntk_lambda_growth: float = field(default=1.5, metadata={"help": "Factor by which lambda is raised while lazy."})
    ntk_probe_size: int = field(default=64, metadata={"help": "Number of validation examples in the NTK probe."})
    ntk_interval_steps: int = field(default=100, metadata={"help": "NTK measurement interval in steps (0: off)."})
    ntk_max_block_mb: float = field(default=256, metadata={"help": "Max MiB of one Jacobian block."})
    ntk_example_chunk_size: int = field(
        default=64, metadata={"help": "Most probe examples per vmap(jacrev) call (fewer if memory needs it)."}
    )
    rank_interval_steps: int = field(default=50, metadata={"help": "Rank measurement interval in steps (0: off)."})
    rank_snapshot_epochs: list[int] = field(
        default_factory=lambda: [10], metadata={"help": "Epochs whose end-of-epoch ranks go to rank_report.json."}
    )
    track_ranks: bool = field(default=True, metadata={"help": "Attach the RankTrackingCallback."})
    restore_callback_states_from_checkpoint: bool = field(
        default=True,
        metadata={"help": "Restore the tracker and lambda controller when resuming (on by default here)."},
    )

    def __getstate__(self) -> dict:
        # Checkpoints and `push_to_hub` pickle the arguments (training_args.bin): never with the Hub token.
        return {**self.__dict__, "hub_token": None}

    def __post_init__(self):
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # Launched with several processes (accelerate --multi_gpu, torchrun) on a machine without an
            # accelerator: without use_cpu, accelerate leaves every process un-distributed and each trains alone
            # (and writes as if it were the main process). Must be set before super() sets up the device.
            logger.info("WORLD_SIZE=%s and no accelerator: setting use_cpu=True so the processes join one "
                        "gloo DDP group.", os.environ["WORLD_SIZE"])
            self.use_cpu = True
        super().__post_init__()
        errors = []
        for name in _FINITE_FIELDS:
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                errors.append(f"{name}={value} is not a finite number; pass a finite value.")
        for name in ("spectral_include", "spectral_exclude"):
            try:
                re.compile(getattr(self, name) or "")
            except re.error as err:
                errors.append(f"{name}={getattr(self, name)!r} is not a valid regular expression ({err}).")
        if self.spectral_volume_coef < 0:
            errors.append(f"spectral_volume_coef={self.spectral_volume_coef} is negative; use a value >= 0 "
                          "(the penalty expands volume only with a positive sign; 0 disables it).")
        if self.spectral_schedule not in SCHEDULES:
            errors.append(f"spectral_schedule={self.spectral_schedule!r} is unknown; use one of {SCHEDULES}.")
        for name in ("spectral_expansion_epochs", "spectral_decay_epochs", "ntk_distance_threshold",
                     "ntk_alignment_threshold", "ntk_max_block_mb"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} is negative; use a value >= 0.")
        for name in ("ntk_interval_steps", "rank_interval_steps"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} is negative; use 0 to switch it off or a step count.")
        for name in ("ntk_probe_size", "ntk_window", "ntk_example_chunk_size"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1.")
        if self.ntk_lambda_growth < 1:
            errors.append(f"ntk_lambda_growth={self.ntk_lambda_growth} must be >= 1 (the controller only raises).")
        if self.spectral_lambda_cap is not None and self.spectral_lambda_cap < self.spectral_volume_coef:
            errors.append(f"spectral_lambda_cap={self.spectral_lambda_cap} is below spectral_volume_coef="
                          f"{self.spectral_volume_coef}; raise the cap or leave it unset.")
        if self.spectral_eps <= 0:
            errors.append(f"spectral_eps={self.spectral_eps} must be > 0 (it keeps logdet finite).")
        if any(int(e) < 1 for e in self.rank_snapshot_epochs):
            errors.append(f"rank_snapshot_epochs={self.rank_snapshot_epochs} must hold epochs >= 1.")
        if (self.spectral_volume_coef > 0 and self.max_steps <= 0
                and self.spectral_expansion_epochs > self.num_train_epochs):
            errors.append(f"spectral_expansion_epochs={self.spectral_expansion_epochs} is longer than training "
                          f"(num_train_epochs={self.num_train_epochs}); shorten the window or train longer.")
        if self.spectral_schedule == "ntk_feedback" and not self.track_ranks:
            errors.append("spectral_schedule='ntk_feedback' needs the NTK tracker: set track_ranks=True.")
        if errors:
            raise ValueError("Invalid SpectralVolumeConfig:\n  - " + "\n  - ".join(errors))
