"""(4) data_builders throughput: raw examples per second, and build + tokenize time for 100k examples.

Raw: `majority(n=64, k=9)` and `parity(n=64, k=9)` with one million training examples (validation and test
empty), i.e. sampling distinct bit strings, labels and the Arrow columns (bits, label, prompt, completion).
Build + tokenize: `majority(64, 9)` with 100,000 examples split 80k / 10k / 10k, then
`tokenize_for_causal_lm` with the project's bit tokenizer.
"""

from __future__ import annotations

import json

from timing import compare


def run(quick: bool = False) -> dict:
    import data_builders

    n, k = 64, 9
    raw_size = 200_000 if quick else 1_000_000
    tokenizer = data_builders.build_bit_tokenizer()

    def build_and_tokenize():
        raw = data_builders.majority(n, k, seed=0, train_size=80_000, validation_size=10_000, test_size=10_000)
        return data_builders.tokenize_for_causal_lm(raw, tokenizer)

    times = compare({
        "majority_raw": lambda: data_builders.majority(n, k, seed=0, train_size=raw_size, validation_size=0,
                                                       test_size=0),
        "parity_raw": lambda: data_builders.parity(n, k, seed=0, train_size=raw_size, validation_size=0,
                                                   test_size=0),
        "build_and_tokenize_100k": build_and_tokenize,
    }, repeats=3 if quick else 5, warmup=1)
    for stats in times.values():
        del stats["samples_s"]
    return {
        "n": n, "k": k, "raw_examples": raw_size, "times": times,
        "majority_examples_per_s": raw_size / times["majority_raw"]["median_s"],
        "parity_examples_per_s": raw_size / times["parity_raw"]["median_s"],
        "build_and_tokenize_100k_s": times["build_and_tokenize_100k"]["median_s"],
        "target_examples_per_s": 1_000_000, "target_build_and_tokenize_s": 5.0,
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
