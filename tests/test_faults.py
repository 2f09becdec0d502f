"""Faults a real run meets on disk: damaged decode and feature caches are detected (shape,
dtype, checksum), reported in one line, and rebuilt into the same arrays a clean run gives."""

from __future__ import annotations

import numpy as np
import pytest

from tune_pets.data import load_split
from tune_pets.engine import load_fit_data
from tune_pets.models import get_spec


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "overwrite":  # same size, different pixels: only the checksum can tell
        path.write_bytes(data[:200] + bytes(255 - b for b in data[200:]))
    elif how == "garbage":
        path.write_bytes(b"not an npy file")
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncate", "overwrite", "garbage", "delete_meta"])
def test_damaged_decode_cache_is_rebuilt(tiny_data, cache_dir, capsys, how):
    clean = load_split(tiny_data, "train", 40, cache_dir=cache_dir, progress=False)
    (arr,) = (cache_dir / "images").glob("train-*.npy")
    target = arr.with_suffix(".json") if how == "delete_meta" else arr
    _damage(target, "delete" if how == "delete_meta" else how)
    capsys.readouterr()
    again = load_split(tiny_data, "train", 40, cache_dir=cache_dir, progress=False)
    err = capsys.readouterr().err
    assert "decode cache" in err and "rebuilding" in err and len(err.strip().splitlines()) == 1
    assert np.array_equal(again.images, clean.images) and again.paths == clean.paths
    # ...and the rebuilt entry is clean again: no warning on the next read.
    load_split(tiny_data, "train", 40, cache_dir=cache_dir, progress=False)
    assert capsys.readouterr().err == ""


def test_a_killed_writers_temp_file_goes_with_the_next_write(tiny_data, cache_dir):
    """A decode killed while writing its entry left a hidden temp file (0.7 GB at full size)
    that nothing removed."""
    import os
    import time

    load_split(tiny_data, "train", 40, cache_dir=cache_dir, progress=False)
    (arr,) = (cache_dir / "images").glob("train-*.npy")
    old, live = (arr.parent / f".{arr.name}.{tag}.tmp" for tag in ("killed", "live"))
    for tmp in (old, live):
        tmp.write_bytes(b"part of an array")
    os.utime(old, (time.time() - 7200,) * 2)
    arr.unlink()  # a miss: the entry is written again
    load_split(tiny_data, "train", 40, cache_dir=cache_dir, progress=False)
    assert not old.exists() and live.exists(), "only a temp file no live writer can own goes"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "overwrite", "garbage"])
def test_damaged_feature_cache_is_rebuilt(tiny_data, cache_dir, tmp_path, capsys, how):
    cfg = get_spec("vit").defaults.replace(pretrained=False)
    split = tmp_path / "split.json"
    clean = load_fit_data(cfg, tiny_data, split_file=split, cache_dir=cache_dir, progress=False)
    (feats,) = (cache_dir / "features").glob("train-*.npy")
    _damage(feats, how)
    capsys.readouterr()
    again = load_fit_data(cfg, tiny_data, split_file=split, cache_dir=cache_dir, progress=False)
    err = capsys.readouterr().err
    assert "feature cache" in err and "rebuilding" in err and len(err.strip().splitlines()) == 1
    assert np.array_equal(again.train_x, clean.train_x) and np.array_equal(again.val_x, clean.val_x)
