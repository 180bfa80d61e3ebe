"""Answer-token accuracy for Boolean tasks, as an offline `evaluate.Metric`.

For a causal LM the answer is the one token whose label is not -100; the logits that predict it
sit one position earlier. Accuracy is the argmax over the two answer tokens ("0", "1") there;
`accuracy_unrestricted` is the argmax over the whole vocabulary. For a classifier with logits
(B, 2) both are the plain argmax. `preprocess_logits` reduces the logits to three integers per
example on the fly, so evaluation never holds full-vocabulary logits.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
import torch


class AnswerAccuracy(evaluate.Metric):
    """Fraction of examples whose predicted answer equals the reference (works offline)."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy of the answer token of a Boolean-function prompt.",
            citation="",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        return {"accuracy": float((predictions == references).mean()) if len(references) else float("nan")}


class AnswerTokenMetrics:
    """`preprocess_logits_for_metrics` and `compute_metrics` for the Trainer.

    Args:
        answer_ids (`tuple[int, int]` or `None`): token ids of the answers "0" and "1" for a causal
            LM; `None` for a classifier whose logits are (batch, 2) and labels (batch,).
    """

    def __init__(self, answer_ids: tuple[int, int] | None = None):
        self.answer_ids = answer_ids
        self.accuracy = AnswerAccuracy()

    def preprocess_logits(self, logits, labels):
        """(B, T, V) or (B, 2) logits -> (B, 3) long: [prediction 0/1, unrestricted correct, target 0/1]."""
        if isinstance(logits, tuple):
            logits = logits[0]
        if logits.dim() == 2:  # classifier
            pred = logits.argmax(-1)
            return torch.stack([pred, (pred == labels).long(), labels.long()], dim=-1)
        answer_mask = labels != -100
        if not bool((answer_mask.sum(-1) == 1).all()):
            raise ValueError("Each example needs exactly one label that is not -100 (the answer token).")
        position = answer_mask.long().argmax(-1)
        rows = torch.arange(labels.shape[0], device=labels.device)
        answer_logits = logits[rows, position - 1]  # logits at t-1 predict token t
        answer_token = labels[rows, position]
        ids = torch.tensor(self.answer_ids, device=logits.device)
        pred = answer_logits[:, ids].argmax(-1)
        unrestricted_correct = answer_logits.argmax(-1) == answer_token
        target = (answer_token == ids[1]).long()
        return torch.stack([pred, unrestricted_correct.long(), target], dim=-1)

    def __call__(self, eval_prediction) -> dict[str, float]:
        reduced = np.asarray(eval_prediction.predictions).reshape(-1, 3)
        accuracy = self.accuracy.compute(predictions=reduced[:, 0], references=reduced[:, 2])["accuracy"]
        return {"accuracy": accuracy, "accuracy_unrestricted": float(reduced[:, 1].mean())}
