"""Pushing models and datasets to the Hub, offline: the real code paths against an in-memory stand-in.

`FakeHub` replaces only the network-facing methods of `huggingface_hub.HfApi` (create_repo, repo_info,
preupload_lfs_files, create_commit, hf_hub_download) and the Hub file system `datasets` reads the
previous card through. Everything above them runs as users run it: the recipe's `--push_to_hub`
(`Trainer.push_to_hub` -> `HfApi.upload_folder`) and `python -m data_builders ... --push-to-hub`
(`DatasetDict.push_to_hub` -> parquet shards, then the dataset card). The tests then read back exactly
what the commits would have put in the repositories.
"""

import io
import json
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace

import datasets.dataset_dict
import fsspec
import httpx2
import huggingface_hub.hf_api
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.repocard import RepoCard
from safetensors.torch import load as load_safetensors

import data_builders
from data_builders.cli import main as data_builders_main

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_NotARealTokenButMustNeverLeak"


def _bytes(source) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, (str, os.PathLike)):
        return Path(source).read_bytes()
    source.seek(0)
    return source.read()


class _FakeHubFileSystem(fsspec.AbstractFileSystem):
    """Read-only view of the fake repositories under paths like `datasets/me/boolean@<rev>/README.md`."""

    cachable = False

    def __init__(self, hub, **kwargs):
        super().__init__()
        self.hub = hub

    def _split(self, path):
        match = re.match(r"^/?(datasets/)?(?P<repo>[^@]+)@(?P<rev>[^/]+)/?(?P<rest>.*)$", path)
        assert match, f"unexpected Hub path {path}"
        kind = "dataset" if path.lstrip("/").startswith("datasets/") else "model"
        return path[: len(path) - len(match["rest"])].rstrip("/"), self.hub.files(kind, match["repo"]), match["rest"]

    def glob(self, path, **kwargs):
        root, files, pattern = self._split(path)
        regex = re.compile(fnmatch_to_regex(pattern))
        return [f"{root}/{name}" for name in sorted(files) if regex.fullmatch(name)]

    def _open(self, path, mode="rb", **kwargs):
        _, files, name = self._split(path)
        if name not in files:
            raise FileNotFoundError(path)
        return io.BytesIO(files[name])


def fnmatch_to_regex(pattern):
    return "".join("[^/]*" if c == "*" else re.escape(c) for c in pattern)


class FakeHub:
    """In-memory repositories reached through HfApi's own methods; records every call's token."""

    def __init__(self):
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.tokens: list = []
        self.validated: list[dict] = []
        self._preuploaded: dict[str, bytes] = {}

    def files(self, kind, repo_id):
        return self.repos[(kind, repo_id)]

    def install(self, monkeypatch):
        hub = self

        def create_repo(api, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
            hub.tokens.append(token or api.token)
            hub.repos.setdefault((repo_type or "model", repo_id), {})
            hub.created.append({"repo_id": repo_id, "repo_type": repo_type or "model", "private": private})
            return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

        def repo_info(api, repo_id, *, repo_type=None, revision=None, token=None, **kwargs):
            if (repo_type or "model", repo_id) not in hub.repos:
                request = httpx2.Request("GET", f"https://huggingface.co/api/{repo_type}s/{repo_id}")
                raise RepositoryNotFoundError(f"{repo_id} not found", response=httpx2.Response(404, request=request))
            return SimpleNamespace(id=repo_id, sha=f"{len(hub.commits):040x}")

        def preupload_lfs_files(api, repo_id, additions, *, token=None, repo_type=None, **kwargs):
            for op in additions:  # the caller deletes its temporary file right after this call
                hub._preuploaded[op.path_in_repo] = _bytes(op.path_or_fileobj)

        def create_commit(api, repo_id, operations, *, commit_message, token=None, repo_type=None, **kwargs):
            hub.tokens.append(token or api.token)
            files = hub.repos[(repo_type or "model", repo_id)]
            changed = []
            for op in operations:
                if isinstance(op, CommitOperationAdd):
                    files[op.path_in_repo] = hub._preuploaded.pop(op.path_in_repo, None) or _bytes(op.path_or_fileobj)
                    changed.append(op.path_in_repo)
                elif isinstance(op, CommitOperationDelete):
                    files.pop(op.path_in_repo, None)
            hub.commits.append({"repo_id": repo_id, "repo_type": repo_type or "model", "message": commit_message,
                                "files": changed})
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(hub.commits)}",
                                   oid=f"{len(hub.commits):040x}", pr_url=None)

        def hf_hub_download(api, repo_id, filename, *, repo_type=None, **kwargs):
            files = hub.repos[(repo_type or "model", repo_id)]
            if filename not in files:
                raise EntryNotFoundError(f"{filename} not in {repo_id}")
            path = Path(hub.download_dir) / repo_id.replace("/", "--") / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[filename])
            return str(path)

        def validate_yaml(api, content, *, repo_type=None, token=None):
            hub.validated.append(RepoCard(content).data.to_dict())  # the Hub checks the card's YAML header

        for name, fn in [("create_repo", create_repo), ("repo_info", repo_info), ("create_commit", create_commit),
                         ("preupload_lfs_files", preupload_lfs_files), ("hf_hub_download", hf_hub_download),
                         ("_validate_yaml", validate_yaml)]:
            monkeypatch.setattr(HfApi, name, fn)
        monkeypatch.setattr(datasets.dataset_dict, "HfFileSystem", lambda **kwargs: _FakeHubFileSystem(hub))
        # upload_folder's single-commit path (its xet pipeline streams to the Hub below create_commit)
        monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)
        return self


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = FakeHub().install(monkeypatch)
    fake.download_dir = str(tmp_path / "downloads")
    return fake


TINY = ["--n_bits", "7", "--k", "3", "--train_size", "64", "--validation_size", "16", "--test_size", "16",
        "--hidden_size", "16", "--num_layers", "1", "--num_heads", "2", "--num_train_epochs", "2",
        "--per_device_train_batch_size", "16", "--spectral_expansion_epochs", "1", "--ntk_probe_size", "8",
        "--ntk_interval_steps", "4", "--rank_interval_steps", "4", "--rank_snapshot_epochs", "2",
        "--logging_steps", "2", "--disable_tqdm", "true", "--use_cpu", "true"]
MODEL_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors", "results.json",
               "rank_report.json", "tracking_history.json", "tokenizer.json", "tokenizer_config.json",
               "training_args.bin"}


def test_recipe_push_to_hub_uploads_our_card_weights_and_reports(hub, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    import train_majority

    out = tmp_path / "run"
    with caplog.at_level(logging.DEBUG):
        train_majority.run("majority", [*TINY, "--output_dir", str(out), "--push_to_hub", "true",
                                        "--hub_model_id", "me/specvol-majority", "--hub_token", SECRET,
                                        "--hub_private_repo", "true", "--save_strategy", "steps",
                                        "--save_steps", "4"])
    assert hub.created == [{"repo_id": "me/specvol-majority", "repo_type": "model", "private": True}]
    assert hub.tokens and all(t == SECRET for t in hub.tokens)  # the user's token reached the Hub client ...
    files = hub.files("model", "me/specvol-majority")
    assert set(files) == MODEL_FILES  # ... with the run's folder, checkpoints excluded
    assert not any(name.startswith("checkpoint-") for name in files) and (out / "checkpoint-8").is_dir()
    final = hub.commits[-1]
    assert final["message"].startswith("hf_specvol run: test accuracy")

    # the weights: safetensors, equal to what was saved locally
    uploaded = load_safetensors(files["model.safetensors"])
    local = load_safetensors((out / "model.safetensors").read_bytes())
    assert uploaded.keys() == local.keys() and all(torch.equal(uploaded[k], local[k]) for k in local)

    # our card, not the Trainer's generic one: method, its config, dataset, metrics, rank report
    card = files["README.md"].decode()
    results = json.loads(files["results.json"])
    assert card == (out / "README.md").read_text()
    assert "hf_specvol" in card and "spectral volume penalty" in card.lower()
    assert "lambda_max = 0.1, schedule `fixed`" in card  # the method
    assert '"spectral_volume_coef": 0.1' in card and '"ntk_probe_size": 8' in card  # its config
    assert json.dumps(results["task"], indent=2) in card and "support" in results["task"]  # the dataset
    assert f"| test accuracy | {results['test_accuracy']:.4f} |" in card  # the metrics
    assert "## Layer-wise ranks at epoch 2" in card and "`transformer.h.0.attn.c_attn.weight` | 48x16" in card
    assert "NTK at initialization" in card and "NTK at end of training" in card
    lam = results["rank_report"]["lambda"]
    assert (f"- lambda (FixedSchedule): max 0.1, mean {lam['mean']:.4g}, on for {lam['steps_with_penalty']} steps"
            in card)
    assert "hf_specvol" in hub.validated[-1]["tags"]  # the YAML header parses, with our tags
    assert json.loads(files["rank_report.json"])["snapshots"]["2"]["step"] == 8

    # the token is nowhere: not in any uploaded file (training_args.bin included), the card or the logs
    for name, content in files.items():
        assert SECRET.encode() not in content, name
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert SECRET not in caplog.text and SECRET not in captured.out + captured.err
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.spectral_volume_coef == 0.1


def test_data_builders_push_to_hub_uploads_parquet_configs_and_card(hub, tmp_path, monkeypatch, capsys):
    argv = ["parity", "--n", "10", "--k", "3", "--seed", "5", "--train-size", "40", "--validation-size", "8",
            "--test-size", "8", "--output-dir", str(tmp_path / "parity"), "--push-to-hub", "me/boolean", "--private"]
    assert data_builders_main(argv) == 0
    assert data_builders_main(["majority", "--n", "9", "--k", "5", "--train-size", "30", "--validation-size", "5",
                               "--test-size", "5", "--output-dir", str(tmp_path / "majority"),
                               "--push-to-hub", "me/boolean"]) == 0
    assert hub.created[0] == {"repo_id": "me/boolean", "repo_type": "dataset", "private": True}
    files = hub.files("dataset", "me/boolean")
    parquet = sorted(n for n in files if n.endswith(".parquet"))
    assert parquet == [f"{config}/{split}-00000-of-00001.parquet" for config in ("majority_n9_k5", "parity_n10_k3")
                       for split in ("test", "train", "validation")]
    # the uploaded rows are the built dataset, split by split
    local = datasets.load_from_disk(str(tmp_path / "parity"))
    for split in ("train", "validation", "test"):
        table = pq.read_table(io.BytesIO(files[f"parity_n10_k3/{split}-00000-of-00001.parquet"]))
        assert table.num_rows == len(local[split])
        assert table.column("bits").to_pylist() == local[split]["bits"]
        assert table.column("label").to_pylist() == local[split]["label"]
    # one card with both configs: the Hub's data_files YAML and data_builders' block per config
    card = files["README.md"].decode()
    meta = data_builders.task_metadata(local)
    assert "config_name: parity_n10_k3" in card and "config_name: majority_n9_k5" in card
    assert "path: parity_n10_k3/train-*" in card and "path: majority_n9_k5/test-*" in card
    assert "<!-- data_builders:parity_n10_k3 -->" in card and "<!-- data_builders:majority_n9_k5 -->" in card
    assert str(meta["support"]) in card and "Seed**: 5" in card
    assert card.count("# Sparse Boolean functions") == 1
    assert "pushed to https://huggingface.co/datasets/me/boolean" in capsys.readouterr().out


def test_model_card_without_run_results_is_the_trainers(tmp_path, make_tiny_gpt2):
    """Outside the recipe (no run results), create_model_card keeps the Trainer's behaviour."""
    from hf_specvol import SpectralVolumeConfig, SpectralVolumeTrainer

    args = SpectralVolumeConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, track_ranks=False,
                                spectral_volume_coef=0.0)
    trainer = SpectralVolumeTrainer(model=make_tiny_gpt2(), args=args)
    trainer.create_model_card(model_name="plain")
    card = (tmp_path / "README.md").read_text()
    assert "plain" in card and "hf_specvol" not in card
