"""(3) NTK tracking: one measurement on the default model, its amortized cost, and its memory on GPT-2 small.

* Time of one `empirical_ntk` (P = 64 probes drawn from the validation split like the tracker does) and of
  one layer-wise rank measurement (`layer_statistics`) on the default recipe model, interleaved.
* Amortized overhead at the default intervals (the recipe's 75 steps, and `SpectralVolumeConfig`'s own
  default): (NTK + ranks) / (interval x step time + both), with the step time of the penalty-on trainer from
  bench_trainer_step when given, and the same for the whole default job, which also measures at init, at
  the epoch-10 snapshot, at the end, and ranks at every epoch end.
* Peak memory of one NTK measurement on GPT-2 small (`AutoConfig.for_model("gpt2")`, 124M parameters) with
  the default blocking and chunking, in a fresh process: resident memory sampled every 5 ms, minus the
  resident memory before the measurement (model and inputs built). A full measurement with P = 64 needs one
  forward+backward per probe and block (about 124 blocks of 1M parameters): over an hour on 2 cores. The
  benchmark therefore runs a subset of blocks, the first (a slice of the 38.6M-parameter tied embedding, the
  most memory-hungry: dense per-example embedding gradients) and the first block of the first transformer
  layer's fused QKV matrix, and
  extrapolates the time. Blocks run one after another and free their Jacobian before the next starts, so
  the peak over these blocks is the peak of a whole measurement.
"""

from __future__ import annotations

import json
import time

from timing import compare, run_python

_MEMORY_SCRIPT = r"""
import json, os, threading, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from hf_specvol import ntk

P, T, BLOCKS = {probes}, {tokens}, {blocks}
MAX_BLOCK_MB, CHUNK = {max_block_mb}, {chunk}

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2"))
ids = torch.randint(0, model.config.vocab_size, (P, T), generator=torch.Generator().manual_seed(1))
plan = ntk._plan_blocks
picked = {{}}

def subset(params, cap):
    blocks = plan(params, cap)
    first_layer = next(i for i, b in enumerate(blocks) if any(".h.0.attn.c_attn" in name for name, _, _ in b))
    chosen = [0, first_layer][:BLOCKS]
    picked.update(total=len(blocks), chosen=chosen,
                  sizes=[sum(b - a for _, a, b in blocks[i]) for i in chosen])
    return [blocks[i] for i in chosen]

ntk._plan_blocks = subset
peak, stop = [0], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)
base = rss()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
kernel = ntk.empirical_ntk(model, {{"input_ids": ids}}, answer_ids=(15, 16),
                           max_block_bytes=int(MAX_BLOCK_MB * 2**20), example_chunk_size=CHUNK)
elapsed = time.perf_counter() - start
stop.set(); thread.join()
assert torch.isfinite(kernel).all()
params = sum(p.numel() for p in model.parameters())
print(json.dumps({{"parameters": params, "probes": P, "tokens": T, "blocks_total": picked["total"],
                  "blocks_measured": picked["chosen"], "block_sizes": picked["sizes"],
                  "baseline_rss_mib": base / 2**20, "peak_rss_mib": peak[0] / 2**20,
                  "ntk_extra_peak_mib": (peak[0] - base) / 2**20,
                  "dense_jacobian_mib": P * params * 4 / 2**20,
                  "seconds_measured": elapsed,
                  "seconds_per_block": elapsed / len(picked["chosen"]),
                  "seconds_full_extrapolated": elapsed / len(picked["chosen"]) * picked["total"]}}))
"""


def gpt2_small_memory(probes: int = 64, tokens: int = 22, blocks: int = 2, cap_gib: float = 2.0) -> dict:
    """Peak extra memory of one NTK measurement on GPT-2 small, in a fresh process (see module docstring)."""
    from hf_specvol.config import SpectralVolumeConfig

    defaults = SpectralVolumeConfig(output_dir="unused", report_to="none")
    script = _MEMORY_SCRIPT.format(probes=probes, tokens=tokens, blocks=blocks,
                                   max_block_mb=defaults.ntk_max_block_mb, chunk=defaults.ntk_example_chunk_size)
    result = run_python(script, env={"OMP_NUM_THREADS": str(__import__("torch").get_num_threads())})
    result.update(cap_mib=cap_gib * 1024, under_cap=result["ntk_extra_peak_mib"] <= cap_gib * 1024,
                  ntk_max_block_mb=defaults.ntk_max_block_mb, ntk_example_chunk_size=defaults.ntk_example_chunk_size)
    return result


def default_model_times(repeats: int) -> dict:
    """One NTK measurement and one rank measurement on the default recipe model, interleaved."""
    from bench_trainer_step import build_model, default_recipe

    from hf_specvol.ntk import empirical_ntk
    from hf_specvol.spectral import layer_statistics, weight_matrices
    from hf_specvol.trainer import build_probe

    _, _, training_args, data, _, answer_ids = default_recipe()
    model = build_model()
    probe = build_probe(model, data["validation"], training_args.ntk_probe_size, training_args.seed, answer_ids)
    kwargs = dict(answer_position=probe.answer_position, answer_ids=answer_ids,
                  max_block_bytes=int(training_args.ntk_max_block_mb * 2**20),
                  example_chunk_size=training_args.ntk_example_chunk_size)
    cpu = {"ntk": [], "ranks": []}

    def timed(name, fn):
        def run():
            start = time.process_time()
            fn()
            cpu[name].append(time.process_time() - start)
        return run

    wall = compare({
        "ntk": timed("ntk", lambda: empirical_ntk(model, probe.inputs, **kwargs)),
        "ranks": timed("ranks", lambda: layer_statistics(weight_matrices(model))),
    }, repeats=repeats, warmup=1)
    cpu = {k: sorted(v[-repeats:])[len(v[-repeats:]) // 2] for k, v in cpu.items()}
    return {"probes": len(probe.labels), "wall": {k: v["median_s"] for k, v in wall.items()}, "cpu": cpu,
            "ntk_interval_steps": training_args.ntk_interval_steps,
            "rank_interval_steps": training_args.rank_interval_steps}


def amortized(times: dict, step_s: float, interval: int, rank_interval: int, steps_per_epoch: int,
              epochs: int, snapshot_epochs: int = 1) -> dict:
    """Tracker share of training time: per interval, and over the whole default job."""
    per_interval = times["ntk"] + times["ranks"] * interval / max(rank_interval, 1)
    total_steps = steps_per_epoch * epochs
    ntk_count = total_steps // interval + 2 + snapshot_epochs  # intervals, init, end, snapshot(s)
    rank_count = total_steps // rank_interval + 2 + epochs  # intervals, init, end, every epoch end
    job_tracker = ntk_count * times["ntk"] + rank_count * times["ranks"]
    return {
        "per_interval_fraction": per_interval / (per_interval + interval * step_s),
        "default_job_fraction": job_tracker / (job_tracker + total_steps * step_s),
        "default_job_ntk_measurements": ntk_count, "default_job_rank_measurements": rank_count,
        "step_s": step_s,
    }


def run(quick: bool = False, step_times: dict | None = None, cap_gib: float = 2.0,
        skip_gpt2: bool = False) -> dict:
    from bench_trainer_step import default_recipe

    _, _, training_args, data, *_ = default_recipe()
    times = default_model_times(repeats=5 if quick else 15)
    result = {"default_model": times, "target_fraction": 0.05}
    if step_times is not None:
        from hf_specvol.config import SpectralVolumeConfig

        library = SpectralVolumeConfig(output_dir="unused", report_to="none")
        result["library_default_intervals"] = {"ntk": library.ntk_interval_steps, "rank": library.rank_interval_steps}
        steps_per_epoch = -(-len(data["train"]) // training_args.per_device_train_batch_size)
        for clock in ("wall", "cpu"):
            step_s = step_times[clock]["steps"]["penalty"]["median_s"]
            for label, ntk_every, rank_every in (
                ("", times["ntk_interval_steps"], times["rank_interval_steps"]),
                ("_library_default", library.ntk_interval_steps, library.rank_interval_steps),
            ):
                result[f"amortized_{clock}{label}"] = amortized(
                    times[clock], step_s, ntk_every, rank_every, steps_per_epoch,
                    int(training_args.num_train_epochs), len(training_args.rank_snapshot_epochs))
    if not skip_gpt2:
        result["gpt2_small_memory"] = gpt2_small_memory(probes=16 if quick else 64, blocks=1 if quick else 2,
                                                        cap_gib=cap_gib)
    return result


if __name__ == "__main__":
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
