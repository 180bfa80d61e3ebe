"""Weight-sharding setups (FSDP, DeepSpeed ZeRO-3) are refused with an error that names the supported ones.

The penalty and the tracker need whole matrices; under FSDP / ZeRO-3 each process holds shards. Neither
backend runs on this CPU-only CI (FSDP needs real devices, DeepSpeed is not installed), so the
accelerator state is stood in for: `weight_sharding` reads only `accelerator.state`.
"""

from types import SimpleNamespace

import pytest

import hf_specvol.trainer as trainer_module
from hf_specvol import SpectralVolumeConfig, SpectralVolumeTrainer
from hf_specvol.trainer import weight_sharding


def _accelerator(fsdp=None, zero_stage=None):
    deepspeed = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed))


@pytest.mark.parametrize("accelerator, expected", [
    (_accelerator(), None),                          # one process or DDP
    (_accelerator(zero_stage=1), None),              # ZeRO-1/2 keep whole weights
    (_accelerator(zero_stage=2), None),
    (_accelerator(zero_stage=3), "DeepSpeed ZeRO-3"),
    (_accelerator(fsdp=object()), "FSDP"),
], ids=["plain", "zero1", "zero2", "zero3", "fsdp"])
def test_weight_sharding_detection(accelerator, expected):
    assert weight_sharding(accelerator) == expected


@pytest.mark.parametrize("setup", ["FSDP", "DeepSpeed ZeRO-3"])
def test_trainer_refuses_sharded_weights_unless_penalty_and_tracker_are_off(tmp_path, make_tiny_gpt2, monkeypatch,
                                                                              setup):
    monkeypatch.setattr(trainer_module, "weight_sharding", lambda accelerator: setup)
    args = SpectralVolumeConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=rf"{setup} shards .*Supported setups: one process .*DDP .*ZeRO-1/2"):
        SpectralVolumeTrainer(model=make_tiny_gpt2(), args=args)
    plain = SpectralVolumeConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, spectral_volume_coef=0.0,
                                 track_ranks=False)
    SpectralVolumeTrainer(model=make_tiny_gpt2(), args=plain)  # plain training stays possible
