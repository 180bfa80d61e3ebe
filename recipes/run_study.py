"""Run the study: methods x seeds x cells, then write summary.csv, report.md and plots.

Usage:

    python recipes/run_study.py --config recipes/configs/study_quick.yaml      # smoke test, ~1 minute
    python recipes/run_study.py --config recipes/configs/study_default.yaml    # the real study, ~35-60 min on 2 cores
    python recipes/run_study.py --config recipes/configs/study_gpu.yaml --workers 8
    python recipes/run_study.py --config recipes/configs/study_default.yaml --report_only

A rerun skips the finished runs (resumable: interrupt it at any time and start it again) and retries the
failed ones. `--output_dir` and `--workers` override the YAML. `python -m hf_specvol.report DIR` redraws
the report of a finished study.
"""

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hf_specvol.report import write_report  # noqa: E402
from hf_specvol.study import StudyConfig, load_records, run_study  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="study YAML (recipes/configs/study_*.yaml)")
    parser.add_argument("--output_dir", default=None, help="override the YAML's output_dir")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (OMP_NUM_THREADS=1 each)")
    parser.add_argument("--report_only", action="store_true", help="only rewrite the report of finished runs")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = StudyConfig.from_yaml(args.config, output_dir=args.output_dir, workers=args.workers)
    start = time.time()
    if args.report_only:
        wanted = {r["run_id"] for r in config.runs()}
        records = [r for r in load_records(config.output_dir) if r["run_id"] in wanted]
    else:
        records = run_study(config)
    summary = write_report(records, config.output_dir, config)
    failed = sum(r["status"] != "ok" for r in records)
    print(f"\n{len(records)} runs ({failed} failed) in {time.time() - start:.0f} s; report: "
          f"{os.path.join(config.output_dir, 'report.md')}")
    for row in summary["rows"]:
        std = row["test_acc_std"] if row["test_acc_std"] is not None else float("nan")
        mean = row["test_acc_mean"] if row["test_acc_mean"] is not None else float("nan")
        print(f"  {row['cell']:<28} {row['method']:<18} test acc {mean:.3f} ± {std:.3f}  "
              f"solved {row['solved_frac'] or 0:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
