"""hf_specvol: spectral volume regularization, rank and NTK tracking for the Hugging Face Trainer."""

from .callbacks import ProbeSet, RankTrackingCallback
from .config import SpectralVolumeConfig
from .controller import FixedSchedule, NTKFeedbackController
from .metrics import AnswerAccuracy, AnswerTokenMetrics
from .modeling_mlp import BooleanMLPConfig, BooleanMLPForClassification
from .muparam import apply_mup, coord_check, mup_param_groups
from .ntk import empirical_ntk, kernel_distance, kernel_target_alignment, ntk_statistics
from .spectral import effective_rank, log_volume, spectral_penalty, stable_rank, weight_matrices
from .study import StudyConfig, run_study
from .trainer import SpectralVolumeTrainer

__version__ = "0.1.0"


def __getattr__(name):
    # imported on first use, so that `python -m hf_specvol.report` does not find its module pre-imported
    if name == "write_report":
        from .report import write_report

        return write_report
    raise AttributeError(f"module 'hf_specvol' has no attribute {name!r}")


__all__ = [
    "AnswerAccuracy",
    "AnswerTokenMetrics",
    "BooleanMLPConfig",
    "BooleanMLPForClassification",
    "FixedSchedule",
    "NTKFeedbackController",
    "ProbeSet",
    "RankTrackingCallback",
    "SpectralVolumeConfig",
    "SpectralVolumeTrainer",
    "StudyConfig",
    "apply_mup",
    "coord_check",
    "effective_rank",
    "empirical_ntk",
    "kernel_distance",
    "kernel_target_alignment",
    "log_volume",
    "mup_param_groups",
    "ntk_statistics",
    "run_study",
    "spectral_penalty",
    "stable_rank",
    "weight_matrices",
    "write_report",
]
