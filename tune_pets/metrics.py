"""Classification metrics as pure functions of label arrays or a confusion matrix, e.g.
``classification_metrics(y_true, y_pred)`` -> ``{"accuracy": ..., "macro_f1": ...}``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Accuracy and macro-F1 over the classes present in ``y_true`` or ``y_pred`` (a class
    absent from both does not count)."""
    from sklearn.metrics import f1_score  # lazy: sklearn is slow to import

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = np.unique(np.concatenate([y_true, y_pred]))
    f1 = f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    acc = float((y_true == y_pred).mean()) if len(y_true) else 0.0
    return {"accuracy": acc, "macro_f1": float(f1)}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]``: images of true class i predicted as j."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


def per_class_rows(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> list[dict]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), zero_division=0
    )
    return [
        {
            "class": c,
            "precision": round(float(p[i]), 6),
            "recall": round(float(r[i]), 6),
            "f1": round(float(f[i]), 6),
            "support": int(s[i]),
        }
        for i, c in enumerate(classes)
    ]


def most_confused(
    cm: np.ndarray, classes: Sequence[str], k: int = 10
) -> list[tuple[str, str, int]]:
    """The ``k`` largest off-diagonal cells as (true, predicted, count)."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    pairs = [np.unravel_index(i, cm.shape) for i in np.argsort(off, axis=None)[::-1][:k]]
    return [(classes[i], classes[j], int(off[i, j])) for i, j in pairs if off[i, j] > 0]


def prediction_spread(cm: np.ndarray) -> dict:
    """How many classes the model ever predicts, and how imbalanced the true labels are: the
    two facts that explain a large gap between accuracy and macro-F1."""
    support = np.sort(cm.sum(1))[::-1]
    return {
        "classes_predicted": int((cm.sum(0) > 0).sum()),
        "num_classes": int(cm.shape[0]),
        "top3_class_share": round(float(support[:3].sum() / max(support.sum(), 1)), 4),
        "max_min_support": [int(support[0]), int(support[-1])],
    }
