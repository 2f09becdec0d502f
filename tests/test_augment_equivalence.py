"""The package's CPU augmentation is torchvision's RandomResizedCrop + flip + normalize.

``tune_pets.data.train_augment`` resizes each crop on uint8 with antialiased bilinear
interpolation; torchvision's tensor ``RandomResizedCrop`` does the same, so on the same crop
boxes the two must agree to uint8 rounding. The boxes come from
``random_resized_crop_params``, whose sampling rule must be torchvision's.

    python -m pytest tests/test_augment_equivalence.py -q
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from tune_pets.data import cache_res, decode_square, random_resized_crop_params, train_augment
from tune_pets.models import get_spec

SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared/data/oxford_pets_sample/train"
N_IMAGES = 16
UINT8_LEVEL = 1.0  # tolerance in 0..255 units: one rounding step of a uint8 pixel


def photo_files() -> list[Path]:
    """Real photos from ../shared, else the package's shipped sample, else none."""
    roots = [SHARED_PHOTOS]
    try:
        from tune_pets.sample import sample_dir

        roots.append(sample_dir() / "train")
    except (ImportError, FileNotFoundError):
        pass
    for root in roots:
        files = sorted(p for p in root.rglob("*.jpg")) if root.is_dir() else []
        if files:
            return files[:: max(1, len(files) // N_IMAGES)][:N_IMAGES]
    return []


@functools.cache  # decoded once per size for all cases
def cache_batch(res: int) -> torch.Tensor:
    """``[N, res, res, 3]`` uint8 squares as the decode cache holds them (random pixels when no
    photos are available: the comparison holds for any content)."""
    files = photo_files()
    if files:
        return torch.from_numpy(np.stack([decode_square(str(f), res) for f in files]))
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N_IMAGES, res, res, 3), dtype=torch.uint8, generator=gen)


def torchvision_view(
    img: torch.Tensor, box, flip: bool, size: int, antialias: bool, mean, std
) -> torch.Tensor:
    """torchvision v2: resized_crop + horizontal_flip + to float + normalize, one HWC image."""
    x0, y0, w, h = (int(v) for v in box)
    out = TF.resized_crop(
        img.permute(2, 0, 1),
        y0,
        x0,
        h,
        w,
        [size, size],
        interpolation=InterpolationMode.BILINEAR,
        antialias=antialias,
    )
    out = TF.horizontal_flip(out) if flip else out
    return TF.normalize(TF.to_dtype(out, torch.float32, scale=True), list(mean), list(std))


@pytest.mark.parametrize(
    "size, scale_min, hflip", [(128, 0.08, 0.5), (224, 0.08, 0.5), (224, 0.35, 1.0)]
)
def test_cpu_train_augment_matches_torchvision_resized_crop(size, scale_min, hflip):
    dc = get_spec("cnn").data_config(get_spec("cnn").defaults.replace(img_size=size))
    res = cache_res(size, dc["crop_pct"])
    x = cache_batch(res)
    got = train_augment(
        x, size, dc["mean"], dc["std"], scale_min, hflip, generator=torch.Generator().manual_seed(7)
    )
    # Replay train_augment's draws from the same generator: crop boxes first, then flips.
    gen = torch.Generator().manual_seed(7)
    boxes = torch.stack(
        random_resized_crop_params(len(x), res, res, (scale_min, 1.0), generator=gen), 1
    )
    flips = torch.rand(len(x), generator=gen) < hflip
    to_255 = torch.tensor(dc["std"]).view(3, 1, 1) * 255  # normalized units -> 0..255
    worst = {True: 0.0, False: 0.0}  # antialias -> max |difference| in 0..255 units
    for i in range(len(x)):
        for aa in worst:
            ref = torchvision_view(x[i], boxes[i], bool(flips[i]), size, aa, dc["mean"], dc["std"])
            worst[aa] = max(worst[aa], float(((got[i] - ref).abs() * to_255).max()))
    assert got.shape == (len(x), 3, size, size) and got.dtype == torch.float32
    assert worst[True] <= UINT8_LEVEL, f"differs from torchvision by {worst[True]:.2f} levels"
    # The tolerance is tight enough to tell: without antialiasing torchvision differs by more.
    assert worst[False] > UINT8_LEVEL


def torchvision_boxes(n: int, side: int, scale: tuple[float, float]) -> np.ndarray:
    """``n`` boxes (x0, y0, w, h) from ``RandomResizedCrop.get_params`` on a square image."""
    torch.manual_seed(0)
    img = torch.empty(3, side, side)
    params = [RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]
    return np.array([(j, i, w, h) for i, j, h, w in params], dtype=np.int64)


@pytest.mark.parametrize(
    "side, scale", [(146, (0.08, 1.0)), (256, (0.08, 1.0)), (146, (0.9, 1.0)), (64, (0.95, 1.0))]
)
def test_crop_params_follow_torchvision_sampling_rule(side, scale):
    """Same distribution of boxes as torchvision's ``get_params`` on the cache's squares.

    Not compared draw by draw: torchvision draws scale, ratio and position per attempt with the
    global RNG, the package draws all 10 attempts of a batch at once, so the same seed gives
    different streams. Instead: two-sample KS tests on x0, y0, w, h and the aspect ratio
    (seeded, so deterministic; a linear instead of log-uniform ratio fails the aspect test), and
    the share of whole-image fallbacks after 10 failed attempts (scale near 1 makes them
    common; a clamped instead of whole-image fallback fails it)."""
    from scipy.stats import ks_2samp

    n = 4000
    ref = torchvision_boxes(n, side, scale)
    ours = (
        torch.stack(
            random_resized_crop_params(
                n, side, side, scale, generator=torch.Generator().manual_seed(0)
            ),
            1,
        )
        .numpy()
        .astype(int)
    )
    for k, name in enumerate(("x0", "y0", "w", "h")):
        assert ks_2samp(ref[:, k], ours[:, k]).pvalue > 1e-3, name
    assert ks_2samp(ref[:, 2] / ref[:, 3], ours[:, 2] / ours[:, 3]).pvalue > 1e-3, "aspect"
    full_ref = np.mean((ref[:, 2] == side) & (ref[:, 3] == side))
    full_ours = np.mean((ours[:, 2] == side) & (ours[:, 3] == side))
    p = max(full_ref, 1 / n)
    assert abs(full_ref - full_ours) <= 4 * math.sqrt(2 * p * (1 - p) / n) + 1 / n
    # Positions reach both edges: x0 in [0, side - w], inclusive, as torchvision's randint.
    assert (ours[:, 0] == 0).any() and (ours[:, 0] + ours[:, 2] == side).any()
