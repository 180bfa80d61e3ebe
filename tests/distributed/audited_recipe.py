"""Run a recipe exactly as a user would, and record what this process did.

Usage (what tests/distributed/test_two_processes.py launches):

    accelerate launch ... tests/distributed/audited_recipe.py AUDIT_DIR recipes/train_majority.py [recipe flags]
    python tests/distributed/audited_recipe.py AUDIT_DIR recipes/train_majority.py [recipe flags]

The recipe runs unchanged through `runpy`. Around it this script
  * records every file this process creates, writes, renames or deletes under the recipe's `--output_dir`
    (Python's audit hooks: `open` in a writing mode, `os.rename`/`os.replace`, `os.remove`, `os.mkdir`);
  * keeps the `SpectralVolumeTrainer` the recipe builds and, at the end, dumps this rank's view of the run
    (tracker histories, controller state, log history, final parameters) to `AUDIT_DIR/rank<RANK>.pt`.
With `AUDIT_SCRAMBLE_NTK=1`, ranks other than 0 compute a random kernel instead of the empirical NTK, so a
missing broadcast of rank 0's kernel shows up as different NTK numbers and lambda trajectories per rank.
Only the audit file lies outside the output directory; writes there are not recorded.
"""

import os
import runpy
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def main() -> None:
    audit_dir, script, *recipe_args = sys.argv[1:]
    output_dir = os.path.abspath(recipe_args[recipe_args.index("--output_dir") + 1])
    rank = int(os.environ.get("RANK", "0"))
    writes: list[tuple[str, str]] = []

    def under_output(path) -> str | None:
        if isinstance(path, int) or path is None:
            return None
        path = os.path.abspath(os.fsdecode(path))
        return path if path == output_dir or path.startswith(output_dir + os.sep) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if writing and (p := under_output(path)):
                writes.append(("open", p))
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree") and (
                p := under_output(args[0])):
            writes.append((event, p))

    sys.addaudithook(hook)

    import torch

    import hf_specvol.callbacks as callbacks_module
    from hf_specvol.trainer import SpectralVolumeTrainer

    trainers = []
    original_train = SpectralVolumeTrainer.train

    def train(self, *args, **kwargs):
        trainers.append(self)
        return original_train(self, *args, **kwargs)

    SpectralVolumeTrainer.train = train
    if os.environ.get("AUDIT_SCRAMBLE_NTK") == "1" and rank != 0:
        def scrambled_ntk(model, inputs, **kwargs):
            size = next(iter(inputs.values())).shape[0]
            a = torch.randn(size, size, dtype=torch.float64)
            return a @ a.T

        callbacks_module.empirical_ntk = scrambled_ntk

    sys.argv = [script, *recipe_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")

    trainer = trainers[-1]
    tracker = trainer.tracker
    model = trainer.accelerator.unwrap_model(trainer.model)
    os.makedirs(audit_dir, exist_ok=True)
    torch.save({
        "rank": rank,
        "world_size": trainer.args.world_size,
        "writes": writes,
        "ntk_history": tracker.ntk_history,
        "rank_history": tracker.rank_history,
        "lambda_history": tracker.lambda_history,
        "controller": tracker.controller.state_dict(),
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "params": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }, os.path.join(audit_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
