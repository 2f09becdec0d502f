"""The checkpoint format: a plain dict of tensors and metadata, loaded with ``weights_only=True``.
``state_dict`` is what a run trains: the whole images model, or a features model's head only
(``scope="head"``; the backbone is rebuilt from ``config``). Usage:
``module, config, spec = trained_module(load_checkpoint("checkpoint_best.pt", "cnn"))``.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from torch import nn

from tune_pets.config import RunConfig
from tune_pets.models import ModelSpec, get_spec
from tune_pets.utils import UserError

FORMAT = "tune_pets/1"
REQUIRED_KEYS = ("model", "scope", "config", "classes", "preprocess", "state_dict")
PREPROCESS_KEYS = ("img_size", "crop_pct", "interpolation", "mean", "std")  # ModelSpec.data_config


def make_checkpoint(
    config: RunConfig,
    spec: ModelSpec,
    classes: list[str],
    preprocess: dict,
    state_dict: dict,
    epoch: int,
    metrics: dict,
    feature_dim: int = 0,
) -> dict:
    return {
        "format": FORMAT,
        "model": spec.name,
        "scope": "model" if spec.kind == "images" else "head",
        "config": config.to_dict(),
        "classes": list(classes),
        "preprocess": dict(preprocess),
        "feature_dim": feature_dim,  # input width of a features model's head
        "epoch": epoch,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "state_dict": state_dict,
    }


def load_checkpoint(path: str | Path, expect_model: str | None = None) -> dict:
    """Load a checkpoint and check that it is a complete one (of ``expect_model``). Its
    ``file_sha256`` (not a key of the file) is the digest of the very bytes loaded: train and
    reproduce rewrite a checkpoint in place, so a second read could find another version."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--checkpoint {path} is a folder; pass the checkpoint file in it")
    if not path.is_file():
        raise UserError(f"--checkpoint {path}: file not found")
    retrain = "retrain or pass another file"
    try:
        raw = path.read_bytes()
        ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupted/truncated/foreign files fail in many ways
        raise UserError(
            f"--checkpoint {path}: not a readable checkpoint ({type(e).__name__}); {retrain}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"--checkpoint {path}: not a tune_pets checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if isinstance(pre := ckpt.get("preprocess"), dict):
        missing += [f"preprocess.{k}" for k in PREPROCESS_KEYS if k not in pre]
    if missing:
        raise UserError(
            f"--checkpoint {path}: incomplete tune_pets checkpoint (missing "
            f"{', '.join(missing)}); {retrain}"
        )
    try:
        ckpt["model"] = get_spec(ckpt["model"]).name  # also maps names of earlier versions
    except UserError as e:
        raise UserError(f"--checkpoint {path}: {e}") from None
    if expect_model and ckpt["model"] != get_spec(expect_model).name:
        raise UserError(
            f"--checkpoint {path} holds a {ckpt['model']} model, not {expect_model}; pass the "
            f"matching model name"
        )
    ckpt["file_sha256"] = hashlib.sha256(raw).hexdigest()
    return ckpt


def trained_module(
    ckpt: dict, pretrained: bool | None = None, weights: str | None = None
) -> tuple[nn.Module, RunConfig, ModelSpec]:
    """The trained module (the whole CNN, or the probe head) in eval mode, with the checkpoint's
    config (``pretrained``/``weights`` override the backbone's). Builds no backbone."""
    config = RunConfig.from_dict(ckpt["config"], "checkpoint config")
    if pretrained is not None:  # --no-pretrained: random weights, not the recorded file's
        config = config.replace(
            pretrained=pretrained, weights=config.weights if pretrained else None
        )
    if weights:
        config = config.replace(weights=weights)
    spec = get_spec(config.model)
    module = spec.trainable(config, len(ckpt["classes"]), int(ckpt.get("feature_dim", 0)))
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:  # torch's first line says only "Error(s) in loading ...": the next
        detail = [line.strip() for line in str(e).splitlines()[1:2]]  # names keys or shapes
        raise UserError(
            f"checkpoint weights do not fit the model ({' '.join(detail)[:300]})"
        ) from None
    return module.eval(), config, spec
