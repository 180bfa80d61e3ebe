"""Run every benchmark, print a results table and write a JSON of everything measured.

Usage:

    .venv/bin/python benchmarks/run_all.py                 # all five, ~4-5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/run_all.py --quick         # fewer repetitions, smaller GPT-2-small NTK, ~2 minutes
    .venv/bin/python benchmarks/run_all.py --only penalty ntk --threads 1 --out /tmp/bench.json

Not part of the test suite (pytest never collects this directory). See docs/benchmarks.md for the numbers
and what bounds them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import machine, repo_root  # noqa: E402

BENCHMARKS = ("trainer_step", "penalty", "ntk", "data", "main_job")


def _row(item, measured, target, ok, note=""):
    mark = "" if ok is None else ("yes" if ok else "NO")
    return f"| {item} | {measured} | {target} | {mark} | {note} |"


def table(results: dict) -> str:
    """Markdown table of the headline numbers."""
    rows = ["| item | measured | target | met | note |", "|---|---|---|---|---|"]
    step = results.get("trainer_step")
    if step:
        for clock in ("cpu", "wall"):
            a = step["alternating"][clock]
            rows.append(_row(f"(1) penalty step / plain step, penalty on every other step of a run ({clock})",
                             f"{a['penalty_over_plain']:.3f} ({a['on_median_s'] * 1e3:.1f} / "
                             f"{a['off_median_s'] * 1e3:.1f} ms)", "<= 1.10", a["penalty_over_plain"] <= 1.10,
                             "median over runs: " + ", ".join(f"{r:.3f}" for r in a["per_run"])))
        for clock in ("cpu", "wall"):
            s = step[clock]
            rows.append(_row(f"(1) penalty step / plain step, tracker off ({clock}; medians, paired by round)",
                             f"{s['penalty_over_plain']:.3f} ({s['steps']['penalty']['median_s'] * 1e3:.1f} / "
                             f"{s['steps']['plain']['median_s'] * 1e3:.1f} ms)", "<= 1.10",
                             s["penalty_over_plain"] <= 1.10))
            rows.append(_row(f"(1) penalty + default tracker / plain ({clock}; means, paired by round)",
                             f"{s['tracked_over_plain_mean']:.3f}", "", None,
                             f"{step['steps_per_round']}-step rounds; tracker "
                             f"{100 * s['tracker_share_at_measurement_steps']:.1f}% of training time at its "
                             "measurement steps"))
    pen = results.get("penalty")
    if pen:
        t = pen["times"]
        rows.append(_row("(2) penalty fwd+bwd / GPT-2 small fwd+bwd (4 x 128)",
                         f"{pen['penalty_over_model']:.3f} ({t['penalty']['median_s']:.2f} / "
                         f"{t['model']['median_s']:.2f} s)", "<= 0.15", pen["penalty_over_model"] <= 0.15,
                         f"multiply-adds: 2 Gram products = {pen['macs']['gram_products_over_model']:.2f} x model"))
        if "gram_products_over_model" in pen:
            rows.append(_row("(2) the two Gram products alone / model", f"{pen['gram_products_over_model']:.3f}",
                             "", None, "arithmetic floor of an exact penalty"))
            rows.append(_row("(2) autograd through the same formula / model",
                             f"{pen['autograd_reference_over_model']:.3f}", "", None, "previous implementation"))
    ntk = results.get("ntk")
    if ntk:
        d = ntk["default_model"]
        rows.append(_row(f"(3) one NTK measurement, P = {d['probes']}, default model",
                         f"{d['wall']['ntk'] * 1e3:.0f} ms wall, {d['cpu']['ntk'] * 1e3:.0f} ms CPU", "", None,
                         f"ranks: {d['cpu']['ranks'] * 1e3:.1f} ms CPU"))
        for clock in ("cpu", "wall"):
            for label, interval in (("", d["ntk_interval_steps"]),
                                    ("_library_default", ntk.get("library_default_intervals", {}).get("ntk"))):
                a = ntk.get(f"amortized_{clock}{label}")
                if a:
                    where = "recipe" if not label else "library default"
                    rows.append(_row(f"(3) tracker share, NTK every {interval} steps ({where}, {clock})",
                                     f"{100 * a['per_interval_fraction']:.1f}%", "<= 5%",
                                     a["per_interval_fraction"] <= 0.05,
                                     f"whole default job: {100 * a['default_job_fraction']:.1f}% "
                                     f"({a['default_job_ntk_measurements']} NTK measurements)"))
        g = ntk.get("gpt2_small_memory")
        if g:
            rows.append(_row(f"(3) NTK extra peak RSS, GPT-2 small, P = {g['probes']}, {g['tokens']} tokens",
                             f"{g['ntk_extra_peak_mib']:.0f} MiB", f"<= {g['cap_mib']:.0f} MiB", g["under_cap"],
                             f"dense J would be {g['dense_jacobian_mib'] / 1024:.0f} GiB; "
                             f"{g['seconds_per_block']:.0f} s/block x {g['blocks_total']} blocks = "
                             f"{g['seconds_full_extrapolated'] / 3600:.1f} h"))
    data = results.get("data")
    if data:
        rows.append(_row(f"(4) majority(n={data['n']}) raw examples/s", f"{data['majority_examples_per_s']:.3g}",
                         ">= 1e6", data["majority_examples_per_s"] >= 1e6,
                         f"parity {data['parity_examples_per_s']:.3g}/s"))
        rows.append(_row("(4) build + tokenize 100k examples", f"{data['build_and_tokenize_100k_s']:.2f} s",
                         "<= 5 s", data["build_and_tokenize_100k_s"] <= 5.0))
    job = results.get("main_job")
    if job:
        rows.append(_row(f"(5) peak RSS of the default main job ({job['epochs']} epochs)",
                         f"{job['peak_rss_mib']:.0f} MiB", "", None, f"wall {job['wall_s']:.0f} s"))
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller GPT-2-small NTK.")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default).")
    parser.add_argument("--ntk-memory-cap-gib", type=float, default=2.0, help="cap for the GPT-2-small NTK memory.")
    parser.add_argument("--skip-gpt2-ntk", action="store_true", help="skip the GPT-2-small NTK memory run.")
    parser.add_argument("--out", default=os.path.join(repo_root(), "benchmarks", "results", "latest.json"))
    args = parser.parse_args(argv)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the subprocesses
    results: dict = {"machine": machine(), "quick": args.quick, "command": " ".join(sys.argv)}
    started = time.perf_counter()
    for name in BENCHMARKS:
        if name not in args.only:
            continue
        print(f"--- {name}", flush=True)
        t0 = time.perf_counter()
        if name == "trainer_step":
            import bench_trainer_step as bench

            results[name] = bench.run(args.quick)
        elif name == "penalty":
            import bench_penalty as bench

            results[name] = bench.run(args.quick)
        elif name == "ntk":
            import bench_ntk as bench

            results[name] = bench.run(args.quick, step_times=results.get("trainer_step"),
                                      cap_gib=args.ntk_memory_cap_gib, skip_gpt2=args.skip_gpt2_ntk)
        elif name == "data":
            import bench_data as bench

            results[name] = bench.run(args.quick)
        else:
            import bench_main_job as bench

            results[name] = bench.run(args.quick)
        results[name]["benchmark_s"] = time.perf_counter() - t0
        print(f"    done in {results[name]['benchmark_s']:.0f} s", flush=True)
    results["total_s"] = time.perf_counter() - started
    results["machine_after"] = {"loadavg_1_5_15": machine()["loadavg_1_5_15"]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['nproc']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
          f"load average {m['loadavg_1_5_15']}; total {results['total_s']:.0f} s\n")
    print(table(results))
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
