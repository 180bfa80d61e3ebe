"""(5) Peak resident memory of the default main job (`make run`).

Runs the same command as `make run` (`accelerate launch --num_processes 1 ... recipes/train_majority.py`
with the recipe's defaults) under a small wrapper process whose only child is the launcher, so that
`getrusage(RUSAGE_CHILDREN).ru_maxrss` is the peak RSS of the largest process of the job (the training
process). Outputs go to a temporary directory. `--quick` trains 2 epochs instead of 12.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from timing import repo_root, run_python

_WRAPPER = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run({command!r}, capture_output=True, text=True)
elapsed = time.perf_counter() - start
if proc.returncode != 0:
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    sys.exit(proc.returncode)
print(json.dumps({{"peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "wall_s": elapsed, "report_tail": proc.stdout.strip().splitlines()[-12:]}}))
"""


def run(quick: bool = False) -> dict:
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    with tempfile.TemporaryDirectory() as out:
        command = [launcher, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", os.path.join(repo_root(), "recipes", "train_majority.py"),
                   "--output_dir", out]
        if quick:
            command += ["--num_train_epochs", "2", "--spectral_expansion_epochs", "1", "--rank_snapshot_epochs", "2"]
        result = run_python(_WRAPPER.format(command=command), timeout=3600)
    result["command"] = "make run" if not quick else "make run ARGS='--num_train_epochs 2 ...' (quick)"
    result["epochs"] = 2 if quick else 12
    return result


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
