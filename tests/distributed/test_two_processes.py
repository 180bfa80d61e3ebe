"""Two real DDP processes on CPU give the run of one process with the same global batch.

The recipe is launched as users launch it (`accelerate launch --config_file
recipes/accelerate_configs/cpu_2proc.yaml recipes/train_majority.py ...`) through `audited_recipe.py`,
which records each rank's file writes and its view of the run. Oracle: the same recipe in one plain
process with twice the per-device batch. On rank 1 the empirical NTK is replaced by a random kernel
(`AUDIT_SCRAMBLE_NTK=1`): the numbers on both ranks can only agree if rank 0's kernel is broadcast.
"""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AUDIT = os.path.join(ROOT, "tests", "distributed", "audited_recipe.py")
RECIPE = os.path.join(ROOT, "recipes", "train_majority.py")
CPU_2PROC = os.path.join(ROOT, "recipes", "accelerate_configs", "cpu_2proc.yaml")
# 96 examples, global batch 16: 6 steps per epoch, 12 in all; NTK every 2 steps drives lambda (ntk_feedback).
# SGD keeps float32 round-off from being amplified the way Adam's g / sqrt(v) does for near-zero gradients, and
# spectral_eps=1e-2 keeps logdet(R + eps I) well conditioned: with eps=1e-4 the float32 penalty of the nearly
# collinear 16 x 16 attention projection differs by ~4e-6 between two summation orders of the same gradients.
TINY = ["--n_bits", "7", "--k", "3", "--train_size", "96", "--validation_size", "16", "--test_size", "16",
        "--hidden_size", "16", "--num_layers", "1", "--num_heads", "2", "--model_dropout", "0",
        "--num_train_epochs", "2", "--optim", "sgd", "--learning_rate", "0.05", "--warmup_steps", "0",
        "--spectral_schedule", "ntk_feedback", "--spectral_expansion_epochs", "1", "--ntk_window", "1",
        "--ntk_distance_threshold", "1e-3", "--spectral_eps", "1e-2", "--ntk_probe_size", "8",
        "--ntk_interval_steps", "2", "--rank_interval_steps", "2", "--rank_snapshot_epochs", "2",
        "--logging_steps", "1", "--eval_strategy", "no", "--disable_tqdm", "true",
        "--ddp_find_unused_parameters", "false"]
OUTPUTS = {"README.md", "config.json", "generation_config.json", "model.safetensors", "rank_report.json",
           "results.json", "tokenizer.json", "tokenizer_config.json", "tracking_history.json", "training_args.bin"}

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")]


def _env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT, **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    return env


def _run(cmd, **env):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    _run([sys.executable, AUDIT, str(tmp / "audit1"), RECIPE, *TINY, "--per_device_train_batch_size", "16",
          "--output_dir", str(tmp / "one")])
    launch = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC,
                   "--main_process_port", "0", AUDIT, str(tmp / "audit2"), RECIPE, *TINY,
                   "--per_device_train_batch_size", "8", "--output_dir", str(tmp / "two")], AUDIT_SCRAMBLE_NTK="1")

    def load(name):
        return torch.load(tmp / name, weights_only=False)

    return {"tmp": tmp, "stdout": launch.stdout, "one": load("audit1/rank0.pt"),
            "rank0": load("audit2/rank0.pt"), "rank1": load("audit2/rank1.pt")}


def _losses(record):
    return [h["loss"] for h in record["log_history"] if "loss" in h]


def test_two_real_processes_joined_one_group(runs):
    assert runs["one"]["world_size"] == 1
    assert runs["rank0"]["world_size"] == runs["rank1"]["world_size"] == 2
    assert runs["one"]["global_step"] == runs["rank0"]["global_step"] == runs["rank1"]["global_step"] == 12
    assert runs["stdout"].count("test accuracy") == 1  # one report, from the main process


def test_same_final_parameters_and_losses_as_one_process(runs):
    one, two = runs["one"], runs["rank0"]
    assert one["params"].keys() == two["params"].keys()
    worst = max((one["params"][k] - two["params"][k]).abs().max().item() for k in one["params"])
    assert worst < 1e-5, f"max parameter deviation {worst}"
    for k, v in two["params"].items():  # DDP keeps the replicas identical
        assert torch.equal(v, runs["rank1"]["params"][k]), k
    assert len(_losses(one)) == 12
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)


def test_same_lambda_and_ntk_on_both_ranks_and_as_one_process(runs):
    one, r0, r1 = runs["one"], runs["rank0"], runs["rank1"]
    # rank 1 computed random kernels: its numbers are rank 0's only because the callback broadcasts them
    assert r1["ntk_history"] == r0["ntk_history"]
    assert r1["lambda_history"] == r0["lambda_history"]
    assert r1["controller"] == r0["controller"]
    # the controller did react to the NTK: lambda was raised while the kernel was lazy
    assert max(v for _, v in r0["lambda_history"]) > 0.1 * 1.5**2 - 1e-12
    assert [s for s, _ in r0["lambda_history"]] == list(range(1, 13))
    assert [v for _, v in r0["lambda_history"]] == pytest.approx([v for _, v in one["lambda_history"]], abs=1e-12)
    assert [r["step"] for r in r0["ntk_history"]] == [r["step"] for r in one["ntk_history"]] == list(range(0, 13, 2))
    for a, b in zip(one["ntk_history"], r0["ntk_history"]):
        # the parameters differ by float32 round-off (~1e-7), so do the kernels
        assert b["erank"] == pytest.approx(a["erank"], rel=1e-6), a["step"]
        assert b["alignment"] == pytest.approx(a["alignment"], rel=1e-3, abs=1e-7), a["step"]  # KTA is in [-1, 1]
        assert b["distance"] == pytest.approx(a["distance"], rel=1e-3, abs=1e-9), a["step"]
    # layer-wise ranks are measured on each rank's (identical) replica
    for a, b in zip(r0["rank_history"], r1["rank_history"]):
        assert a["layers"] == b["layers"]


def test_only_the_main_process_writes(runs):
    assert runs["rank1"]["writes"] == []
    written = {os.path.basename(p) for _, p in runs["rank0"]["writes"]}
    assert {"rank_report.json.tmp", "tracking_history.json.tmp", "results.json.tmp", "README.md"} <= written
    one_files = {p.name for p in (runs["tmp"] / "one").iterdir()}
    two_files = {p.name for p in (runs["tmp"] / "two").iterdir()}
    assert one_files == two_files == OUTPUTS
