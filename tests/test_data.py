"""Data: decoding odd image files, scanning ImageFolder trees, the decode-once cache, the seeded
stratified val split and the batched tensor transforms."""

from __future__ import annotations

import gc
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tune_pets.data import (
    BadImageError,
    cache_res,
    default_cache_dir,
    eval_transform,
    load_or_make_val_split,
    load_rgb,
    load_split,
    random_resized_crop_params,
    scan_split,
    stratified_split,
    train_augment,
)
from tune_pets.config import RunConfig
from tune_pets.engine import load_fit_data
from tune_pets.models import CNN_MEAN, CNN_STD
from tune_pets.utils import UserError


def _noise(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


def _save_jpeg(path, w=40, h=30, seed=0) -> None:
    Image.fromarray(_noise(h, w, seed=seed)).save(path, "JPEG", quality=90)


# ---------------------------------------------------------------- load_rgb
def _gif(p):
    Image.fromarray(_noise(30, 40)).convert("P").save(p, "GIF")


def _rgba_png_named_jpg(p):
    arr = np.dstack([_noise(30, 40), np.full((30, 40), 255, np.uint8)])
    arr[:10, :, 3] = 0  # fully transparent top rows
    Image.fromarray(arr, "RGBA").save(p, "PNG")


def _palette_png_with_transparency(p):
    img = Image.fromarray(_noise(30, 40)).convert("P")
    img.save(p, "PNG", transparency=0)


def _grayscale(p):
    Image.fromarray(_noise(30, 40, 1)[..., 0], "L").save(p, "JPEG")


def _cmyk_jpeg(p):
    Image.fromarray(_noise(30, 40, 4), "CMYK").save(p, "JPEG")


def _png16(p):
    ramp = np.linspace(0, 60_000, 30 * 40).reshape(30, 40).astype(np.uint16)
    Image.fromarray(ramp).save(p, "PNG")
    assert Image.open(p).mode.startswith("I"), "the fixture must really be a 16-bit PNG"


def _la_png(p):
    Image.fromarray(
        np.dstack([_noise(30, 40, 1)[..., 0], np.full((30, 40), 128, np.uint8)]), "LA"
    ).save(p, "PNG")


def _bilevel(p):
    Image.fromarray(_noise(30, 40, 1)[..., 0] > 127).save(p, "PNG")


@pytest.mark.parametrize(
    "name, write",
    [
        ("a.gif", _gif),
        ("rgba.jpg", _rgba_png_named_jpg),
        ("pal.png", _palette_png_with_transparency),
        ("gray.jpg", _grayscale),
        ("cmyk.jpg", _cmyk_jpeg),
        ("deep.png", _png16),
        ("la.png", _la_png),
        ("bw.png", _bilevel),
    ],
)
def test_load_rgb_any_mode_gives_rgb(tmp_path, name, write):
    p = tmp_path / name
    write(p)
    img = load_rgb(p)
    assert img.mode == "RGB"
    assert img.size == (40, 30)
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (30, 40, 3)


def test_load_rgb_rgba_composites_over_white(tmp_path):
    p = tmp_path / "rgba.jpg"
    _rgba_png_named_jpg(p)
    arr = np.asarray(load_rgb(p))
    assert (arr[:10] == 255).all()  # transparent -> white, not black
    assert (arr[10:] != 255).any()


def test_load_rgb_16bit_png_keeps_its_range(tmp_path):
    p = tmp_path / "deep.png"
    _png16(p)
    arr = np.asarray(load_rgb(p)).astype(int)
    assert (arr[..., 0] == arr[..., 1]).all()  # gray stays gray
    assert arr.min() < 20 and 200 < arr.max()  # a ramp, not clipped to white
    assert (arr == 255).mean() < 0.05
    assert 80 < arr.mean() < 160


def test_load_rgb_float_tiff_in_0_1_is_not_black(tmp_path):
    """A mode-F TIFF with values in [0, 1] (the float convention) once loaded all black."""
    p = tmp_path / "float.tif"
    Image.fromarray(np.linspace(0, 1, 30 * 40, dtype=np.float32).reshape(30, 40), "F").save(p)
    arr = np.asarray(load_rgb(p)).astype(int)
    assert arr.min() == 0 and arr.max() == 255 and 100 < arr.mean() < 155


def test_load_rgb_applies_exif_orientation(tmp_path):
    p = tmp_path / "rotated.jpg"
    img = Image.fromarray(_noise(20, 40))
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    img.save(p, "JPEG", exif=exif)
    assert Image.open(p).size == (40, 20)
    out = load_rgb(p)
    assert out.mode == "RGB" and out.size == (20, 40)


def test_load_rgb_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(BadImageError, match=r"empty\.jpg.*0 bytes"):
        load_rgb(p)


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_load_rgb_truncated_jpeg(tmp_path, keep):
    p = tmp_path / "cut.jpg"
    _save_jpeg(p, 64, 64)
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BadImageError, match=r"cut\.jpg"):
        load_rgb(p)


@pytest.mark.parametrize("limit", [1000, 500])  # 1200 px: over the limit (warning), over 2x
def test_load_rgb_refuses_decompression_bombs(tmp_path, monkeypatch, limit):
    p = tmp_path / "big.png"
    Image.fromarray(_noise(30, 40)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(BadImageError, match=r"big\.png.*decompression bomb"):
        load_rgb(p)


def test_load_rgb_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("not an image")
    with pytest.raises(BadImageError, match=r"notes\.jpg"):
        load_rgb(p)


# ---------------------------------------------------------------- scan_split
def test_scan_split_ignores_non_images_and_accepts_odd_extensions(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", {"a": (2, 1), "b c": (2, 1)})
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "train" / "a" / "README.txt").write_text("about these photos")
    (root / "train" / "a" / "notes.dat").write_bytes(b"random bytes, not an image")
    (root / "train" / ".hidden_class").mkdir()
    _save_jpeg(root / "train" / ".hidden_class" / "x.jpg")
    Image.fromarray(_noise(30, 40)).save(root / "train" / "b c" / "x.dat", "PNG")

    idx = scan_split(root, "train")
    assert idx.classes == ["a", "b c"]
    assert "train/b c/x.dat" in idx.paths
    assert len(idx.paths) == 5
    names = {p.rsplit("/", 1)[1] for p in idx.paths}
    assert not names & {".DS_Store", "README.txt", "notes.dat"}
    assert {"train/a/README.txt", "train/a/.DS_Store", "train/a/notes.dat"} <= set(idx.ignored)
    assert [idx.labels[idx.paths.index(p)] for p in idx.paths if "/b c/" in p] == [1, 1, 1]


def test_scan_split_heldout_uses_train_class_order(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", {"a": (1, 1), "b": (1, 0), "c": (1, 1)})
    idx = scan_split(root, "test", classes=["a", "b", "c"])
    assert idx.classes == ["a", "b", "c"]
    assert sorted(idx.labels) == [0, 2]


def test_scan_split_class_only_in_test(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", {"a": (2, 1), "b": (2, 1)})
    (root / "test" / "zebra").mkdir()
    _save_jpeg(root / "test" / "zebra" / "z.jpg")
    train = scan_split(root, "train")
    with pytest.raises(UserError, match="zebra"):
        scan_split(root, "test", classes=train.classes)


def test_a_test_class_in_another_unicode_form_is_named_as_such(tmp_path, make_image_folder):
    """'Café' copied from macOS is 'Cafe' + a combining accent: it looked identical in the
    message that said it was not in train/."""
    import unicodedata

    root = make_image_folder(tmp_path / "d", {"Café": (2, 0), "b": (2, 1)})
    (root / "test" / unicodedata.normalize("NFD", "Café")).mkdir()
    _save_jpeg(root / "test" / unicodedata.normalize("NFD", "Café") / "z.jpg")
    train = scan_split(root, "train")
    with pytest.raises(UserError, match="another Unicode form"):
        scan_split(root, "test", classes=train.classes)


def test_one_class_and_a_name_that_is_not_utf8_are_refused(tmp_path, make_image_folder):
    """One class scored val_acc 1.0 and meant nothing; a file name of bytes that are not
    UTF-8 failed with a UnicodeEncodeError traceback in the data fingerprint."""
    one = make_image_folder(tmp_path / "one", {"a": (2, 1)})
    with pytest.raises(UserError, match=r"train has 1 class folder; a classifier needs at least 2"):
        load_fit_data(RunConfig(img_size=32), one, full_train=True, cache_dir=tmp_path / "c")
    root = make_image_folder(tmp_path / "d", {"a": (2, 1), "b": (2, 1)})
    odd = os.fsdecode(os.fsencode(root / "train" / "a") + b"/img\xfe.jpg")
    _save_jpeg(odd)
    with pytest.raises(UserError, match=r"img\\xfe.jpg: the name is not UTF-8; rename it"):
        scan_split(root, "train")


@pytest.mark.parametrize("junk", [None, "README.txt"])
def test_scan_split_empty_train_class(tmp_path, make_image_folder, junk):
    root = make_image_folder(tmp_path / "d", {"a": (2, 1)})
    (root / "train" / "empty one").mkdir()
    if junk:
        (root / "train" / "empty one" / junk).write_text("x")
    with pytest.raises(UserError, match="empty one.*no images"):
        scan_split(root, "train")


def test_load_split_missing_data_dir(tmp_path, cache_dir):
    with pytest.raises(UserError, match="--data-dir"):
        load_split(tmp_path / "nowhere", "train", 36, cache_dir=cache_dir)


def test_load_split_missing_train_dir(tmp_path, cache_dir):
    (tmp_path / "d" / "test" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match=r"--data-dir.*train/"):
        load_split(tmp_path / "d", "train", 36, cache_dir=cache_dir)


def test_load_split_needs_a_heldout_split(tmp_path, make_image_folder, cache_dir):
    root = make_image_folder(tmp_path / "d", {"a": (2, 0), "b": (2, 0)})
    with pytest.raises(UserError, match="held-out"):
        load_split(root, "train", 24, cache_dir=cache_dir, progress=False)
    (root / "val").mkdir()  # the homework's name for it is accepted too
    assert len(load_split(root, "train", 24, cache_dir=cache_dir, progress=False)) == 4


# ---------------------------------------------------------------- load_split and its cache
def test_load_split_shapes_and_labels(tiny_data, cache_dir):
    s = load_split(tiny_data, "train", 36, cache_dir=cache_dir, progress=False)
    assert s.images.shape == (40, 36, 36, 3) and s.images.dtype == np.uint8
    assert s.labels.dtype == np.int64 and s.labels.shape == (40,)
    assert s.classes == ["Abyssinian", "chat été", "golden retriever", "pug"]
    assert np.bincount(s.labels).tolist() == [10, 10, 10, 10]
    for path, label in zip(s.paths, s.labels, strict=True):
        assert path.startswith(f"train/{s.classes[label]}/")
    # Each class's tint survives decoding: images are not blank.
    means = np.stack([s.images[s.labels == c].mean(axis=(0, 1, 2)) for c in range(4)])
    assert np.unique(means.round(), axis=0).shape[0] == 4
    test = load_split(tiny_data, "test", 36, cache_dir=cache_dir, classes=s.classes, progress=False)
    assert len(test) == 16 and test.classes == s.classes


def test_load_split_second_call_hits_the_cache(tiny_data, cache_dir):
    first = load_split(tiny_data, "train", 36, cache_dir=cache_dir, progress=False)
    arrays = list((cache_dir / "images").glob("*.npy"))
    assert len(arrays) == 1
    mtime = arrays[0].stat().st_mtime_ns
    second = load_split(tiny_data, "train", 36, cache_dir=cache_dir, progress=False)
    assert arrays[0].stat().st_mtime_ns == mtime
    assert list((cache_dir / "images").glob("*.npy")) == arrays
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.paths == second.paths and first.fingerprint == second.fingerprint
    # Another resolution is another cache entry.
    load_split(tiny_data, "train", 20, cache_dir=cache_dir, progress=False)
    assert len(list((cache_dir / "images").glob("*.npy"))) == 2


def test_cache_is_invalidated_when_a_file_changes(tmp_path, make_image_folder, cache_dir):
    root = make_image_folder(tmp_path / "d", {"a": (3, 1), "b": (3, 1)})
    first = load_split(root, "train", 24, cache_dir=cache_dir, progress=False)
    _save_jpeg(root / "train" / "a" / "a_0.jpg", 50, 50, seed=123)
    st = (root / "train" / "a" / "a_0.jpg").stat()
    os.utime(root / "train" / "a" / "a_0.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = load_split(root, "train", 24, cache_dir=cache_dir, progress=False)
    assert second.fingerprint != first.fingerprint
    assert not np.array_equal(first.images[0], second.images[0])
    np.testing.assert_array_equal(first.images[1:], second.images[1:])


def test_load_split_center_crops_the_shorter_side(tmp_path, cache_dir):
    root = tmp_path / "d"
    (root / "train" / "a").mkdir(parents=True)
    arr = np.zeros((40, 80, 3), np.uint8)  # wide: left quarter red, right quarter blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:60] = (0, 255, 0)
    arr[:, 60:] = (0, 0, 255)
    Image.fromarray(arr).save(root / "train" / "a" / "x.png")
    (root / "test" / "a").mkdir(parents=True)
    img = load_split(root, "train", 20, cache_dir=cache_dir, progress=False).images[0]
    assert img.shape == (20, 20, 3)
    assert (img[..., 1] > 200).all()  # only the green center is kept


def test_an_animated_gif_is_decoded_and_its_file_closed(tmp_path):
    """PIL keeps a GIF's file open for its other frames: each one named .jpg (the real data
    has some) left an open file behind until the garbage collector came."""
    frames = [Image.new("P", (40, 30), i) for i in (0, 1)]
    frames[0].save(tmp_path / "cat.jpg", format="GIF", save_all=True, append_images=frames[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_rgb(tmp_path / "cat.jpg").size == (40, 30)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_odd_files_decode_through_the_cache(tmp_path, cache_dir):
    """Every odd format goes through decode_square (JPEG draft mode included) to RGB squares;
    an EXIF-rotated photo is cached upright."""
    root = tmp_path / "d"
    folder = root / "train" / "a"
    folder.mkdir(parents=True)
    (root / "test").mkdir()
    for name, write in [
        ("a.gif", _gif),
        ("rgba.jpg", _rgba_png_named_jpg),
        ("pal.png", _palette_png_with_transparency),
        ("gray.jpg", _grayscale),
        ("cmyk.jpg", _cmyk_jpeg),
        ("deep.png", _png16),
    ]:
        write(folder / name)
    stored = np.zeros((40, 80, 3), np.uint8)  # stored sideways: left half red, right half blue
    stored[:, :40] = (255, 0, 0)
    stored[:, 40:] = (0, 0, 255)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: red on top, blue below
    img.save(folder / "rotated.jpg", "JPEG", exif=exif, quality=95)

    s = load_split(root, "train", 12, cache_dir=cache_dir, progress=False)
    assert len(s) == 7 and s.images.shape == (7, 12, 12, 3) and not s.skipped
    up = s.images[s.paths.index("train/a/rotated.jpg")].astype(int)
    assert (up[:5, :, 0] > 200).all() and (up[:5, :, 2] < 60).all()  # top rows red
    assert (up[-5:, :, 2] > 200).all() and (up[-5:, :, 0] < 60).all()  # bottom rows blue


def test_parallel_decode_matches_serial(tmp_path, make_image_folder):
    """Over 64 files the decode runs in worker processes: same arrays, same bad-file report."""
    root = make_image_folder(tmp_path / "d", {"a": (36, 1), "b": (36, 1)})
    (root / "train" / "b" / "zero.jpg").write_bytes(b"")
    serial = load_split(
        root, "train", 16, cache_dir=tmp_path / "c1", skip_bad=True, workers=1, progress=False
    )
    parallel = load_split(
        root, "train", 16, cache_dir=tmp_path / "c2", skip_bad=True, workers=2, progress=False
    )
    assert len(parallel) == 72
    np.testing.assert_array_equal(serial.images, parallel.images)
    np.testing.assert_array_equal(serial.labels, parallel.labels)
    assert serial.paths == parallel.paths
    assert serial.skipped == parallel.skipped and "zero.jpg" in parallel.skipped[0]


def test_skip_bad_images(tmp_path, make_image_folder, cache_dir, capsys):
    root = make_image_folder(tmp_path / "d", {"a": (3, 1), "b": (3, 1)})
    (root / "train" / "b" / "broken.jpg").write_bytes(b"")
    with pytest.raises(UserError) as e:
        load_split(root, "train", 24, cache_dir=cache_dir, progress=False)
    assert "broken.jpg" in str(e.value) and "--skip-bad-images" in str(e.value)

    s = load_split(root, "train", 24, cache_dir=cache_dir, skip_bad=True, progress=False)
    assert len(s) == 6 and s.images.shape[0] == 6
    assert not any("broken" in p for p in s.paths)
    assert len(s.skipped) == 1 and "broken.jpg" in s.skipped[0]
    assert "skipped 1 bad image(s)" in capsys.readouterr().err
    # The cached result remembers the bad file: without the flag it still fails.
    with pytest.raises(UserError, match="broken.jpg"):
        load_split(root, "train", 24, cache_dir=cache_dir, progress=False)
    again = load_split(root, "train", 24, cache_dir=cache_dir, skip_bad=True, progress=False)
    assert again.paths == s.paths and again.skipped == s.skipped
    assert "broken.jpg" in capsys.readouterr().err  # listed from the cache too (it was not)


def test_a_class_whose_images_are_all_skipped_is_an_error(tmp_path, make_image_folder, cache_dir):
    """It trained as a class with no images at all (and scored 0 on its test images)."""
    root = make_image_folder(tmp_path / "d", {"a": (3, 1), "b": (2, 1)})
    for f in (root / "train" / "b").iterdir():
        f.write_bytes(b"")
    for _ in range(2):  # decoded, then from the cache
        with pytest.raises(UserError, match=r"train/b has no readable images \(all skipped"):
            load_split(root, "train", 24, cache_dir=cache_dir, skip_bad=True, progress=False)


def test_train_read_in_a_checkpoints_class_order_may_lack_a_class(
    tmp_path, make_image_folder, cache_dir
):
    """``evaluate --split train`` reads train/ with the checkpoint's classes: one that train/ has
    no folder for was blamed on --skip-bad-images, which nobody passed."""
    root = make_image_folder(tmp_path / "d", {"a": (2, 1), "b": (2, 1)})
    s = load_split(root, "train", 24, cache_dir=cache_dir, classes=["a", "b", "c"], progress=False)
    assert s.classes == ["a", "b", "c"] and sorted(set(s.labels.tolist())) == [0, 1]


def test_an_empty_cache_variable_means_the_default_cache(monkeypatch):
    monkeypatch.setenv("TUNE_PETS_CACHE", "")
    assert default_cache_dir() == Path.home() / ".cache" / "tune_pets"


def test_a_broken_symlink_is_a_bad_image(tmp_path, make_image_folder, cache_dir):
    """A dangling link was skipped silently (``is_file()`` is False for it), so the data ran
    short without a word; now it is a bad image like any unreadable file."""
    root = make_image_folder(tmp_path / "d", {"a": (3, 1), "b": (3, 1)})
    (root / "train" / "b" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(UserError, match=r"gone.jpg: a broken symlink \(to .*nowhere.jpg\)"):
        load_split(root, "train", 24, cache_dir=cache_dir, progress=False)
    s = load_split(root, "train", 24, cache_dir=cache_dir, skip_bad=True, progress=False)
    assert len(s) == 6 and "gone.jpg" in s.skipped[0]


def test_several_bad_images_are_counted(tmp_path, make_image_folder, cache_dir):
    root = make_image_folder(tmp_path / "d", {"a": (2, 1), "b": (2, 1)})
    (root / "train" / "a" / "bad1.jpg").write_bytes(b"")
    (root / "train" / "a" / "bad2.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match=r"and 1 more"):
        load_split(root, "train", 24, cache_dir=cache_dir, progress=False)


# ---------------------------------------------------------------- the val split
def test_stratified_split_invariants():
    labels = np.array([0] * 20 + [1] * 7 + [2] * 2 + [3] * 1 + [4] * 50)
    tr, va = stratified_split(labels, 0.2, seed=0)
    assert not set(tr) & set(va)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(labels)))
    for c in range(5):
        n = (labels == c).sum()
        n_val = (labels[va] == c).sum()
        if n >= 2:
            assert n_val >= 1 and (labels[tr] == c).sum() >= 1
        else:
            assert n_val == 0
    assert (labels[va] == 4).sum() == 10 and (labels[va] == 0).sum() == 4


def test_stratified_split_is_seeded():
    labels = np.repeat(np.arange(5), 40)
    a = stratified_split(labels, 0.25, seed=3)
    b = stratified_split(labels, 0.25, seed=3)
    c = stratified_split(labels, 0.25, seed=4)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


def test_val_split_file_written_and_reused(tiny_data, cache_dir, tmp_path):
    train = load_split(tiny_data, "train", 36, cache_dir=cache_dir, progress=False)
    split_file = tmp_path / "out" / "val_split.json"
    tr, va = load_or_make_val_split(train, split_file, 0.2, seed=0)
    saved = json.loads(split_file.read_text(encoding="utf-8"))
    assert saved["train"] == tr.paths and saved["val"] == va.paths
    assert saved["seed"] == 0 and saved["val_fraction"] == 0.2
    assert saved["fingerprint"] == train.fingerprint
    assert len(va) == 8 and len(tr) == 32
    assert np.bincount(va.labels).tolist() == [2, 2, 2, 2]
    assert not set(tr.paths) & set(va.paths)
    for sub in (tr, va):  # images travel with their paths and labels
        for img, path in zip(sub.images, sub.paths, strict=True):
            np.testing.assert_array_equal(img, train.images[train.paths.index(path)])

    # Reused as written: edit the file and the edit is what comes back.
    moved = saved["train"].pop(0)
    saved["val"].append(moved)
    split_file.write_text(json.dumps(saved), encoding="utf-8")
    tr2, va2 = load_or_make_val_split(train, split_file, 0.2, seed=0)
    assert moved in va2.paths and moved not in tr2.paths and len(va2) == 9

    # Another seed is another split, and the file is rewritten for it.
    tr3, va3 = load_or_make_val_split(train, split_file, 0.2, seed=1)
    assert json.loads(split_file.read_text(encoding="utf-8"))["seed"] == 1
    assert va3.paths != va.paths and len(va3) == 8

    # A resumed search (reuse_only) goes on with the saved split or stops; never a new one.
    before = split_file.read_text(encoding="utf-8")
    assert load_or_make_val_split(train, split_file, 0.2, seed=1, reuse_only=True)[1].paths == (
        va3.paths
    )
    with pytest.raises(UserError, match="does not match the train images"):
        load_or_make_val_split(train, split_file, 0.2, seed=0, reuse_only=True)
    assert split_file.read_text(encoding="utf-8") == before


@pytest.mark.parametrize("content", [b"{ half a json", b"[1]", b"\xff\xfe{}"])
def test_broken_val_split_file_is_replaced(tiny_data, cache_dir, tmp_path, content):
    """Half a file, JSON of another shape, not UTF-8: the last two were tracebacks."""
    train = load_split(tiny_data, "train", 36, cache_dir=cache_dir, progress=False)
    split_file = tmp_path / "val_split.json"
    split_file.write_bytes(content)
    tr, va = load_or_make_val_split(train, split_file, 0.2, seed=0)
    assert json.loads(split_file.read_text(encoding="utf-8"))["val"] == va.paths


# ---------------------------------------------------------------- tensor transforms
def _batch(n=4, res=36, seed=0) -> torch.Tensor:
    return torch.from_numpy(_noise(n * res, res, seed=seed).reshape(n, res, res, 3))


def _smooth_batch(n=3, res=36) -> torch.Tensor:
    yy, xx = np.mgrid[0:res, 0:res] / res
    imgs = [np.stack([np.sin(3 * xx + k), np.cos(2 * yy - k), xx * yy], -1) for k in range(n)]
    return torch.from_numpy(((np.stack(imgs) + 1) * 100).clip(0, 255).astype(np.uint8))


def test_train_augment_shape_finite_and_seeded():
    x = _batch()
    out = train_augment(x, 32, CNN_MEAN, CNN_STD, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    again = train_augment(x, 32, CNN_MEAN, CNN_STD, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    other = train_augment(x, 32, CNN_MEAN, CNN_STD, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out, other)


def test_train_augment_without_randomness_is_the_eval_view():
    """scale (1, 1) and no flip on a square image: the whole image, no distortion."""
    x = _batch(res=32)
    aug = train_augment(
        x,
        32,
        CNN_MEAN,
        CNN_STD,
        scale_min=1.0,
        hflip=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    ref = eval_transform(x, 32, 1.0, CNN_MEAN, CNN_STD)
    torch.testing.assert_close(aug, ref, atol=1e-5, rtol=0)
    flipped = train_augment(
        x,
        32,
        CNN_MEAN,
        CNN_STD,
        scale_min=1.0,
        hflip=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(flipped, ref.flip(-1), atol=1e-5, rtol=0)


def test_train_augment_resize_matches_eval_resize_on_smooth_images():
    x = _smooth_batch(res=36)
    aug = train_augment(
        x,
        32,
        CNN_MEAN,
        CNN_STD,
        scale_min=1.0,
        hflip=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    ref = eval_transform(x, 32, 1.0, CNN_MEAN, CNN_STD)
    assert (aug - ref).abs().mean() < 0.02
    assert (aug - ref).abs().max() < 0.1


@pytest.mark.parametrize(
    "size, crop_pct", [(32, 0.875), (40, 0.875), (224, 0.875), (224, 0.9), (33, 0.9)]
)
def test_eval_transform_is_an_exact_center_crop_of_the_cache(size, crop_pct):
    res = cache_res(size, crop_pct)
    x = _batch(n=2, res=res)
    out = eval_transform(x, size, crop_pct, CNN_MEAN, CNN_STD)
    top = (res - size) // 2
    crop = x[:, top : top + size, top : top + size].permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CNN_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CNN_STD).view(1, 3, 1, 1)
    assert out.shape == (2, 3, size, size)
    torch.testing.assert_close(out, (crop - mean) / std, atol=1e-6, rtol=0)


def test_eval_transform_from_a_larger_cache_resizes():
    x = _smooth_batch(res=72)  # cache built for img_size 64, eval at 32
    out = eval_transform(x, 32, 0.875, CNN_MEAN, CNN_STD)
    assert out.shape == (3, 3, 32, 32) and torch.isfinite(out).all()
    ref = eval_transform(
        torch.from_numpy(
            np.stack(
                [
                    np.asarray(Image.fromarray(im).resize((36, 36), Image.Resampling.BILINEAR))
                    for im in x.numpy()
                ]
            )
        ),
        32,
        0.875,
        CNN_MEAN,
        CNN_STD,
    )
    assert (out - ref).abs().mean() < 0.03


@pytest.mark.parametrize(
    "h, w, scale",
    [
        (36, 36, (0.08, 1.0)),
        (30, 50, (0.08, 1.0)),
        (50, 30, (0.5, 1.0)),
        (7, 300, (0.9, 1.0)),
        (36, 36, (1.0, 1.0)),
    ],
)
def test_random_resized_crop_boxes_stay_inside(h, w, scale):
    x0, y0, cw, ch = random_resized_crop_params(
        2000, h, w, scale, generator=torch.Generator().manual_seed(0)
    )
    for t in (x0, y0, cw, ch):
        assert t.shape == (2000,)
        assert torch.equal(t, t.round())
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (cw >= 1).all() and (ch >= 1).all()
    assert (x0 + cw <= w).all() and (y0 + ch <= h).all()
    frac = cw * ch / (h * w)
    assert frac.max() <= 1.0
    if h == w:
        assert frac.min() >= scale[0] * 0.85  # rounding aside, the sampled area is in range
    if scale == (0.08, 1.0) and h == w:  # positions vary
        assert len(torch.unique(x0)) > 10 and len(torch.unique(y0)) > 10


# ---------------------------------------------------------------- the real sample
def test_real_sample_decodes(sample_dir, cache_dir):
    train = load_split(sample_dir, "train", 40, cache_dir=cache_dir, progress=False)
    assert len(train) == 570 and len(train.classes) == 37
    assert train.images.shape == (570, 40, 40, 3) and train.images.dtype == np.uint8
    assert "train/Abyssinian/Abyssinian_34.jpg" in train.paths  # a GIF named .jpg
    assert not train.skipped
    test = load_split(
        sample_dir, "test", 40, cache_dir=cache_dir, classes=train.classes, progress=False
    )
    assert len(test) == 411
    assert "test/Abyssinian/Abyssinian_5.jpg" in test.paths  # an RGBA PNG named .jpg
    for split, rel in (
        (train, "train/Abyssinian/Abyssinian_34.jpg"),
        (test, "test/Abyssinian/Abyssinian_5.jpg"),
    ):
        img = split.images[split.paths.index(rel)]
        assert img.std() > 10  # a photo, not a blank square
    assert Image.open(sample_dir / "train/Abyssinian/Abyssinian_34.jpg").format == "GIF"
    assert load_rgb(sample_dir / "test/Abyssinian/Abyssinian_5.jpg").mode == "RGB"


def test_cpu_and_cuda_resampling_paths_agree_on_an_identity_crop():
    """train_augment resamples per device (uint8 antialiased on CPU, grid_sample on CUDA); on a
    crop that is the whole image at its own size both must return the image itself, flipped
    exactly when asked."""
    from tune_pets.data import _resized_crops_grid, _resized_crops_uint8

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 24, 24, 3), dtype=torch.uint8, generator=gen)
    full = torch.full((4,), 24.0)
    zero = torch.zeros(4)
    flip = torch.tensor([False, True, False, True])
    a = _resized_crops_uint8(x, zero, zero, full, full, flip, 24).float()
    b = _resized_crops_grid(x, zero, zero, full, full, flip, 24)
    expect = x.permute(0, 3, 1, 2).float()
    expect[flip] = expect[flip].flip(-1)
    assert torch.equal(a, expect)
    assert torch.allclose(b, expect, atol=1e-3)


# ---------------------------------------------------------------- scan rules and cache keys
def _ppm(path: Path, seed: int) -> None:
    Image.fromarray(_noise(40, 48, seed=seed)).save(path, format="PPM")  # one size for any pixels


def test_scan_split_ignores_hidden_files_with_image_extensions(tmp_path, make_image_folder):
    """MacOS AppleDouble files (._a_0.jpg) are hidden, not images that fail to load."""
    from tune_pets.data import scan_split

    root = make_image_folder(tmp_path / "d", {"a": (2, 1), "b": (2, 1)})
    (root / "train" / "a" / "._a_0.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    Image.fromarray(_noise(40, 48)).save(root / "train" / "a" / ".hidden.jpg")
    assert scan_split(root, "train").paths == [
        "train/a/a_0.jpg", "train/a/a_1.jpg", "train/b/b_0.jpg", "train/b/b_1.jpg"
    ]  # fmt: skip


def test_scan_split_ignores_hidden_folders_inside_a_class(tmp_path, make_image_folder):
    """Train/a/.thumbnails/*.jpg are not training images of class a."""
    from tune_pets.data import scan_split

    root = make_image_folder(tmp_path / "d", {"a": (2, 1), "b": (2, 1)})
    (root / "train" / "a" / ".thumbnails").mkdir()
    Image.fromarray(_noise(10, 10)).save(root / "train" / "a" / ".thumbnails" / "a_0.jpg")
    idx = scan_split(root, "train")
    assert len(idx.paths) == 4 and not any(".thumbnails" in p for p in idx.paths)


def test_fingerprint_changes_when_a_file_is_rewritten_at_the_same_size(tmp_path, make_image_folder):
    """A re-saved image of the same byte size is told by its mtime."""
    from tune_pets.data import fingerprint, scan_split

    root = make_image_folder(tmp_path / "d", {"a": (2, 1), "b": (2, 1)})
    img = root / "train" / "a" / "a_2.ppm"
    _ppm(img, 1)
    first = fingerprint(root, scan_split(root, "train"))
    size, mtime = img.stat().st_size, img.stat().st_mtime_ns
    _ppm(img, 2)
    os.utime(img, ns=(mtime + 10**9, mtime + 10**9))
    assert img.stat().st_size == size
    assert fingerprint(root, scan_split(root, "train")) != first


def test_fingerprint_changes_when_a_file_changes_size_but_keeps_its_mtime(
    tmp_path, make_image_folder
):
    """Another file copied over with its mtime kept (cp -p, rsync -a) is told by its size."""
    from tune_pets.data import fingerprint, scan_split

    root = make_image_folder(tmp_path / "d", {"a": (2, 1), "b": (2, 1)})
    img = root / "train" / "a" / "a_0.jpg"
    st = img.stat()
    first = fingerprint(root, scan_split(root, "train"))
    Image.fromarray(_noise(80, 96, seed=5)).save(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert img.stat().st_size != st.st_size
    assert fingerprint(root, scan_split(root, "train")) != first


def test_fingerprint_follows_the_class_list(tmp_path, make_image_folder):
    """The held-out split read with another train class list (a class added to train) is
    another entry: the cached one holds the old class list."""
    from tune_pets.data import fingerprint, scan_split

    root = make_image_folder(tmp_path / "d", {"a": (2, 1), "b": (2, 1)})
    a = fingerprint(root, scan_split(root, "test", ["a", "b"]))
    assert a != fingerprint(root, scan_split(root, "test", ["a", "b", "c"]))


def test_decode_cache_keeps_interpolations_apart(tmp_path, make_image_folder):
    """A bicubic decode at the same size is not the bilinear one read back from the cache."""
    from tune_pets.data import load_split

    root = make_image_folder(tmp_path / "d", {"a": (2, 1), "b": (2, 1)})
    kw = {"cache_dir": tmp_path / "cache", "workers": 1, "progress": False}
    bilinear = load_split(root, "train", 24, interpolation="bilinear", **kw)
    bicubic = load_split(root, "train", 24, interpolation="bicubic", **kw)
    assert not np.array_equal(bilinear.images, bicubic.images)
