"""Sparse majority and sparse parity datasets over uniform bit strings.

Both tasks draw bits x uniformly from {0,1}^n and a support S, a sorted k-subset of range(n) fixed by the
seed. parity: y = sum_{i in S} x_i mod 2. majority: y = 1 if sum_{i in S} x_i > k/2, 0 if < k/2; for even k
the tie sum = k/2 follows an explicit rule (`tie="one"` labels it 1, `tie="drop"` removes tied strings).

The train / validation / test splits are disjoint as bit strings (see `sampling.py`). Everything is
vectorized numpy, and the Arrow columns (including the prompt strings) are built from numpy buffers.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, List, Value
from datasets.fingerprint import Hasher

from .sampling import sample_bit_strings

TASKS = ("majority", "parity")
TIE_RULES = ("one", "drop")
SPLITS = ("train", "validation", "test")
METADATA_FORMAT = "data_builders/boolean-v1"

# Arrow `list` / `string` arrays use int32 offsets: build columns in chunks below this many bytes.
_MAX_CHUNK_BYTES = 2**30

FEATURES = Features(
    {
        "bits": List(Value("int8")),
        "label": ClassLabel(names=["0", "1"]),
        "prompt": Value("string"),
        "completion": Value("string"),
    }
)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def space_size(task: str, n: int, k: int, tie: str | None = None) -> int:
    """Number of bit strings a task can draw from.

    Args:
        task (`str`): `"majority"` or `"parity"`.
        n (`int`): number of bits.
        k (`int`): support size.
        tie (`str`, *optional*): majority tie rule; only `"drop"` (with even k) shrinks the space.

    Returns:
        `int`: `2**n`, or `2**(n-k) * (2**k - C(k, k/2))` when tied strings are dropped.
    """
    if task == "majority" and k % 2 == 0 and tie == "drop":
        return 2 ** (n - k) * (2**k - math.comb(k, k // 2))
    return 2**n


def validate_task_args(
    task: str,
    n: int,
    k: int,
    *,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    tie: str | None = None,
    support: Sequence[int] | None = None,
) -> tuple[str | None, tuple[int, ...] | None]:
    """Checks every argument of a builder before any work is done.

    Args:
        task (`str`): `"majority"` or `"parity"`.
        n, k, seed (`int`): bits, support size, dataset seed.
        sizes (`dict[str, int]`, *optional*): split name -> number of examples.
        tie (`str`, *optional*): majority tie rule, required for even k.
        support (`Sequence[int]`, *optional*): explicit support S.

    Returns:
        `tuple`: the normalized tie rule (`None` when ties cannot occur) and the sorted support (or `None`).

    Raises:
        `ValueError`: naming the offending parameter and how to fix it.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown; use one of {TASKS}.")
    if not _is_int(n) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1 (the number of input bits).")
    if not _is_int(k) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} must be an integer with 1 <= k <= n={n}; pass k=n for full {task}.")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer.")
    if task == "majority":
        if tie is not None and tie not in TIE_RULES:
            raise ValueError(f"tie={tie!r} is unknown; use one of {TIE_RULES}.")
        if k % 2 == 0 and tie is None:
            raise ValueError(
                f"tie must be set for majority with even k={k}: sum_S x = k/2 is a tie. Pass tie='one' "
                "(ties labelled 1, as in Chen et al. 2025) or tie='drop' (tied strings removed)."
            )
        tie = tie if k % 2 == 0 else None
    elif tie is not None:
        raise ValueError(f"tie={tie!r} only applies to majority; leave it unset for parity.")
    if support is not None:
        support = tuple(support)
        if not all(_is_int(i) and 0 <= i < n for i in support) or len(set(support)) != len(support):
            raise ValueError(f"support={support!r} must hold distinct integers in range(n={n}).")
        if len(support) != k:
            raise ValueError(f"support has {len(support)} indices but k={k}; pass k=len(support).")
        support = tuple(sorted(int(i) for i in support))
    sizes = sizes or {}
    for name, size in sizes.items():
        low = 1 if name == "train" else 0
        if not _is_int(size) or size < low:
            raise ValueError(f"{name}_size={size!r} must be an integer >= {low}.")
    space, used = space_size(task, n, k, tie), 0
    for name, size in sizes.items():
        if used + size > space:
            what = "strings without a tie" if tie == "drop" else "strings"
            raise ValueError(
                f"{name}_size={size} is too large: n={n} gives only {space} distinct {what} and the splits "
                f"before it use {used}; reduce {name}_size to at most {space - used} or increase n."
            )
        used += size
    return tie, support


def compute_labels(bits: np.ndarray, task: str, support: Sequence[int], tie: str | None = None) -> np.ndarray:
    """Labels of bit strings under a task.

    Args:
        bits (`np.ndarray` of shape `(N, n)`): 0/1 entries.
        task (`str`): `"majority"` or `"parity"`.
        support (`Sequence[int]`): the support S.
        tie (`str`, *optional*): `"one"` labels majority ties 1; otherwise ties get 0 (they are absent
            from `"drop"` datasets).

    Returns:
        `np.ndarray` of shape `(N,)` and dtype int64 with values in {0, 1}.
    """
    total = bits[:, list(support)].sum(axis=1, dtype=np.int64)
    if task == "parity":
        return total & 1
    k = len(support)
    return ((2 * total > k) | ((2 * total == k) & (tie == "one"))).astype(np.int64)


def fixed_width_column(data: np.ndarray, *, as_string: bool) -> pa.ChunkedArray:
    """Arrow `string` (from byte rows) or `list<int8>` column from a 2-D numpy array, zero-copy, chunked."""
    rows, width = data.shape
    step = max(1, _MAX_CHUNK_BYTES // max(width, 1))
    chunks = []
    for start in range(0, max(rows, 1), step):
        part = np.ascontiguousarray(data[start : start + step])
        offsets = np.arange(0, (len(part) + 1) * width, width, dtype=np.int32)
        if as_string:
            chunks.append(pa.StringArray.from_buffers(len(part), pa.py_buffer(offsets), pa.py_buffer(part)))
        else:
            chunks.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(part.ravel())))
    return pa.chunked_array(chunks)


def _prompt_bytes(bits: np.ndarray) -> np.ndarray:
    """ASCII rows "b0 b1 ... =" of width 2n + 1."""
    rows, n = bits.shape
    text = np.full((rows, 2 * n + 1), ord(" "), dtype=np.uint8)
    text[:, 0 : 2 * n : 2] = bits + ord("0")
    text[:, -1] = ord("=")
    return text


def _to_dataset(bits: np.ndarray, labels: np.ndarray, description: str, split: str) -> Dataset:
    table = pa.Table.from_arrays(
        [
            fixed_width_column(bits, as_string=False),
            pa.chunked_array([pa.array(labels, type=pa.int64())]),
            fixed_width_column(_prompt_bytes(bits), as_string=True),
            fixed_width_column((labels + ord("0")).astype(np.uint8)[:, None], as_string=True),
        ],
        schema=FEATURES.arrow_schema,
    )
    info = DatasetInfo(description=description, features=FEATURES)
    # The arguments determine the data, so they make the fingerprint (hashing the table is slower).
    return Dataset(table, info=info, split=split, fingerprint=Hasher.hash([description, split]))


def build_task(
    task: str,
    n: int,
    k: int,
    *,
    seed: int = 0,
    train_size: int = 10_000,
    validation_size: int = 1_000,
    test_size: int = 1_000,
    tie: str | None = None,
    support: Sequence[int] | None = None,
) -> DatasetDict:
    """Builds a Boolean task; see [`majority`] and [`parity`] for the arguments."""
    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    tie, support = validate_task_args(task, n, k, seed=seed, sizes=sizes, tie=tie, support=support)
    support_rng, data_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    if support is None:
        support = tuple(int(i) for i in np.sort(support_rng.choice(n, size=k, replace=False)))
    exclude = k // 2 if tie == "drop" else None
    bits = sample_bit_strings(data_rng, n, sum(sizes.values()), exclude_sum=exclude, support=support)
    labels = compute_labels(bits, task, support, tie)
    metadata = {
        "format": METADATA_FORMAT,
        "task": task,
        "n": n,
        "k": k,
        "support": list(support),
        "tie": tie,
        "seed": seed,
        "sizes": sizes,
    }
    description = json.dumps(metadata)
    bounds = np.cumsum([0, *sizes.values()])
    return DatasetDict(
        {
            name: _to_dataset(bits[lo:hi], labels[lo:hi], description, name)
            for name, lo, hi in zip(sizes, bounds[:-1], bounds[1:])
        }
    )


def majority(
    n: int,
    k: int,
    *,
    seed: int = 0,
    train_size: int = 10_000,
    validation_size: int = 1_000,
    test_size: int = 1_000,
    tie: str | None = None,
    support: Sequence[int] | None = None,
) -> DatasetDict:
    """k-sparse majority over n uniform bits: y = 1 if sum_{i in S} x_i > k/2, 0 if < k/2.

    Args:
        n (`int`): number of input bits (>= 1).
        k (`int`): support size, 1 <= k <= n (k = n is full majority).
        seed (`int`, *optional*, defaults to 0): fixes S and the strings; same arguments, same datasets.
        train_size (`int`, *optional*, defaults to 10000): examples in `train` (>= 1).
        validation_size (`int`, *optional*, defaults to 1000): examples in `validation`.
        test_size (`int`, *optional*, defaults to 1000): examples in `test`.
        tie (`str`, *optional*): rule for sum = k/2, required when k is even: `"one"` labels ties 1,
            `"drop"` removes tied strings. Ignored (stored as `None`) for odd k.
        support (`Sequence[int]`, *optional*): explicit support S (k distinct indices) instead of a random one.

    Returns:
        [`~datasets.DatasetDict`] with splits `train` / `validation` / `test` (disjoint bit strings) and
        columns `bits` (`List(int8)`), `label` (`ClassLabel` "0"/"1"), `prompt` ("1 0 1 1 =") and
        `completion` ("1"/"0"). The task metadata is in each split's `info.description` (see
        [`task_metadata`]).

    Example:

    ```python
    >>> from data_builders import majority, task_metadata
    >>> ds = majority(n=64, k=3, seed=0, train_size=1000)
    >>> task_metadata(ds)["support"]
    ```
    """
    return build_task(
        "majority", n, k, seed=seed, train_size=train_size, validation_size=validation_size,
        test_size=test_size, tie=tie, support=support,
    )  # fmt: skip


def parity(
    n: int,
    k: int,
    *,
    seed: int = 0,
    train_size: int = 10_000,
    validation_size: int = 1_000,
    test_size: int = 1_000,
    support: Sequence[int] | None = None,
) -> DatasetDict:
    """k-sparse parity over n uniform bits: y = sum_{i in S} x_i mod 2.

    Args:
        n (`int`): number of input bits (>= 1).
        k (`int`): support size, 1 <= k <= n (k = n is full parity).
        seed (`int`, *optional*, defaults to 0): fixes S and the strings; same arguments, same datasets.
        train_size (`int`, *optional*, defaults to 10000): examples in `train` (>= 1).
        validation_size (`int`, *optional*, defaults to 1000): examples in `validation`.
        test_size (`int`, *optional*, defaults to 1000): examples in `test`.
        support (`Sequence[int]`, *optional*): explicit support S (k distinct indices) instead of a random one.

    Returns:
        [`~datasets.DatasetDict`] with the columns and metadata described in [`majority`].

    Example:

    ```python
    >>> from data_builders import parity
    >>> ds = parity(n=20, k=4, seed=1, train_size=5000)
    >>> ds["train"][0]["prompt"]
    ```
    """
    return build_task(
        "parity", n, k, seed=seed, train_size=train_size, validation_size=validation_size,
        test_size=test_size, support=support,
    )  # fmt: skip


def task_metadata(dataset: DatasetDict | Dataset) -> dict:
    """Reads back the task metadata stored by [`majority`] / [`parity`].

    The metadata lives in `info.description` as JSON; it survives `save_to_disk` / `load_from_disk`,
    `map`, `select` and [`tokenize_for_causal_lm`]. `push_to_hub` drops it: on the Hub it is in the card.

    Args:
        dataset ([`~datasets.DatasetDict`] or [`~datasets.Dataset`]): a built task.

    Returns:
        `dict` with keys `task`, `n`, `k`, `support`, `tie`, `seed`, `sizes` (and `format`).

    Example:

    ```python
    >>> task_metadata(parity(8, 3, train_size=10))["k"]
    3
    ```
    """
    parts = dataset.values() if isinstance(dataset, DatasetDict) else [dataset]
    found = []
    for part in parts:
        try:
            meta = json.loads(part.info.description or "")
        except json.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
            raise ValueError(
                "dataset has no data_builders metadata in info.description; build it with "
                "data_builders.majority/parity (datasets loaded from the Hub keep it in the dataset card)."
            )
        found.append(meta)
    if not found or any(meta != found[0] for meta in found):
        raise ValueError("dataset splits carry different (or no) task metadata; rebuild them together.")
    return found[0]
