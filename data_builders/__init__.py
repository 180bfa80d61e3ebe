"""Boolean benchmark tasks (sparse majority / parity) as typed `datasets.DatasetDict`s.

Example:

```python
>>> from data_builders import build_bit_tokenizer, majority, tokenize_for_causal_lm
>>> ds = majority(n=64, k=3, seed=0, train_size=10_000)
>>> lm = tokenize_for_causal_lm(ds, build_bit_tokenizer())
```
"""

from .boolean import majority, parity, task_metadata
from .card import dataset_card, default_config_name, push_dataset_to_hub
from .tokenization import answer_token_ids, build_bit_tokenizer, tokenize_for_causal_lm

__all__ = [
    "answer_token_ids",
    "build_bit_tokenizer",
    "dataset_card",
    "default_config_name",
    "majority",
    "parity",
    "push_dataset_to_hub",
    "task_metadata",
    "tokenize_for_causal_lm",
]
