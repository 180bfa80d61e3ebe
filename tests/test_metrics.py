"""Answer-token accuracy against a plain-Python oracle."""

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_specvol.metrics import AnswerAccuracy, AnswerTokenMetrics

ID0, ID1 = 4, 5


def _oracle(logits, labels):
    restricted, unrestricted, targets = [], [], []
    for row_logits, row_labels in zip(logits.tolist(), labels.tolist()):
        t = next(i for i, v in enumerate(row_labels) if v != -100)
        scores = row_logits[t - 1]
        restricted.append(1 if scores[ID1] > scores[ID0] else 0)
        unrestricted.append(max(range(len(scores)), key=scores.__getitem__) == row_labels[t])
        targets.append(1 if row_labels[t] == ID1 else 0)
    acc = sum(p == y for p, y in zip(restricted, targets)) / len(targets)
    return acc, sum(unrestricted) / len(targets)


def test_causal_lm_accuracy_matches_oracle():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 6, 9, generator=g)
    labels = torch.full((50, 6), -100)
    labels[:, 5] = torch.where(torch.rand(50, generator=g) > 0.5, ID1, ID0)
    metrics = AnswerTokenMetrics((ID0, ID1))
    reduced = torch.cat([metrics.preprocess_logits(logits[:20], labels[:20]),
                         metrics.preprocess_logits(logits[20:], labels[20:])])
    result = metrics(EvalPrediction(predictions=reduced.numpy(), label_ids=labels.numpy()))
    acc, acc_unrestricted = _oracle(logits, labels)
    assert result["accuracy"] == pytest.approx(acc)
    assert result["accuracy_unrestricted"] == pytest.approx(acc_unrestricted)
    assert 0 < acc < 1  # random logits: a non-trivial case


def test_classifier_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.1, 0.2]])
    labels = torch.tensor([0, 1, 1, 0])
    metrics = AnswerTokenMetrics(None)
    result = metrics(EvalPrediction(predictions=metrics.preprocess_logits(logits, labels).numpy(), label_ids=None))
    assert result["accuracy"] == pytest.approx(0.5)


def test_more_than_one_answer_token_is_an_error():
    labels = torch.full((2, 4), -100)
    labels[:, 2:] = ID1
    with pytest.raises(ValueError, match="exactly one label"):
        AnswerTokenMetrics((ID0, ID1)).preprocess_logits(torch.zeros(2, 4, 9), labels)


def test_offline_metric_module():
    assert AnswerAccuracy().compute(predictions=np.array([1, 0, 1]), references=np.array([1, 1, 1]))[
        "accuracy"] == pytest.approx(2 / 3)
