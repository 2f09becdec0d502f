"""Score a checkpoint on a split: accuracy, macro-F1, per-class precision/recall/F1 and the
confusion matrix.

    python -m tune_pets.evaluate cnn --checkpoint artifacts/cnn/checkpoint_best.pt \\
        --data-dir data/oxford_pets --split test

Writes ``<artifacts>/evaluate/<name>/<split>_{per_class.csv,confusion.csv,confusion.png,
metrics.json}`` and a row in ``<artifacts>/metrics.csv``. A features model's head runs on cached
backbone features: the backbone is built only when they are not cached.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tune_pets import cli, metrics
from tune_pets.checkpoint import load_checkpoint, trained_module
from tune_pets.data import check_unicode_form, class_names, default_cache_dir, heldout_split_name
from tune_pets.data import load_split
from tune_pets.engine import Batches, FitData, precision, predict
from tune_pets.figures import confusion_figure
from tune_pets.layout import result_tag
from tune_pets.models import get_spec, model_names
from tune_pets.records import write_metrics_row
from tune_pets.utils import UserError, atomic_write_csv, atomic_write_json, cli_main


@dataclass
class Evaluation:
    split: str
    classes: list[str]
    labels: np.ndarray
    preds: np.ndarray

    @property
    def n_images(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def cm(self) -> np.ndarray:
        return metrics.confusion(self.labels, self.preds, len(self.classes))

    @functools.cached_property
    def scores(self) -> dict:
        m = metrics.classification_metrics(self.labels, self.preds)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n_images": self.n_images}

    def most_confused(self, k: int = 10) -> list[tuple[str, str, int]]:
        return metrics.most_confused(self.cm, self.classes, k)

    def spread(self) -> dict:
        return metrics.prediction_spread(self.cm)

    def write(self, per_class_csv: Path, confusion_csv: Path, confusion_png: Path, title: str):
        """Per-class CSV, confusion counts CSV and the row-normalised confusion PNG."""
        per_class = metrics.per_class_rows(self.labels, self.preds, self.classes)
        atomic_write_csv(per_class_csv, per_class)
        rows = [
            {"true\\pred": c, **dict(zip(self.classes, map(int, row), strict=True))}
            for c, row in zip(self.classes, self.cm, strict=True)
        ]
        atomic_write_csv(confusion_csv, rows, ["true\\pred", *self.classes])
        s = self.scores
        title = f"{title} on {self.split}: acc {s['accuracy']:.3f}, macro-F1 {s['macro_f1']:.3f}"
        confusion_figure(self.cm, self.classes, title, confusion_png)


def evaluate_checkpoint(
    ckpt: dict,
    data_dir: str | Path,
    split: str,
    *,
    cache_dir=None,
    skip_bad: bool = False,
    device: torch.device | None = None,
    pretrained: bool | None = None,
    weights: str | None = None,
    progress: bool = True,
) -> Evaluation:
    """Predictions of ``ckpt`` on ``data_dir/split`` (nothing is written)."""
    device = device or torch.device("cpu")
    module, config, spec = trained_module(ckpt, pretrained, weights)
    pre = ckpt["preprocess"]
    classes = list(ckpt["classes"])
    split_dir = Path(data_dir) / split
    unknown = sorted(set(class_names(split_dir)) - set(classes))
    check_unicode_form(split_dir, unknown, classes, "the checkpoint's classes")
    if unknown:
        raise UserError(
            f"{split_dir}: class(es) {', '.join(map(repr, unknown[:5]))} are not among "
            f"the {len(classes)} classes the checkpoint was trained on; evaluate a "
            f"checkpoint trained on this dataset"
        )
    images = load_split(
        data_dir,
        split,
        spec.cache_res(config),
        interpolation=pre["interpolation"],
        cache_dir=cache_dir,
        skip_bad=skip_bad,
        classes=classes,
        progress=progress,
    )
    x_all = images.images
    if spec.kind == "features":  # one clean view: the backbone is built at most once, on a miss
        from tune_pets.features import cached_features

        build = functools.partial(spec.build_backbone, config)
        cache = cache_dir or default_cache_dir()
        x_all = cached_features(config, build, pre, images, cache, device, 0, progress)[0]
    data = FitData(spec.kind, classes, x_all, images.labels, preprocess=pre)
    batches = Batches(config, data, device).eval(x_all, images.labels, 64)
    preds, labels, _ = predict(module.to(device), batches, precision(config, device))
    return Evaluation(split, classes, labels, preds)


# ---------------------------------------------------------------- CLI
def build_parser() -> cli.ArgumentParser:
    p = cli.command_parser(__doc__, "python -m tune_pets.evaluate")
    cli.add_model_arg(p, "the model the checkpoint holds")
    p.add_argument("--checkpoint", required=True, help="a checkpoint_best.pt written by tune_pets")
    p.add_argument(
        "--split",
        type=cli.plain_name,
        help="split folder inside --data-dir to score (default: the held-out split, test or val)",
    )
    p.add_argument(
        "--name", type=cli.plain_name, help="name of the output folder (default: <model>-<split>)"
    )
    cli.add_data_args(p, val_split=False)
    cli.add_weights_args(p)
    cli.add_device_args(p)
    cli.add_output_args(p, runs=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.check_weights_flags(args, get_spec(args.model))
    ckpt = load_checkpoint(args.checkpoint, args.model)
    data_dir = cli.data_dir_from_args(args)
    args.split = args.split or heldout_split_name(data_dir)  # the layout accepts val/ for test/
    if not (data_dir / args.split).is_dir():
        raise UserError(f"--split {args.split}: {data_dir / args.split} does not exist")
    layout = cli.layout_from_args(args)
    name = args.name or f"{args.model}-{args.split}"
    if name in {result_tag(m, b) for m in model_names() for b in (False, True)}:
        raise UserError(
            f"--name {name}: that is a reproduce result's tag (its row in {layout.metrics_csv} "
            "would be replaced); choose another name"
        )
    ev = evaluate_checkpoint(
        ckpt,
        data_dir,
        args.split,
        device=cli.device_from_args(args),
        pretrained=False if args.no_pretrained else None,
        weights=args.weights,
        **cli.data_options(args),
    )
    out = functools.partial(layout.evaluation_file, name, args.split)
    ev.write(out("per_class.csv"), out("confusion.csv"), out("confusion.png"), name)
    s = ev.scores
    atomic_write_json(
        out("metrics.json"),
        {
            "checkpoint": str(Path(args.checkpoint).resolve()),
            "checkpoint_sha256": ckpt["file_sha256"],  # which version of that file was scored
            "checkpoint_epoch": ckpt["epoch"],
            "split": args.split,
            **s,
            "prediction_spread": ev.spread(),
            "most_confused": ev.most_confused(),
        },
    )
    write_metrics_row(layout.metrics_csv, name, args.split, {**s, "n_seeds": 1})
    print(
        f"{args.model} on {args.split} ({s['n_images']} images): accuracy {s['accuracy']:.4f}, "
        f"macro-F1 {s['macro_f1']:.4f}; wrote {layout.evaluation(name)}/"
    )
    return 0


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.evaluate")
