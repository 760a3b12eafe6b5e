"""Classification metrics from labels and predictions: accuracy and macro-F1.

With C the confusion matrix (rows: true class, columns: predicted class), class k has
``F1_k = 2 C_kk / (Σ_j C_kj + Σ_j C_jk)`` (twice the hits over its support plus its predictions, the same
as 2PR / (P + R), and 0 when there are no hits). Macro-F1 averages F1_k over the classes that occur
among the labels or the predictions, as scikit-learn's ``f1_score(average="macro")`` does: a class that
never occurs says nothing about the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import RankshareError


def classification_metrics(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> dict:
    """``{"accuracy": float, "macro_f1": float, "examples": int, "predicted": [int]}`` for class indices in
    ``[0, num_classes)``; ``predicted`` counts the predictions of each class (how one-sided a classifier is)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise RankshareError(f"num_classes must be an integer >= 1, got {num_classes!r}.")
    labels = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
    predictions = torch.as_tensor(predictions, dtype=torch.long).flatten().cpu()
    if labels.shape != predictions.shape:
        raise RankshareError(f"Got {labels.numel()} labels but {predictions.numel()} predictions; they must pair up.")
    if labels.numel() == 0:
        raise RankshareError("No examples to score; the evaluation split is empty.")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.min() < 0 or values.max() >= num_classes:
            raise RankshareError(
                f"{name} must be class indices in [0, {num_classes}), got values from {values.min().item()} "
                f"to {values.max().item()}."
            )
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)  # (true, predicted)
    hits = confusion.diagonal()
    occurrences = confusion.sum(dim=1) + confusion.sum(dim=0)  # support + predictions, per class
    present = occurrences > 0
    f1 = 2 * hits[present].double() / occurrences[present].double()
    return {
        "accuracy": hits.sum().item() / labels.numel(),
        "macro_f1": f1.mean().item(),
        "examples": labels.numel(),
        "predicted": confusion.sum(dim=0).tolist(),
    }
