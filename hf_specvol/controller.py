"""Schedules for the spectral volume coefficient lambda_t.

Two controllers share one small interface (`value(step)`, `observe(...)`, `state_dict()`;
`controller_from_state()` rebuilds one), both pure Python with JSON-serialisable state so they can be saved in and
restored from Trainer checkpoints:

* `FixedSchedule`: lambda_max for the first `expansion_steps` optimizer steps (the expansion
  window, i.e. the first E epochs), then a linear decay to 0 over `decay_steps`.
* `NTKFeedbackController`: starts at `lambda_init`; while the empirical NTK stays lazy
  (kernel distance from init below `distance_threshold` and kernel-target alignment gained since
  init below `alignment_threshold`) it multiplies lambda by `growth` after every `window`
  consecutive lazy measurements, up to `lambda_cap`. The first measurement that crosses either
  threshold is the lazy -> rich transition: its step is recorded and lambda anneals linearly to 0
  over `decay_steps`. If no transition happens inside the expansion window, lambda anneals from the
  window's end, exactly like the fixed schedule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


def _linear_decay(value: float, step: int, start: int, decay_steps: int) -> float:
    """`value` until `start`, then linear to 0 over `decay_steps` (0 steps: drop at once)."""
    if step < start:
        return value
    if decay_steps <= 0:
        return 0.0
    return value * max(0.0, 1.0 - (step - start) / decay_steps)


class _Serialisable:
    """JSON-friendly `state_dict` for dataclass controllers (restored by `controller_from_state`)."""

    def state_dict(self) -> dict:
        return {"type": type(self).__name__, **asdict(self)}



@dataclass
class FixedSchedule(_Serialisable):
    """lambda_t = lambda_max inside the expansion window, then linear decay to 0.

    Args:
        lambda_max (`float`): coefficient inside the window.
        expansion_steps (`int`): length of the window in optimizer steps.
        decay_steps (`int`): steps over which lambda falls linearly to 0 after the window.
    """

    lambda_max: float
    expansion_steps: int
    decay_steps: int = 0

    def value(self, step: int) -> float:
        return _linear_decay(self.lambda_max, step, self.expansion_steps, self.decay_steps)

    def observe(self, step: int, distance: float, alignment: float) -> None:
        """The fixed schedule ignores the NTK signal."""

    @property
    def transition_step(self) -> int | None:
        return None


@dataclass
class NTKFeedbackController(_Serialisable):
    """Raise lambda while the NTK is lazy, anneal it once the kernel starts to move.

    Args:
        lambda_init (`float`): starting coefficient.
        lambda_cap (`float`): lambda is never raised above this.
        expansion_steps (`int`): the penalty is annealed after this step even without a transition.
        decay_steps (`int`): length of the linear anneal to 0.
        distance_threshold (`float`): kernel distance from init d_t that counts as "moved".
        alignment_threshold (`float`): gain in kernel-target alignment over its initial value that
            counts as "aligned".
        window (`int`): consecutive lazy measurements before lambda is raised once more.
        growth (`float`): multiplicative raise (>= 1).
    """

    lambda_init: float
    lambda_cap: float
    expansion_steps: int
    decay_steps: int = 0
    distance_threshold: float = 0.05
    alignment_threshold: float = 0.05
    window: int = 2
    growth: float = 1.5
    # mutable state
    current: float = math.nan
    initial_alignment: float | None = None
    lazy_streak: int = 0
    transition_step: int | None = None
    history: list = field(default_factory=list)

    def __post_init__(self):
        if math.isnan(self.current):
            self.current = self.lambda_init

    def value(self, step: int) -> float:
        anneal_from = self.expansion_steps if self.transition_step is None else self.transition_step
        return _linear_decay(self.current, step, anneal_from, self.decay_steps)

    def observe(self, step: int, distance: float, alignment: float) -> None:
        """Feed one NTK measurement (kernel distance from init, kernel-target alignment).

        A non-finite measurement (e.g. diverged weights) changes nothing: it is recorded, not acted on."""
        if not (math.isfinite(distance) and math.isfinite(alignment)):
            self.history.append({"step": step, "distance": distance, "alignment": alignment,
                                 "lambda": self.value(step), "skipped": True})
            return
        if self.initial_alignment is None:
            self.initial_alignment = alignment
        if self.transition_step is None and step < self.expansion_steps:
            moved = distance >= self.distance_threshold
            aligned = alignment - self.initial_alignment >= self.alignment_threshold
            if moved or aligned:
                self.transition_step = step
            else:
                self.lazy_streak += 1
                if self.lazy_streak >= self.window:
                    self.current = min(self.lambda_cap, self.current * self.growth)
                    self.lazy_streak = 0
        self.history.append({"step": step, "distance": distance, "alignment": alignment,
                             "lambda": self.value(step)})


def lazy_to_rich_step(ntk_history: list[dict], distance_threshold: float, alignment_threshold: float):
    """Step of the first NTK measurement whose distance from init >= `distance_threshold` or whose alignment
    gained >= `alignment_threshold` over its initial value: the `NTKFeedbackController`'s transition rule,
    applied to any recorded trajectory (`[{"step", "distance", "alignment"}, ...]`); `None` if it never moved."""
    if not ntk_history:
        return None
    a0 = ntk_history[0]["alignment"]
    return next((h["step"] for h in ntk_history if h["distance"] >= distance_threshold
                 or h["alignment"] - a0 >= alignment_threshold), None)


def build_controller(args, expansion_steps: int, decay_steps: int):
    """The controller named by `args.spectral_schedule` (a `SpectralVolumeConfig`), in optimizer steps."""
    if args.spectral_schedule == "fixed":
        return FixedSchedule(args.spectral_volume_coef, expansion_steps, decay_steps)
    if args.spectral_schedule == "ntk_feedback":
        cap = args.spectral_lambda_cap if args.spectral_lambda_cap is not None else 10 * args.spectral_volume_coef
        return NTKFeedbackController(
            lambda_init=args.spectral_volume_coef,
            lambda_cap=cap,
            expansion_steps=expansion_steps,
            decay_steps=decay_steps,
            distance_threshold=args.ntk_distance_threshold,
            alignment_threshold=args.ntk_alignment_threshold,
            window=args.ntk_window,
            growth=args.ntk_lambda_growth,
        )
    raise ValueError(
        f"Unknown spectral_schedule={args.spectral_schedule!r}: use 'fixed' or 'ntk_feedback'."
    )


def controller_from_state(state: dict):
    """Rebuild a controller from its `state_dict()` (used when resuming from a checkpoint)."""
    classes = {cls.__name__: cls for cls in (FixedSchedule, NTKFeedbackController)}
    if state.get("type") not in classes:
        raise ValueError(f"Unknown controller state type {state.get('type')!r} in the checkpoint.")
    return classes[state["type"]](**{k: v for k, v in state.items() if k != "type"})
