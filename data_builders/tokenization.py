"""Causal-LM view of the Boolean tasks: a tiny bit tokenizer and `input_ids` / `labels` columns.

A sequence is `[bos] + tokens(prompt) + [answer]` where the answer token is the tokenizer's single token for
" 0" / " 1" (looked up, never assumed). `labels` is -100 everywhere except at the answer position.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, List, Value
from datasets.fingerprint import Hasher
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .boolean import fixed_width_column

BIT_SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
BIT_SYMBOLS = ("0", "1", "=")
IGNORE_INDEX = -100
TEXT_COLUMNS = ("bits", "prompt", "completion")

TOKENIZED_FEATURES = Features(
    {
        "input_ids": List(Value("int64")),
        "attention_mask": List(Value("int64")),
        "labels": List(Value("int64")),
        "label": ClassLabel(names=["0", "1"]),
    }
)


def build_bit_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer for the bit prompts: specials `<pad> <unk> <bos> <eos>`, then "0", "1", "=".

    Returns:
        [`~transformers.PreTrainedTokenizerFast`] (ids 0-6, whitespace pre-tokenizer, no post-processor) that
        round-trips through `save_pretrained` / `AutoTokenizer.from_pretrained` offline.

    Example:

    ```python
    >>> tok = build_bit_tokenizer()
    >>> tok("1 0 1 =")["input_ids"]
    [5, 4, 5, 6]
    ```
    """
    vocab = {token: i for i, token in enumerate([*BIT_SPECIAL_TOKENS.values(), *BIT_SYMBOLS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=BIT_SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="right", **BIT_SPECIAL_TOKENS)


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """Ids of the answer tokens " 0" and " 1" (completion with a leading space, no special tokens).

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): any HF tokenizer.

    Returns:
        `tuple[int, int]`: `(id_for_0, id_for_1)`.

    Raises:
        `ValueError`: if an answer is not exactly one token, is the unknown token, or both share an id.

    Example:

    ```python
    >>> answer_token_ids(build_bit_tokenizer())
    (4, 5)
    ```
    """
    ids = []
    for answer in (" 0", " 1"):
        tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1 or tokens[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} ({tokenizer.name_or_path or 'unnamed'}) maps the answer "
                f"{answer!r} to {tokens} (tokens {tokenizer.convert_ids_to_tokens(tokens)}); it needs one known "
                "token per answer. Use build_bit_tokenizer() or add ' 0' / ' 1' as single tokens."
            )
        ids.append(tokens[0])
    if ids[0] == ids[1]:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} gives ' 0' and ' 1' the same id {ids[0]}.")
    return ids[0], ids[1]


def _symbol_ids(tokenizer) -> np.ndarray | None:
    """ids of "0", "1", "=" when prompts provably tokenize symbol by symbol (word level on whitespace)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.model, models.WordLevel) or backend.normalizer is not None:
        return None
    if not isinstance(backend.pre_tokenizer, (pre_tokenizers.WhitespaceSplit, pre_tokenizers.Whitespace)):
        return None
    ids = tokenizer(" ".join(BIT_SYMBOLS), add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64) if len(ids) == len(BIT_SYMBOLS) else None


def _prompt_ids(table: pa.Table, tokenizer, symbol_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Prompt token ids right-padded to a matrix, and the per-row lengths."""
    if len(table) == 0:
        return np.zeros((0, 0), dtype=np.int64), np.zeros(0, dtype=np.int64)
    if symbol_ids is not None and "bits" in table.column_names:
        bits = table.column("bits").combine_chunks()
        bits = bits.flatten().to_numpy(zero_copy_only=False).reshape(len(table), -1)
        ids = np.concatenate([symbol_ids[bits], np.full((len(bits), 1), symbol_ids[2])], axis=1)
        first = tokenizer(table.column("prompt")[0].as_py(), add_special_tokens=False)["input_ids"]
        if first == ids[0].tolist():  # cheap guard against a hand-edited prompt column
            return ids, np.full(len(ids), ids.shape[1])
    encoded = tokenizer(table.column("prompt").to_pylist(), add_special_tokens=False)["input_ids"]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ids = np.zeros((len(encoded), lengths.max(initial=0)), dtype=np.int64)
    ids[np.arange(ids.shape[1]) < lengths[:, None]] = np.fromiter(
        (i for row in encoded for i in row), dtype=np.int64, count=int(lengths.sum())
    )
    return ids, lengths


def _tokenize_split(dataset: Dataset, tokenizer, answers, symbol_ids, bos_id, keep_text_columns) -> Dataset:
    table = dataset.with_format("arrow")[:]
    ids, lengths = _prompt_ids(table, tokenizer, symbol_ids)
    if bos_id is not None:
        ids, lengths = np.concatenate([np.full((len(ids), 1), bos_id), ids], axis=1), lengths + 1
    rows = np.arange(len(ids))
    target = table.column("label").to_numpy()
    full = np.concatenate([ids, np.zeros((len(ids), 1), dtype=np.int64)], axis=1)
    full[rows, lengths] = np.asarray(answers)[target]
    labels = np.full_like(full, IGNORE_INDEX)
    labels[rows, lengths] = full[rows, lengths]
    lengths = lengths + 1
    if np.any(lengths != full.shape[1]):
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f"prompts tokenize to different lengths with {type(tokenizer).__name__} and it has no pad "
                "token; set tokenizer.pad_token (e.g. to tokenizer.eos_token) first."
            )
        full[np.arange(full.shape[1]) >= lengths[:, None]] = tokenizer.pad_token_id
    mask = (np.arange(full.shape[1]) < lengths[:, None]).astype(np.int64)
    columns = {
        "input_ids": fixed_width_column(full, as_string=False),
        "attention_mask": fixed_width_column(mask, as_string=False),
        "labels": fixed_width_column(labels, as_string=False),
        "label": pa.array(target, type=pa.int64()),
    }
    features = TOKENIZED_FEATURES.copy()
    for name in TEXT_COLUMNS if keep_text_columns else ():
        columns[name] = table.column(name)
        features[name] = dataset.features[name]
    info = DatasetInfo(description=dataset.info.description, features=features)
    vocab = sorted(tokenizer.get_vocab().items())
    fingerprint = Hasher.hash([dataset._fingerprint, vocab, answers, bos_id, keep_text_columns])
    table = pa.table(columns, schema=features.arrow_schema)
    return Dataset(table, info=info, split=dataset.split, fingerprint=fingerprint)


def tokenize_for_causal_lm(
    dataset_dict: DatasetDict, tokenizer, *, add_bos: bool = False, keep_text_columns: bool = False
) -> DatasetDict:
    """Adds the causal-LM view: `input_ids = [bos] + tokens(prompt) + [answer]`, loss on the answer only.

    With a word-level whitespace tokenizer (such as [`build_bit_tokenizer`]) ids are mapped from the `bits`
    column in numpy; any other tokenizer encodes the `prompt` column in one batched call. Sequences are
    right-padded with the pad token (attention_mask 0, labels -100) if prompts tokenize to different
    lengths; with the bit tokenizer they never do. The task metadata (`info.description`) is kept.

    The 0/1 class `label` is kept (for probes and metrics). Beware: [`~transformers.DataCollatorWithPadding`]
    (the Trainer's default collator when given a `processing_class`) copies a `label` column over `labels`;
    pass `data_collator=default_data_collator` (sequences have equal length) or drop `label` for training.

    Args:
        dataset_dict ([`~datasets.DatasetDict`]): output of [`majority`] / [`parity`].
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): any HF tokenizer whose answers " 0" / " 1"
            are single tokens (see [`answer_token_ids`]).
        add_bos (`bool`, *optional*, defaults to `False`): prepend `tokenizer.bos_token_id`.
        keep_text_columns (`bool`, *optional*, defaults to `False`): keep `bits`, `prompt`, `completion`.

    Returns:
        [`~datasets.DatasetDict`] with columns `input_ids`, `attention_mask`, `labels` (int64 lists) and
        `label` (`ClassLabel`), plus the text columns if asked.

    Example:

    ```python
    >>> tok = build_bit_tokenizer()
    >>> lm = tokenize_for_causal_lm(parity(8, 3, train_size=100), tok)
    >>> lm["train"][0]["labels"][-1] in answer_token_ids(tok)
    True
    ```
    """
    answers = answer_token_ids(tokenizer)
    bos_id = None
    if add_bos:
        bos_id = tokenizer.bos_token_id
        if bos_id is None:
            raise ValueError(
                f"add_bos=True but tokenizer {type(tokenizer).__name__} has no bos_token; set one."
            )
    symbol_ids = _symbol_ids(tokenizer)
    return DatasetDict(
        {
            name: _tokenize_split(split, tokenizer, answers, symbol_ids, bos_id, keep_text_columns)
            for name, split in dataset_dict.items()
        }
    )
