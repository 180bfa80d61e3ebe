"""Train a causal LM on k-sparse majority with the spectral volume penalty and rank/NTK tracking.

Usage:

    accelerate launch recipes/train_majority.py                      # defaults: configs/majority_default.yaml
    accelerate launch recipes/train_majority.py --n_bits 32 --k 9 --spectral_volume_coef 0.2 \
        --output_dir outputs/maj32
    accelerate launch recipes/train_majority.py --config my_recipe.yaml --seed 3
    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml recipes/train_majority.py

Every field of BooleanTaskArguments, ModelArguments and SpectralVolumeConfig is a flag (see --help);
`--config` gives YAML defaults (default: configs/<task>_default.yaml) and the command line wins.
"""

import os
import sys

from hf_specvol.cli import RecipeParser
from hf_specvol.config import SpectralVolumeConfig
from hf_specvol.models import ModelArguments
from hf_specvol.pipeline import BooleanTaskArguments, format_report, train_boolean_task

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def make_parser(task: str) -> RecipeParser:
    parser = RecipeParser((BooleanTaskArguments, ModelArguments, SpectralVolumeConfig))
    parser.set_defaults(task=task)
    return parser


def main(task_args, model_args, training_args):
    results = train_boolean_task(task_args, model_args, training_args,
                                 resume_from_checkpoint=training_args.resume_from_checkpoint)
    if training_args.process_index == 0:
        print("\n" + format_report(results))
        print(f"\nEverything is in {os.path.abspath(training_args.output_dir)}")


def run(task: str, argv: list[str]) -> None:
    if "--config" not in argv:
        argv = ["--config", os.path.join(CONFIG_DIR, f"{task}_default.yaml"), *argv]
    main(*make_parser(task).parse_args_and_config(argv))


if __name__ == "__main__":
    run("majority", sys.argv[1:])
