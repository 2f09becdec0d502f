"""Evaluation: metrics as pure functions, and the CLI that scores a checkpoint on a split.

    python -m tune_pets.evaluate cnn --checkpoint artifacts/cnn/checkpoint_best.pt \\
        --data-dir data/oxford_pets --split test

Writes per-class precision/recall/F1 (CSV), the confusion matrix (CSV and PNG with class names)
and upserts one row (model, split, accuracy, macro_f1) in ``<artifacts>/metrics.csv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tune_pets.utils import UserError


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    """Accuracy and macro-F1 over all ``num_classes`` (a class never predicted nor present
    counts as F1 0 only if it is present in ``y_true``; sklearn's ``labels`` semantics)."""
    from sklearn.metrics import f1_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = np.unique(np.concatenate([y_true, y_pred]))
    return {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
        ),
    }


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
    flat = np.argsort(off, axis=None)[::-1][:k]
    pairs = [np.unravel_index(i, cm.shape) for i in flat]
    return [(classes[i], classes[j], int(off[i, j])) for i, j in pairs if off[i, j] > 0]


def write_confusion(
    cm: np.ndarray, classes: Sequence[str], csv_path: Path, png_path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tune_pets.utils import atomic_savefig, atomic_write_csv

    rows = [
        {"true\\pred": c, **{cc: int(v) for cc, v in zip(classes, cm[i], strict=True)}}
        for i, c in enumerate(classes)
    ]
    atomic_write_csv(csv_path, rows, ["true\\pred", *classes])
    n = len(classes)
    side = max(6.0, 0.28 * n + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    atomic_savefig(fig, png_path, dpi=110)
    plt.close(fig)


CHECKPOINT_KEYS = ("model", "scope", "config", "classes", "preprocess", "state_dict")


def load_checkpoint(path: str | Path, expect_model: str | None = None) -> dict:
    """Load a tune_pets checkpoint safely (``weights_only=True``) and check what it is."""
    import torch

    from tune_pets.train import CHECKPOINT_FORMAT

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--checkpoint {path}: file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupted/truncated/foreign files fail in many ways
        raise UserError(
            f"--checkpoint {path}: not a readable checkpoint ({type(e).__name__}); "
            f"retrain or pass another file"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"--checkpoint {path}: not a tune_pets checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UserError(
            f"--checkpoint {path}: incomplete tune_pets checkpoint (missing {', '.join(missing)}); "
            f"retrain or pass another file"
        )
    if expect_model and ckpt["model"] != expect_model:
        from tune_pets.config import cli_name

        raise UserError(
            f"--checkpoint {path} holds a {cli_name(ckpt['model'])} model, not "
            f"{cli_name(expect_model)}; pass the matching model name"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict, pretrained: bool | None = None, weights: str | None = None):
    """Rebuild the evaluable model: the CNN, or backbone + probe head for the ViT probe."""
    from tune_pets.config import RunConfig
    from tune_pets.models import build_model

    config = RunConfig.from_dict(ckpt["config"], "checkpoint config")
    if pretrained is not None:
        config = config.replace(pretrained=pretrained)
    if weights:
        config = config.replace(weights=weights)
    model = build_model(config.model, len(ckpt["classes"]), config)
    target = model if ckpt["scope"] == "model" else model.head
    try:
        target.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(
            f"checkpoint weights do not fit the model ({str(e).splitlines()[0]})"
        ) from None
    return model.eval(), config


def evaluate_checkpoint(
    ckpt: dict,
    data_dir: str | Path,
    split: str,
    artifacts_dir: Path,
    *,
    cache_dir=None,
    skip_bad: bool = False,
    device=None,
    pretrained=None,
    weights=None,
    progress: bool = True,
    tag: str | None = None,
    write: bool = True,
) -> dict:
    """Score ``ckpt`` on ``split``; with ``write``, also write the per-class CSV, the confusion
    CSV/PNG and the metrics.csv row (under the name ``tag``, default the model)."""
    import torch

    from tune_pets.config import cli_name
    from tune_pets.data import cache_res, default_cache_dir, load_split
    from tune_pets.train import Batches, FitData, predict
    from tune_pets.utils import atomic_write_csv, upsert_csv_row

    device = device or torch.device("cpu")
    model, config = model_from_checkpoint(ckpt, pretrained, weights)
    pre = ckpt["preprocess"]
    res = cache_res(config.img_size if config.model == "cnn" else pre["img_size"], pre["crop_pct"])
    classes = list(ckpt["classes"])
    split_dir = Path(data_dir) / split
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(
            f"{split_dir}: class(es) {', '.join(map(repr, unknown[:5]))} are not among "
            f"the {len(classes)} classes the checkpoint was trained on; evaluate a "
            f"checkpoint trained on this dataset"
        )
    data_split = load_split(
        data_dir,
        split,
        res,
        interpolation=pre["interpolation"],
        cache_dir=cache_dir,
        skip_bad=skip_bad,
        classes=classes,
        progress=progress,
    )
    if data_split.classes != classes:
        raise UserError(f"{data_dir}/{split}: classes differ from the checkpoint's")
    if ckpt["scope"] == "head":
        # The probe head sees exactly what it was trained on: cached frozen-backbone features.
        from tune_pets.features import cached_features

        feats = cached_features(
            config,
            lambda: model.backbone,
            pre,
            data_split,
            cache_dir or default_cache_dir(),
            device,
            0,
            progress,
        )[0]
        model = model.head.to(device)
        data = FitData("features", classes, feats, data_split.labels, preprocess=pre)
        x_all = feats
    else:
        model = model.to(device)
        data = FitData("images", classes, data_split.images, data_split.labels, preprocess=pre)
        x_all = data_split.images
    preds, labels, _ = predict(
        model, Batches(config, data, device).eval(x_all, data_split.labels, 64), config
    )
    m = classification_metrics(labels, preds, len(classes))
    cm = confusion(labels, preds, len(classes))
    scores = {
        f"{split}_acc": m["accuracy"],
        f"{split}_macro_f1": m["macro_f1"],
        "n_images": len(labels),
        "most_confused": most_confused(cm, classes),
    }
    if not write:
        return scores
    name = tag or cli_name(config.model)
    artifacts_dir = Path(artifacts_dir)
    atomic_write_csv(
        artifacts_dir / name / f"per_class_{split}.csv", per_class_rows(labels, preds, classes)
    )
    write_confusion(
        cm,
        classes,
        artifacts_dir / f"confusion_{name}.csv",
        artifacts_dir / f"confusion_{name}.png",
        f"{name} on {split}: acc {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}",
    )
    upsert_csv_row(
        artifacts_dir / "metrics.csv",
        {
            "model": name,
            "split": split,
            "accuracy": round(m["accuracy"], 6),
            "macro_f1": round(m["macro_f1"], 6),
            "n_images": len(labels),
        },
        key=("model", "split"),
    )
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    from tune_pets.config import canonical_model
    from tune_pets.utils import ArgumentParser, resolve_device

    p = ArgumentParser(prog="python -m tune_pets.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=["cnn", "vit"])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", default="data/oxford_pets")
    p.add_argument("--split", default="test", help="split folder to score (default test)")
    p.add_argument("--artifacts-dir", default="artifacts")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--no-pretrained", action="store_true", help="ViT: random-init backbone")
    p.add_argument("--weights", default=None, help="ViT: local backbone weights file")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint, canonical_model(args.model))
    from tune_pets.data import check_data_dir

    data_dir = check_data_dir(args.data_dir)
    if not (data_dir / args.split).is_dir():
        raise UserError(f"--split {args.split}: {data_dir / args.split} does not exist")
    pretrained = False if args.no_pretrained else None
    out = evaluate_checkpoint(
        ckpt,
        data_dir,
        args.split,
        Path(args.artifacts_dir),
        cache_dir=args.cache_dir,
        skip_bad=args.skip_bad_images,
        device=resolve_device(args.device),
        pretrained=pretrained,
        weights=args.weights,
        progress=not args.no_progress,
    )
    print(
        f"{args.model} on {args.split} ({out['n_images']} images): "
        f"accuracy {out[f'{args.split}_acc']:.4f}, macro-F1 {out[f'{args.split}_macro_f1']:.4f}"
    )
    return 0


if __name__ == "__main__":
    from tune_pets.utils import cli_main

    cli_main(main, prog="python -m tune_pets.evaluate")
