"""Dataset cards for the Boolean tasks and pushing them to the Hugging Face Hub.

Each config gets a block in the card body between `<!-- data_builders:<config> -->` markers, so several
configs (majority / parity, several n and k) can share one Hub repository and one README.
"""

from __future__ import annotations

import io
import re

from datasets import DatasetDict
from huggingface_hub import DatasetCard, DatasetCardData, HfApi
from huggingface_hub.errors import EntryNotFoundError

from .boolean import task_metadata

_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))
_TAGS = ["synthetic", "boolean-functions", "sparse-functions"]


def default_config_name(meta: dict) -> str:
    """`"{task}_n{n}_k{k}"`, plus `"_tie-{tie}"` for even-k majority (e.g. `majority_n64_k4_tie-drop`)."""
    name = f"{meta['task']}_n{meta['n']}_k{meta['k']}"
    return name + (f"_tie-{meta['tie']}" if meta.get("tie") else "")


def _label_rule(meta: dict) -> str:
    if meta["task"] == "parity":
        return "`label = sum(x[i] for i in S) % 2`"
    rule = "`label = 1` if `sum(x[i] for i in S) > k/2`, `0` if `< k/2`"
    ties = {None: "k is odd, so there are no ties", "one": "ties (`= k/2`) are labelled 1"}
    return f"{rule}; {ties.get(meta['tie'], 'tied strings (`= k/2`) were dropped')}"


def _label_share(data) -> str:
    if "label" not in data.column_names or len(data) == 0:
        return "n/a"
    return f"{data.with_format('arrow')[:].column('label').to_numpy().mean():.3f}"


def _config_block(dataset_dict: DatasetDict, meta: dict, config_name: str, repo_id: str | None) -> str:
    if repo_id:
        load = f'from datasets import load_dataset\nds = load_dataset("{repo_id}", "{config_name}")'
    else:
        load = 'from datasets import load_from_disk\nds = load_from_disk("path/to/this/directory")'
    columns = next(iter(dataset_dict.values())).column_names
    return "\n".join(
        [
            f"<!-- data_builders:{config_name} -->",
            f"## `{config_name}`: {meta['k']}-sparse {meta['task']} of {meta['n']} bits",
            "",
            f"- **Task**: {meta['task']}, n = {meta['n']}, k = {meta['k']}",
            f"- **Support S** (0-based bit indices): {meta['support']}",
            f"- **Label**: {_label_rule(meta)}",
            f"- **Tie rule**: {meta['tie']}",
            f"- **Seed**: {meta['seed']} (same arguments to `data_builders.{meta['task']}` rebuild the same data)",
            "- **Inputs**: x uniform in {0,1}^n; the splits are disjoint as bit strings, without duplicates.",
            f"- **Columns**: {', '.join(f'`{c}`' for c in columns)}.",
            '- **Text view**: prompt = the bits joined by spaces plus " =" (`"1 0 1 1 ="`), completion `"0"`/`"1"`.',
            "",
            "| split | examples | fraction of label 1 |",
            "|---|---|---|",
            *(f"| {name} | {len(data)} | {_label_share(data)} |" for name, data in dataset_dict.items()),
            "",
            f"```python\n{load}\n```",
            f"<!-- /data_builders:{config_name} -->",
        ]
    )


def dataset_card(
    dataset_dict: DatasetDict,
    *,
    config_name: str | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
) -> DatasetCard:
    """Dataset card (YAML header + Markdown body) for a built majority / parity task.

    Args:
        dataset_dict ([`~datasets.DatasetDict`]): output of [`majority`] / [`parity`] (optionally tokenized).
        config_name (`str`, *optional*): config / subset name; defaults to [`default_config_name`].
        repo_id (`str`, *optional*): Hub repository; when given, the header lists the config's data files
            (`<config>/<split>-*`, the layout of `push_to_hub(config_name=...)`) and the body shows
            `load_dataset`; otherwise the body shows `load_from_disk`.
        license (`str`, *optional*, defaults to `"apache-2.0"`): license id for the header.

    Returns:
        [`~huggingface_hub.DatasetCard`] whose body states the task, n, k, S, tie rule, seed, split sizes,
        label definition and how to load it.

    Example:

    ```python
    >>> card = dataset_card(majority(16, 3, train_size=100))
    >>> card.save("README.md")
    ```
    """
    meta = task_metadata(dataset_dict)
    config_name = config_name or default_config_name(meta)
    total = sum(len(split) for split in dataset_dict.values())
    size = next((name for bound, name in _SIZE_CATEGORIES if total < bound), "1M<n<10M")
    extra = {}
    if repo_id:
        files = [{"split": split, "path": f"{config_name}/{split}-*"} for split in dataset_dict]
        extra["configs"] = [{"config_name": config_name, "data_files": files}]
    data = DatasetCardData(
        license=license,
        task_categories=["text-classification", "text-generation"],
        tags=[*_TAGS, meta["task"]],
        size_categories=[size],
        pretty_name="Sparse Boolean functions (majority / parity)",
        **extra,
    )
    body = (
        "# Sparse Boolean functions\n\n"
        "Synthetic benchmark for studying why gradient descent fails on sparse Boolean functions, built "
        "with `data_builders` (hf_specvol). Each config fixes a task, n, k and a seed.\n\n"
        + _config_block(dataset_dict, meta, config_name, repo_id)
    )
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _merge_cards(existing: DatasetCard | None, new: DatasetCard, config_name: str) -> DatasetCard:
    """`existing` (kept YAML: configs, dataset_info) with `new`'s tags and this config's body block."""
    if existing is None:
        return new
    data = existing.data
    for key in ("license", "pretty_name"):
        if data.get(key) is None:
            data[key] = new.data.get(key)
    for key in ("tags", "task_categories", "size_categories"):
        old = data.get(key) or []
        data[key] = list(dict.fromkeys([*old, *(new.data.get(key) or [])]))
    configs = data.get("configs") or []
    if all(config.get("config_name") != config_name for config in configs):
        data["configs"] = [*configs, *(new.data.get("configs") or [])]
    name = re.escape(config_name)
    block = re.compile(rf"<!-- data_builders:{name} -->.*?<!-- /data_builders:{name} -->", re.DOTALL)
    new_block = block.search(new.text).group(0)
    if block.search(existing.text):
        text = block.sub(lambda _: new_block, existing.text)
    elif existing.text.strip():
        text = existing.text.rstrip() + "\n\n" + new_block + "\n"
    else:
        text = new.text
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{text}")


def push_dataset_to_hub(
    dataset_dict: DatasetDict,
    repo_id: str,
    *,
    config_name: str | None = None,
    private: bool = False,
    token: str | None = None,
) -> DatasetCard:
    """Pushes a built task as a config of a Hub dataset repository, then updates its card.

    Calls `dataset_dict.push_to_hub(repo_id, config_name=...)` (which writes the data under `<config>/` and
    the `configs` / `dataset_info` YAML), downloads the resulting README, merges in this config's block of
    [`dataset_card`] and uploads it. The token is only passed on to `huggingface_hub`; it is never logged
    nor written.

    Args:
        dataset_dict ([`~datasets.DatasetDict`]): output of [`majority`] / [`parity`].
        repo_id (`str`): `"<user or org>/<name>"`.
        config_name (`str`, *optional*): defaults to [`default_config_name`], e.g. `"parity_n64_k3"`.
        private (`bool`, *optional*, defaults to `False`): create the repository as private.
        token (`str`, *optional*): Hub token; defaults to the logged-in one.

    Returns:
        [`~huggingface_hub.DatasetCard`]: the card that was uploaded.

    Example:

    ```python
    >>> push_dataset_to_hub(parity(64, 3), "me/sparse-boolean")  # config "parity_n64_k3"
    ```
    """
    config_name = config_name or default_config_name(task_metadata(dataset_dict))
    dataset_dict.push_to_hub(
        repo_id, config_name=config_name, private=private, token=token, commit_message=f"Add {config_name}"
    )
    api = HfApi(token=token)
    try:
        path = api.hf_hub_download(repo_id, "README.md", repo_type="dataset")
        with open(path, encoding="utf-8") as f:
            existing = DatasetCard(f.read())
    except EntryNotFoundError:
        existing = None
    card = _merge_cards(
        existing, dataset_card(dataset_dict, config_name=config_name, repo_id=repo_id), config_name
    )
    api.upload_file(
        path_or_fileobj=io.BytesIO(str(card).encode("utf-8")),
        path_in_repo="README.md",
        repo_id=repo_id,
        repo_type="dataset",
        commit_message=f"Update dataset card for {config_name}",
    )
    return card
