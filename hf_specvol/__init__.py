"""hf_specvol: spectral volume regularization, rank and NTK tracking for the Hugging Face Trainer."""

from .callbacks import ProbeSet, RankTrackingCallback
from .config import SpectralVolumeConfig
from .controller import FixedSchedule, NTKFeedbackController
from .metrics import AnswerAccuracy, AnswerTokenMetrics
from .ntk import empirical_ntk, kernel_distance, kernel_target_alignment, ntk_statistics
from .spectral import effective_rank, log_volume, spectral_penalty, stable_rank, weight_matrices
from .trainer import SpectralVolumeTrainer

__version__ = "0.1.0"

__all__ = [
    "AnswerAccuracy",
    "AnswerTokenMetrics",
    "FixedSchedule",
    "NTKFeedbackController",
    "ProbeSet",
    "RankTrackingCallback",
    "SpectralVolumeConfig",
    "SpectralVolumeTrainer",
    "effective_rank",
    "empirical_ntk",
    "kernel_distance",
    "kernel_target_alignment",
    "log_volume",
    "ntk_statistics",
    "spectral_penalty",
    "stable_rank",
    "weight_matrices",
]
