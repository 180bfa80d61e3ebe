"""Argument parsing for the recipes: dataclasses from the command line with YAML defaults.

Rules: `--config recipe.yaml` supplies defaults; anything given on the command line wins; a key
that no dataclass knows, in the YAML or on the command line, is an error that names it; an invalid
value is reported as one `error:` line (exit status 2) before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml
from transformers import HfArgumentParser


class RecipeParser(HfArgumentParser):
    """`HfArgumentParser` that also reads `--config FILE.yaml`.

    Example:
        ```python
        parser = RecipeParser((BooleanTaskArguments, ModelArguments, SpectralVolumeConfig))
        task_args, model_args, training_args = parser.parse_args_and_config()
        ```
    """

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self.add_argument("--config", type=str, default=None, help="YAML file with default values for any field.")

    def known_fields(self) -> set[str]:
        return {f.name for dtype in self.dataclass_types for f in dataclasses.fields(dtype) if f.init}

    def parse_args_and_config(self, args: list[str] | None = None) -> tuple:
        args = list(sys.argv[1:] if args is None else args)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        config_path = pre.parse_known_args(args)[0].config
        if config_path is not None:
            self.set_defaults(**self._read_yaml(config_path))
        try:
            outputs = self.parse_args_into_dataclasses(args=args, look_for_args_file=False)
        except ValueError as err:  # a field's validation: one clear message, no traceback, nothing written
            self.exit(2, f"{self.prog}: error: {err}\n")
        return outputs[:-1]  # the last output is the namespace holding only `config`

    def _read_yaml(self, path: str) -> dict:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except OSError as err:
            raise SystemExit(f"error: --config {path}: cannot read it ({err.strerror}).") from None
        except yaml.YAMLError as err:
            raise SystemExit(f"error: --config {path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise SystemExit(f"error: --config {path} must hold a mapping of field: value, "
                             f"got {type(values).__name__}.")
        unknown = sorted(set(values) - self.known_fields())
        if unknown:
            raise SystemExit(f"error: --config {path} has unknown keys {unknown}; see --help for the valid fields.")
        return values
