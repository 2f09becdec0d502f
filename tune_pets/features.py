"""Frozen-backbone features for the ViT probe, cached on disk.

    feats = cached_features(config, get_backbone, dc, split, cache_dir, device)  # [V, N, 2, D]

The backbone is frozen, so it runs once per split (and per augmented view) and every probe fit
trains only the head on the cached CLS-token and patch-mean features (pooling stays searchable).
Extraction always runs in full fp32 (TF32 off), so a clean entry does not depend on the device
that made it;
an augmented view's crops are resampled one way on CPU and another on CUDA (see
``data.train_augment``), so views are keyed by the device type.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tune_pets.backbone import backbone_tag, token_features
from tune_pets.config import RunConfig
from tune_pets.data import ImageSplit, eval_transform, iterate_indices, load_entry, progress_bar
from tune_pets.data import save_entry, to_device_uint8, train_augment

BACKBONE_BATCH_SIZE = 64  # images per backbone forward pass in ``extract``


def feature_key(
    config: RunConfig, dc: dict, split: ImageSplit, view: int | None, device: torch.device
) -> str:
    """Cache key: backbone weights, preprocessing, the exact images (fingerprint + paths), view
    (and for a view, the device type: its resampling)."""
    aug = "clean"
    if view is not None:
        aug = f"view{view}-s{config.aug_scale_min}-f{config.hflip}-{device.type}"
    paths = hashlib.sha1("\n".join(split.paths).encode()).hexdigest()
    key = [backbone_tag(config), dc, split.fingerprint, paths, split.images.shape[1], aug]
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def full_fp32():
    """TF32 off, then restored. cuDNN runs fp32 convolutions in TF32 by default on Ampere and
    newer GPUs (10-bit mantissa): the patch embedding of a GPU-made clean entry differed from a
    CPU-made one under the same key, and whichever machine filled the cache decided the
    features a later CPU reproduce read."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    was = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = was


@torch.no_grad()
@full_fp32()
def extract(
    backbone: torch.nn.Module,
    split: ImageSplit,
    dc: dict,
    device: torch.device,
    view: int | None = None,
    aug_scale_min: float = 0.08,
    hflip: float = 0.5,
    batch_size: int = BACKBONE_BATCH_SIZE,
    progress: bool = True,
) -> np.ndarray:
    """Run the frozen backbone over ``split``: the clean eval transform, or augmented view
    ``view`` (RandomResizedCrop with scale ``(aug_scale_min, 1)`` + flip, seeded by ``view``)."""
    backbone = backbone.eval().to(device)
    gen = torch.Generator().manual_seed(10_007 + (view or 0))
    batches = list(iterate_indices(len(split), batch_size, shuffle=False))
    desc = f"features {split.name}" + ("" if view is None else f" view {view}")
    out = []
    for idx in progress_bar(batches, len(batches), desc, progress, leave=False, unit="it"):
        x = to_device_uint8(split.images, idx, device)
        if view is None:
            x = eval_transform(x, dc["img_size"], dc["crop_pct"], dc["mean"], dc["std"])
        else:
            x = train_augment(
                x, dc["img_size"], dc["mean"], dc["std"], aug_scale_min, hflip, generator=gen
            )
        out.append(token_features(backbone, x).float().cpu().numpy())
    return np.concatenate(out)


def cached_features(
    config: RunConfig,
    get_backbone: Callable[[], torch.nn.Module],
    dc: dict,
    split: ImageSplit,
    cache_dir: Path,
    device: torch.device,
    views: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Features ``[V, N, 2, D]`` for ``split``: V=1 clean view, or ``views`` augmented views.

    ``get_backbone`` is called only on a cache miss, so a fully cached split builds no model
    (and downloads no weights); pass a cached builder to build it at most once per process.
    """
    arrays = []
    for view in [None] if views == 0 else range(views):
        key = feature_key(config, dc, split, view, device)
        path = Path(cache_dir) / "features" / f"{split.name}-{key}.npy"
        entry = load_entry(path, "feature cache", functools.partial(_check, n=len(split)))
        if entry is not None:
            feats = entry[1]
        else:
            aug = (config.aug_scale_min, config.hflip)
            feats = extract(get_backbone(), split, dc, device, view, *aug, progress=progress)
            save_entry(path, feats, {})
        arrays.append(feats)
    return np.stack(arrays)


def _check(meta: dict, arr: np.ndarray, n: int) -> str | None:
    """Why a cached feature array is not ``[n, 2, D]`` finite float32 (None: it is)."""
    if arr.dtype != np.float32 or arr.ndim != 3 or arr.shape[:2] != (n, 2):
        return f"shape {arr.shape} dtype {arr.dtype}, expected ({n}, 2, D) float32"
    return None if np.isfinite(arr).all() else "non-finite values"
