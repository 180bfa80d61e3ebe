"""Tests for data_builders: oracles for labels, split hygiene, tokenization, cards, Hub push and the CLI."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, load_from_disk
from huggingface_hub import HfApi
from huggingface_hub.errors import EntryNotFoundError
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, default_data_collator

from data_builders import (
    answer_token_ids,
    boolean,
    build_bit_tokenizer,
    dataset_card,
    majority,
    parity,
    push_dataset_to_hub,
    sampling,
    task_metadata,
    tokenize_for_causal_lm,
)
from data_builders.cli import main as cli_main

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train_size": 60, "validation_size": 20, "test_size": 20}


def oracle_label(row, task, support, tie):
    """Plain-Python definition of the labels (independent of the builder's numpy code)."""
    total = sum(int(row[i]) for i in support)
    if task == "parity":
        return total % 2
    k = len(support)
    if 2 * total == k:
        assert tie == "one", "a tied string exists although ties were dropped"
        return 1
    return 1 if 2 * total > k else 0


def all_rows(dataset_dict):
    return [tuple(row) for split in dataset_dict.values() for row in split["bits"]]


@pytest.mark.parametrize(
    "task, n, k, tie",
    [("parity", 10, 3, None), ("parity", 64, 5, None), ("majority", 9, 5, None), ("majority", 64, 3, None),
     ("majority", 10, 4, "one"), ("majority", 64, 4, "drop"), ("parity", 7, 7, None)],
)  # fmt: skip
def test_labels_and_text_match_oracle(task, n, k, tie):
    builder = parity if task == "parity" else majority
    kwargs = {"tie": tie} if task == "majority" else {}
    ds = builder(n, k, seed=3, **SMALL, **kwargs)
    meta = task_metadata(ds)
    support = meta["support"]
    assert len(support) == k and support == sorted(set(support)) and all(0 <= i < n for i in support)
    assert (meta["task"], meta["n"], meta["k"], meta["seed"], meta["tie"]) == (task, n, k, 3, tie)
    for split in ds.values():
        for row in split:
            assert len(row["bits"]) == n and set(row["bits"]) <= {0, 1}
            assert row["label"] == oracle_label(row["bits"], task, support, tie)
            assert row["prompt"] == " ".join(str(b) for b in row["bits"]) + " ="
            assert row["completion"] == str(row["label"])
    assert str(ds["train"].features["bits"].feature.dtype) == "int8"
    assert ds["train"].features["label"].names == ["0", "1"]


@pytest.mark.parametrize("n, sizes", [(10, (700, 200, 124)), (6, (40, 14, 10)), (64, (3000, 500, 500))])
def test_splits_exact_disjoint_and_without_duplicates(n, sizes):
    ds = parity(n, 2, seed=1, train_size=sizes[0], validation_size=sizes[1], test_size=sizes[2])
    assert [len(ds[s]) for s in ("train", "validation", "test")] == list(sizes)
    rows = all_rows(ds)
    assert len(set(rows)) == len(rows) == sum(sizes)
    if sum(sizes) == 2**n:  # the whole space: every string exactly once
        assert set(rows) == {tuple((i >> j) & 1 for j in range(n)) for i in range(2**n)}


def test_determinism_and_seed_dependence():
    a, b = majority(64, 5, seed=7, **SMALL), majority(64, 5, seed=7, **SMALL)
    for split in a:
        assert a[split].data.table.equals(b[split].data.table)
    c = majority(64, 5, seed=8, **SMALL)
    assert all_rows(a) != all_rows(c)
    small_a, small_c = parity(12, 3, seed=0, **SMALL), parity(12, 3, seed=1, **SMALL)
    assert all_rows(small_a) != all_rows(small_c)
    assert all_rows(parity(12, 3, seed=0, **SMALL)) == all_rows(small_a)


def test_explicit_support():
    drawn = task_metadata(parity(20, 4, seed=5, **SMALL))["support"]
    explicit = parity(20, 4, seed=5, support=list(reversed(drawn)), **SMALL)
    assert task_metadata(explicit)["support"] == drawn  # sorted, and same strings as the drawn support
    assert all_rows(explicit) == all_rows(parity(20, 4, seed=5, **SMALL))
    ds = majority(12, 3, support=[0, 5, 11], **SMALL)
    assert task_metadata(ds)["support"] == [0, 5, 11]


def test_tie_rules():
    ones = majority(12, 4, tie="one", seed=0, train_size=2000, validation_size=0, test_size=0)
    support = task_metadata(ones)["support"]
    bits = np.array(ones["train"]["bits"])
    tied = bits[:, support].sum(1) == 2
    assert tied.any() and (np.array(ones["train"]["label"])[tied] == 1).all()
    dropped = majority(64, 2, tie="drop", seed=0, train_size=2000, validation_size=10, test_size=10)
    support = task_metadata(dropped)["support"]
    for split in dropped.values():
        assert (np.array(split["bits"])[:, support].sum(1) != 1).all()
    with pytest.raises(ValueError, match="tie.*'one'.*'drop'"):
        majority(12, 4)
    for tie in (None, "one", "drop"):  # odd k: no ties, the rule is irrelevant and stored as None
        assert task_metadata(majority(9, 3, tie=tie, **SMALL))["tie"] is None


def test_drop_space_size_is_enforced():
    # n=4, k=2: 4 free strings x (4 - C(2,1)) non-tied support patterns = 8 strings.
    ds = majority(4, 2, tie="drop", train_size=5, validation_size=2, test_size=1)
    assert len(set(all_rows(ds))) == 8
    with pytest.raises(ValueError, match="test_size=2 is too large.*at most 1"):
        majority(4, 2, tie="drop", train_size=5, validation_size=2, test_size=2)


def test_sampling_paths(monkeypatch):
    calls = []
    real = sampling._first_unique
    monkeypatch.setattr(sampling, "_first_unique", lambda rows: calls.append(len(rows)) or real(rows))
    parity(16, 3, train_size=50_000, validation_size=1000, test_size=1000)
    assert calls == []  # small space: sampled by index without replacement
    # n=23 lies above the enumeration limit: random rows, ~600 duplicates rejected and topped up.
    ds = parity(23, 3, train_size=100_000, validation_size=1000, test_size=1000)
    assert calls and len(set(all_rows(ds))) == 102_000
    calls.clear()
    parity(64, 3, train_size=1000)
    assert calls
    rows = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4]], dtype=np.uint8)
    assert real(rows).tolist() == [0, 1, 3]
    wide = np.random.default_rng(0).integers(0, 2, size=(200, 9), dtype=np.uint8)  # > 8 bytes per row
    assert len(real(wide)) == len(np.unique(wide, axis=0))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n": 0, "k": 1}, "n=0"), ({"n": 4, "k": 5}, "k=5"), ({"n": 4, "k": 0}, "k=0"),
     ({"n": 4.0, "k": 2}, "n=4.0"), ({"n": 8, "k": 2, "train_size": 0}, "train_size=0"),
     ({"n": 8, "k": 2, "validation_size": -1}, "validation_size=-1"),
     ({"n": 8, "k": 2, "test_size": -3}, "test_size=-3"), ({"n": 8, "k": 2, "train_size": 2.5}, "train_size"),
     ({"n": 8, "k": 2, "train_size": 300}, "train_size=300 is too large"),
     ({"n": 8, "k": 2, "train_size": 200, "validation_size": 100}, "validation_size=100 is too large"),
     ({"n": 8, "k": 2, "train_size": 200, "test_size": 57}, "test_size=57 is too large.*at most 56"),
     ({"n": 8, "k": 3, "tie": "half"}, "tie='half'"), ({"n": 8, "k": 2, "seed": -1}, "seed=-1"),
     ({"n": 8, "k": 2, "support": [1, 9]}, "support"), ({"n": 8, "k": 2, "support": [1, 1]}, "support"),
     ({"n": 8, "k": 3, "support": [1, 2]}, "support has 2")],
)  # fmt: skip
def test_bad_arguments_name_the_parameter(kwargs, match):
    kwargs = {"validation_size": 0, "test_size": 0, "train_size": 10, "tie": "one", **kwargs}
    with pytest.raises(ValueError, match=match):
        majority(**kwargs)


def test_parity_rejects_tie():
    with pytest.raises(ValueError, match="tie"):
        boolean.build_task("parity", 8, 2, tie="one", train_size=10)


def test_bit_tokenizer_round_trip(tmp_path):
    tok = build_bit_tokenizer()
    tok.save_pretrained(tmp_path)
    for loaded in (
        AutoTokenizer.from_pretrained(tmp_path),
        PreTrainedTokenizerFast.from_pretrained(tmp_path),
    ):
        assert loaded("1 0 =")["input_ids"] == tok("1 0 =")["input_ids"] == [5, 4, 6]
        assert (loaded.pad_token, loaded.unk_token, loaded.bos_token, loaded.eos_token) == (
            "<pad>", "<unk>", "<bos>", "<eos>",
        )  # fmt: skip
        assert answer_token_ids(loaded) == (4, 5)


@pytest.mark.parametrize("add_bos", [False, True])
def test_tokenize_bit_tokenizer(add_bos):
    ds = majority(16, 3, seed=2, **SMALL)
    tok = build_bit_tokenizer()
    lm = tokenize_for_causal_lm(ds, tok, add_bos=add_bos)
    assert task_metadata(lm) == task_metadata(ds)
    zero, one = answer_token_ids(tok)
    for split in ds:
        assert lm[split].column_names == ["input_ids", "attention_mask", "labels", "label"]
        for raw, row in zip(ds[split], lm[split]):
            ids, labels = row["input_ids"], row["labels"]
            assert len(ids) == 16 + 2 + add_bos and all(row["attention_mask"])
            assert tok.decode(ids, skip_special_tokens=True) == raw["prompt"] + " " + raw["completion"]
            assert (ids[0] == tok.bos_token_id) == add_bos
            assert labels[:-1] == [-100] * (len(ids) - 1) and labels[-1] == ids[-1] == (
                one if raw["label"] else zero
            )
            assert row["label"] == raw["label"]
    # default_data_collator keeps the token labels (DataCollatorWithPadding would copy `label` over them).
    batch = default_data_collator([lm["train"][i] for i in range(4)])
    assert batch["labels"].tolist() == lm["train"][:4]["labels"]


def _wordlevel(vocab, pre_tokenizer, normalizer=None):
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        backend.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


def test_tokenize_other_tokenizers():
    ds = parity(12, 3, seed=4, **SMALL)
    # A word-level tokenizer with other ids (vectorized path) and a BPE trained on the fly (batched path).
    shuffled = _wordlevel({"=": 0, "1": 1, "<pad>": 2, "0": 3, "<unk>": 4}, pre_tokenizers.Whitespace())
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(ds["train"]["prompt"], trainers.BpeTrainer(special_tokens=["<unk>", "<pad>"]))
    bpe = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>")
    for tok in (shuffled, bpe):
        zero, one = answer_token_ids(tok)
        lm = tokenize_for_causal_lm(ds, tok, keep_text_columns=True)
        for row in lm["validation"]:
            expected = tok(row["prompt"], add_special_tokens=False)["input_ids"] + [
                one if row["label"] else zero
            ]
            assert row["input_ids"] == expected
            assert row["labels"] == [-100] * (len(expected) - 1) + expected[-1:]
    assert answer_token_ids(shuffled) == (3, 1)


def test_tokenize_pads_variable_lengths_and_rejects_split_answers():
    ds = parity(8, 2, seed=0, **SMALL)
    # "1 1 0 =" -> "110=" -> ["11", "0", "="]: prompts of different lengths, padded on the right.
    merging = _wordlevel(
        {"<pad>": 0, "<unk>": 1, "0": 2, "1": 3, "11": 4, "=": 5},
        pre_tokenizers.Split(Regex("11|[01=]"), behavior="isolated"),
        normalizers.Replace(" ", ""),
    )
    lm = tokenize_for_causal_lm(ds, merging)
    lengths = {sum(row["attention_mask"]) for row in lm["train"]}
    assert len(lengths) > 1
    for row in lm["train"]:
        real = sum(row["attention_mask"])
        assert row["attention_mask"] == [1] * real + [0] * (len(row["input_ids"]) - real)
        assert row["input_ids"][real:] == [0] * (len(row["input_ids"]) - real)
        assert [i for i, label in enumerate(row["labels"]) if label != -100] == [real - 1]
        assert row["labels"][real - 1] == row["input_ids"][real - 1] == (3 if row["label"] else 2)
    chars = _wordlevel(
        {" ": 0, "0": 1, "1": 2, "=": 3, "<unk>": 4, "<pad>": 5}, pre_tokenizers.Split(Regex("."), "isolated")
    )
    with pytest.raises(ValueError, match=r"tokenizer \w+ \(unnamed\) maps the answer ' 0'"):
        answer_token_ids(chars)
    with pytest.raises(ValueError, match="one known token per answer"):
        tokenize_for_causal_lm(ds, chars)


def test_save_load_round_trip(tmp_path):
    ds = majority(10, 4, tie="drop", seed=9, **SMALL)
    ds.save_to_disk(tmp_path / "raw")
    loaded = load_from_disk(str(tmp_path / "raw"))
    assert task_metadata(loaded) == task_metadata(ds) and loaded["test"]["bits"] == ds["test"]["bits"]
    assert loaded["train"].features == ds["train"].features
    lm = tokenize_for_causal_lm(ds, build_bit_tokenizer())
    lm.save_to_disk(tmp_path / "lm")
    assert task_metadata(load_from_disk(str(tmp_path / "lm"))) == task_metadata(ds)
    with pytest.raises(ValueError, match="no data_builders metadata"):
        task_metadata(Dataset.from_dict({"bits": [[0, 1]]}))
    with pytest.raises(ValueError, match="different"):
        task_metadata(DatasetDict({"a": ds["train"], "b": parity(10, 4, **SMALL)["train"]}))


def test_dataset_card_contents():
    ds = majority(64, 4, tie="one", seed=11, **SMALL)
    meta = task_metadata(ds)
    card = dataset_card(ds, repo_id="me/boolean")
    text = str(card)
    needles = ("n = 64", "k = 4", str(meta["support"]), "Seed**: 11", "Tie rule**: one", "| train | 60 |",
               'load_dataset("me/boolean", "majority_n64_k4_tie-one")', "ties (`= k/2`) are labelled 1")
    for needle in needles:
        assert needle in text, needle
    assert card.data.license == "apache-2.0" and "majority" in card.data.tags
    assert card.data.configs[0]["config_name"] == "majority_n64_k4_tie-one"
    assert card.data.configs[0]["data_files"][0] == {
        "split": "train",
        "path": "majority_n64_k4_tie-one/train-*",
    }
    assert "configs" not in dataset_card(ds).data.to_dict()  # local card: no Hub data files


def test_push_to_hub_offline(monkeypatch, tmp_path):
    pushed, uploaded = [], []
    monkeypatch.setattr(DatasetDict, "push_to_hub", lambda self, repo_id, **kw: pushed.append((repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_file", lambda self, **kw: uploaded.append(kw))

    def no_readme(self, *args, **kwargs):
        raise EntryNotFoundError("README.md")

    monkeypatch.setattr(HfApi, "hf_hub_download", no_readme)
    ds = parity(16, 3, seed=5, **SMALL)
    meta = task_metadata(ds)
    secret = "hf_notARealTokenButSecret"
    push_dataset_to_hub(ds, "me/boolean", token=secret, private=True)
    ((repo_id, kwargs),) = pushed
    assert repo_id == "me/boolean" and kwargs["config_name"] == "parity_n16_k3"
    assert kwargs["private"] is True and kwargs["token"] == secret
    readme = uploaded[0]["path_or_fileobj"].getvalue().decode()
    assert uploaded[0]["path_in_repo"] == "README.md" and uploaded[0]["repo_type"] == "dataset"
    for needle in ("n = 16", "k = 3", str(meta["support"]), "Seed**: 5", "parity_n16_k3/train-*"):
        assert needle in readme, needle
    assert secret not in readme and secret not in json.dumps(uploaded[0], default=str)

    # A second config joins the README that push_to_hub left (its YAML and the first config's block are kept).
    previous = tmp_path / "README.md"
    previous.write_text(
        readme.replace("size_categories:", "dataset_info:\n- config_name: parity_n16_k3\nsize_categories:")
    )
    monkeypatch.setattr(HfApi, "hf_hub_download", lambda self, *a, **kw: str(previous))
    push_dataset_to_hub(majority(16, 5, seed=1, **SMALL), "me/boolean", config_name="maj5")
    merged = uploaded[1]["path_or_fileobj"].getvalue().decode()
    assert pushed[1][1]["config_name"] == "maj5"
    assert "<!-- data_builders:parity_n16_k3 -->" in merged and "<!-- data_builders:maj5 -->" in merged
    assert "parity_n16_k3/train-*" in merged and "maj5/train-*" in merged and "dataset_info" in merged
    assert merged.count("# Sparse Boolean functions") == 1


def _cli_env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}


def test_cli_subprocess(tmp_path):
    out = tmp_path / "nested" / "majority"
    cmd = [sys.executable, "-m", "data_builders", "majority", "--n", "12", "--k", "3", "--seed", "4",
           "--train-size", "100", "--validation-size", "20", "--test-size", "20", "--output-dir", str(out)]  # fmt: skip
    done = subprocess.run(
        cmd, check=False, capture_output=True, text=True, env=_cli_env(), cwd=REPO_ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    ds = load_from_disk(str(out))
    meta = task_metadata(ds)
    assert [len(ds[s]) for s in ("train", "validation", "test")] == [100, 20, 20]
    assert str(meta["support"]) in done.stdout and "fraction of label 1" in done.stdout
    assert str(meta["support"]) in (out / "README.md").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["majority"]  # no temp dirs left

    bad = tmp_path / "bad"
    done = subprocess.run(
        [*cmd[:4], "--n", "4", "--k", "5", "--output-dir", str(bad)],
        check=False, capture_output=True, text=True, env=_cli_env(), cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "k=5" in done.stderr and not bad.exists()


@pytest.mark.parametrize(
    "argv, match",
    [(["parity", "--n", "8", "--k", "2", "--train-size", "300"], "--train-size=300 is too large"),
     (["majority", "--n", "8", "--k", "2"], "tie"), (["majority", "--n", "8", "--k", "3", "--tie", "x"], "--tie"),
     (["parity", "--n", "8", "--k", "2", "--test-size", "-1"], "--test-size=-1")],
)  # fmt: skip
def test_cli_rejects_bad_args_before_writing(tmp_path, capsys, argv, match):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--output-dir", str(out)])
    assert exit_info.value.code == 2 and match in capsys.readouterr().err
    assert not out.exists()


def test_cli_overwrite_and_atomic_failure(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    argv = ["parity", "--n", "10", "--k", "3", "--train-size", "50", "--validation-size", "10",
            "--test-size", "10", "--output-dir", str(out), "--tokenize"]  # fmt: skip
    with pytest.raises(SystemExit):
        cli_main(argv)
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(DatasetDict, "save_to_disk", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cli_main([*argv, "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep.txt").exists()
    monkeypatch.undo()

    assert cli_main([*argv, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "README.md").exists()
    ds = load_from_disk(str(out))
    assert {"input_ids", "labels", "label", "prompt"} <= set(ds["train"].column_names)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert answer_token_ids(tok) == (4, 5)
