"""Command line interface: build a Boolean task, save it with its card, optionally tokenize and push.

Usage:

```bash
python -m data_builders majority --n 64 --k 3 --seed 0 --output-dir data/majority_n64_k3
python -m data_builders parity --n 20 --k 4 --train-size 50000 --output-dir data/parity --tokenize \
    --push-to-hub me/sparse-boolean
```

Every argument is validated before anything is written. The dataset is built in a temporary directory next
to `--output-dir` and renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import datasets

from .boolean import SPLITS, TIE_RULES, build_task, task_metadata, validate_task_args
from .card import dataset_card, push_dataset_to_hub
from .tokenization import build_bit_tokenizer, tokenize_for_causal_lm


def make_parser() -> argparse.ArgumentParser:
    """Parser with one sub-command per task (`majority`, `parity`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--n", type=int, required=True, help="number of input bits")
    common.add_argument("--k", type=int, required=True, help="support size, 1 <= k <= n")
    common.add_argument("--seed", type=int, default=0, help="fixes the support S and the strings")
    common.add_argument("--train-size", type=int, default=10_000)
    common.add_argument("--validation-size", type=int, default=1_000)
    common.add_argument("--test-size", type=int, default=1_000)
    common.add_argument(
        "--output-dir", required=True, help="where to save_to_disk the DatasetDict + README.md"
    )
    common.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    common.add_argument(
        "--tokenize", action="store_true", help="add input_ids/labels (bit tokenizer, saved in tokenizer/)"
    )
    common.add_argument("--push-to-hub", metavar="REPO_ID", help="also push to this Hub dataset repository")
    common.add_argument("--config-name", help="Hub config name (default: {task}_n{n}_k{k}[_tie-{tie}])")
    common.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser = argparse.ArgumentParser(prog="python -m data_builders", description=__doc__.split("\n")[0])
    tasks = parser.add_subparsers(dest="task", required=True)
    tie_help = "rule for sum = k/2 (required for even k): 'one' labels ties 1, 'drop' removes them"
    tasks.add_parser("majority", parents=[common]).add_argument("--tie", choices=TIE_RULES, help=tie_help)
    tasks.add_parser("parity", parents=[common])
    return parser


def _check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output-dir {path} exists and is not a directory; choose another path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"--output-dir {path} is not empty; pass --overwrite or choose another directory.")


def _write_atomically(path: Path, write) -> None:
    """Calls `write(tmp_dir)` on a fresh directory next to `path`, then renames it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = tmp.with_suffix(".old")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (argument errors exit with status 2)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    sizes = {name: getattr(args, f"{name}_size") for name in SPLITS}
    output_dir = Path(args.output_dir)
    try:
        validate_task_args(
            args.task, args.n, args.k, seed=args.seed, sizes=sizes, tie=getattr(args, "tie", None)
        )
        _check_output_dir(output_dir, args.overwrite)
    except ValueError as error:
        message = str(error)
        for name in SPLITS:  # speak the CLI's language: train_size -> --train-size
            message = message.replace(f"{name}_size", f"--{name}-size")
        parser.error(message)

    datasets.disable_progress_bars()
    kwargs = {f"{name}_size": size for name, size in sizes.items()}
    dataset = build_task(args.task, args.n, args.k, seed=args.seed, tie=getattr(args, "tie", None), **kwargs)
    tokenizer = None
    if args.tokenize:
        tokenizer = build_bit_tokenizer()
        dataset = tokenize_for_causal_lm(dataset, tokenizer, keep_text_columns=True)

    def write(directory: Path) -> None:
        dataset.save_to_disk(str(directory))
        dataset_card(dataset, config_name=args.config_name).save(directory / "README.md")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory / "tokenizer")

    _write_atomically(output_dir, write)
    meta = task_metadata(dataset)
    print(
        f"{args.task}: n={meta['n']} k={meta['k']} S={meta['support']} tie={meta['tie']} seed={meta['seed']}"
    )
    for name, split in dataset.items():
        ones = split.with_format("arrow")[:].column("label").to_numpy().mean() if len(split) else float("nan")
        print(f"  {name:<10} {len(split):>9} examples, fraction of label 1: {ones:.3f}")
    print(f"saved to {output_dir}")
    if args.push_to_hub:
        push_dataset_to_hub(
            dataset, args.push_to_hub, config_name=args.config_name, private=args.private, token=None
        )
        print(f"pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
