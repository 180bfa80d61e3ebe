"""Lambda schedules: closed forms, the NTK-feedback rules, JSON round trips."""

import json

import pytest

from hf_specvol.config import SpectralVolumeConfig
from hf_specvol.controller import (
    FixedSchedule,
    NTKFeedbackController,
    build_controller,
    controller_from_state,
    lazy_to_rich_step,
)


def test_fixed_schedule_window_then_linear_decay():
    schedule = FixedSchedule(lambda_max=0.5, expansion_steps=10, decay_steps=4)
    expected = [0.5] * 10 + [0.5, 0.375, 0.25, 0.125, 0.0, 0.0]
    assert [schedule.value(s) for s in range(16)] == pytest.approx(expected)
    assert FixedSchedule(0.5, 3, 0).value(3) == 0.0  # no decay: off right after the window
    schedule.observe(0, 1.0, 1.0)  # the NTK signal is ignored
    assert schedule.value(0) == 0.5 and schedule.transition_step is None


def test_feedback_raises_while_lazy_up_to_cap():
    c = NTKFeedbackController(lambda_init=0.1, lambda_cap=0.3, expansion_steps=1000, window=2, growth=2.0)
    for step in range(0, 100, 10):  # kernel never moves
        c.observe(step, distance=0.001, alignment=0.2)
    assert c.value(100) == pytest.approx(0.3)  # 0.1 -> 0.2 -> 0.3 (cap)
    assert c.transition_step is None


def test_feedback_anneals_after_transition():
    c = NTKFeedbackController(lambda_init=0.1, lambda_cap=1.0, expansion_steps=1000, decay_steps=10,
                              distance_threshold=0.05, alignment_threshold=0.05, window=1, growth=2.0)
    c.observe(0, 0.0, 0.20)    # lazy -> 0.2
    c.observe(10, 0.01, 0.21)  # lazy -> 0.4
    c.observe(20, 0.02, 0.30)  # alignment gained 0.10 >= 0.05: transition at 20
    assert c.transition_step == 20
    assert c.value(20) == pytest.approx(0.4)
    assert c.value(25) == pytest.approx(0.2)
    assert c.value(30) == 0.0
    c.observe(30, 0.5, 0.9)  # later measurements change nothing
    assert c.transition_step == 20 and c.value(40) == 0.0


def test_feedback_without_transition_anneals_at_window_end():
    c = NTKFeedbackController(lambda_init=0.1, lambda_cap=0.1, expansion_steps=50, decay_steps=0)
    c.observe(0, 0.0, 0.0)
    assert c.value(49) == pytest.approx(0.1) and c.value(50) == 0.0


@pytest.mark.parametrize("cls", ["fixed", "feedback"])
def test_state_round_trips_through_json(cls):
    if cls == "fixed":
        c = FixedSchedule(0.3, 5, 2)
    else:
        c = NTKFeedbackController(0.1, 1.0, 100, 5, window=1)
        for step, (d, a) in enumerate([(0.0, 0.1), (0.01, 0.1), (0.2, 0.3)]):
            c.observe(step * 10, d, a)
    restored = controller_from_state(json.loads(json.dumps(c.state_dict())))
    assert type(restored) is type(c) and restored.state_dict() == c.state_dict()
    assert [restored.value(s) for s in range(0, 120, 7)] == [c.value(s) for s in range(0, 120, 7)]


def test_build_controller_from_config(tmp_path):
    args = SpectralVolumeConfig(output_dir=str(tmp_path), spectral_volume_coef=0.2, spectral_schedule="ntk_feedback",
                                num_train_epochs=5)
    c = build_controller(args, expansion_steps=30, decay_steps=10)
    assert isinstance(c, NTKFeedbackController) and c.lambda_cap == pytest.approx(2.0) and c.value(0) == 0.2


def test_unknown_state_type_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown controller state"):
        controller_from_state({"type": "Nope"})


def test_lazy_to_rich_step_on_a_recorded_trajectory():
    history = [{"step": 0, "distance": 0.0, "alignment": 0.30}, {"step": 10, "distance": 0.01, "alignment": 0.33},
               {"step": 20, "distance": 0.02, "alignment": 0.36}, {"step": 30, "distance": 0.09, "alignment": 0.31}]
    assert lazy_to_rich_step(history, 0.05, 0.05) == 20  # alignment gained 0.06 at step 20
    assert lazy_to_rich_step(history, 0.05, 0.10) == 30  # then the distance 0.09 at step 30
    assert lazy_to_rich_step(history, 0.50, 0.50) is None
    assert lazy_to_rich_step([], 0.05, 0.05) is None


def test_feedback_ignores_non_finite_measurements():
    c = NTKFeedbackController(lambda_init=0.1, lambda_cap=1.0, expansion_steps=100, window=1, growth=2.0)
    c.observe(0, float("nan"), 0.1)
    c.observe(10, 0.0, float("inf"))
    assert c.value(20) == pytest.approx(0.1) and c.lazy_streak == 0 and c.transition_step is None
