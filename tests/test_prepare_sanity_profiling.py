"""prepare (HF dataset -> ImageFolder), sanity (data report) and profiling (torch.profiler around
fit's train step): end-to-end CLI runs on tiny real files, plus the real photo sample when present.

    python -m pytest tests/test_prepare_sanity_profiling.py -q
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tune_pets import prepare as prep
from tune_pets import profiling, sanity
from tune_pets.utils import UserError, cli_main

REPO = Path(__file__).resolve().parents[1]
REAL_SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/oxford_pets_sample"
CLASSES = ("Abyssinian", "american bulldog", "Bengal")
N_TRAIN, N_TEST = 6, 3


# ---------------------------------------------------------------- helpers and fixtures
def _noise(h: int = 40, w: int = 48, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


def _encode(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    if fmt == "GIF":
        img = img.convert("P")
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _rgba(seed: int = 0) -> np.ndarray:
    arr = np.dstack([_noise(seed=seed), np.full((40, 48), 255, np.uint8)])
    arr[:10, :, 3] = 0  # transparent top rows: must become white, not black
    return arr


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _run_cli(main, argv: list[str]) -> int:
    """Run a CLI in-process the way ``python -m`` does; return its exit code."""
    with pytest.raises(SystemExit) as exc:
        cli_main(main, argv)
    return exc.value.code


def _run_module(module: str, *args: str, env: dict | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    """3 classes x (6 train, 3 test) 48x40 noise JPEGs, plus the dataset's real quirks: a GIF and
    an RGBA PNG named .jpg, a grayscale JPEG, and a README.txt inside a class folder.
    Train: 19 images; test: 11 images. Shared by the module: do not modify it."""
    root = tmp_path_factory.mktemp("odd_data")
    for k, cls in enumerate(CLASSES):
        for split, n in (("train", N_TRAIN), ("test", N_TEST)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{cls}_{i}.jpg").write_bytes(_encode(_noise(seed=100 * k + i), "JPEG"))
    (root / "train/Abyssinian/Abyssinian_gif.jpg").write_bytes(_encode(_noise(seed=7), "GIF"))
    (root / "test/Abyssinian/Abyssinian_rgba.jpg").write_bytes(_encode(_rgba(), "PNG", "RGBA"))
    (root / "test/Bengal/Bengal_gray.jpg").write_bytes(
        _encode(_noise(c=1, seed=9)[..., 0], "JPEG", "L"))
    (root / "train/Bengal/README.txt").write_text("notes, not an image\n")
    return root


# ---------------------------------------------------------------- prepare
def _hf_dataset():
    """An in-memory DatasetDict shaped like timm/oxford-iiit-pet (built offline)."""
    import datasets

    names = ["Abyssinian", "american bulldog", "odd/name"]
    train = datasets.Dataset.from_dict(
        {"image": [{"bytes": _encode(_noise(seed=1), "JPEG"), "path": None},
                   {"bytes": _encode(_rgba(seed=2), "PNG", "RGBA"), "path": None},
                   {"bytes": _encode(_noise(seed=3), "GIF"), "path": None},
                   {"bytes": _encode(_noise(seed=4), "JPEG"), "path": None}],
         "label": [0, 0, 1, 2],
         "image_id": ["Abyssinian_1", "Abyssinian_2", "american_bulldog_3", "odd_4.jpg"],
         "label_cat_dog": [0, 0, 1, 1]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=names),
                                    "image_id": datasets.Value("string"),
                                    "label_cat_dog": datasets.ClassLabel(names=["cat", "dog"])}))
    test = datasets.Dataset.from_dict(  # no image_id column: stems fall back to <breed>_<index>
        {"image": [Image.fromarray(_noise(seed=5)), Image.fromarray(_noise(seed=6))],
         "label": [1, 1]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=names)}))
    return datasets.DatasetDict({"train": train, "test": test}), train


def test_write_dataset_from_hf_dataset(tmp_path):
    from tune_pets.data import scan_split

    dd, train = _hf_dataset()
    out = prep.write_dataset(dd, tmp_path / "pets", progress=False)

    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        ["Abyssinian", "american bulldog", "odd_name"])  # breed names, not "0".."2"
    assert sorted(p.name for p in (out / "test" / "american bulldog").iterdir()) == [
        "american bulldog_0.jpg", "american bulldog_1.jpg"]
    # A JPEG source is copied byte for byte.
    first = train.cast_column("image", __import__("datasets").Image(decode=False))[0]["image"]
    assert (out / "train/Abyssinian/Abyssinian_1.jpg").read_bytes() == first["bytes"]
    # PNG (RGBA) and GIF sources become real RGB JPEGs; transparency becomes white.
    for rel in ("train/Abyssinian/Abyssinian_2.jpg",
                "train/american bulldog/american_bulldog_3.jpg"):
        with Image.open(out / rel) as img:
            assert (img.format, img.mode) == ("JPEG", "RGB")
    with Image.open(out / "train/Abyssinian/Abyssinian_2.jpg") as img:
        assert np.asarray(img)[:8].min() > 240
    marker = json.loads((out / prep.MARKER).read_text())
    assert (out / "train/odd_name/odd_4.jpg").is_file()  # an id's extension is not doubled
    assert marker["counts"] == {"train": 4, "test": 2}
    assert marker["num_classes"] == 3
    assert marker["converted_to_jpeg"] == 4  # the PNG, the GIF and the two PIL images
    assert not list(tmp_path.glob("*.tmp-*")), "the temp build dir must be renamed away"
    # The training code reads what prepare wrote.
    index = scan_split(out, "train")
    assert index.classes == ["Abyssinian", "american bulldog", "odd_name"]
    assert len(index.paths) == 4 and index.ignored == []


def test_prepare_is_idempotent(tmp_path, capsys):
    dd, _ = _hf_dataset()
    out = prep.write_dataset(dd, tmp_path / "pets", progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    class Exploding(dict):
        def __getitem__(self, key):
            raise AssertionError("a prepared folder must not be rewritten")

    assert prep.write_dataset(Exploding(train=1, test=1), out, progress=False) == out
    assert prep.prepare(out, dataset="no/such-dataset", progress=False) == out  # no download
    assert _run_cli(prep.main, ["--output-dir", str(out), "--no-progress"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    dd, _ = _hf_dataset()
    real, calls = prep._jpeg_bytes, []

    def flaky(image):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(image)

    monkeypatch.setattr(prep, "_jpeg_bytes", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        prep.write_dataset(dd, tmp_path / "pets", progress=False)
    assert list(tmp_path.iterdir()) == [], "no output dir and no temp dir may be left"


def test_non_empty_folder_without_marker_is_refused(tmp_path):
    out = tmp_path / "pets"
    (out / "train").mkdir(parents=True)
    dd, _ = _hf_dataset()
    with pytest.raises(UserError, match="not empty"):
        prep.write_dataset(dd, out, progress=False)
    # An empty folder is fine: it is replaced by the prepared one.
    (out / "train").rmdir()
    assert prep.is_prepared(prep.write_dataset(dd, out, progress=False))


def test_write_image_folder_duplicates_and_undecodable_bytes(tmp_path):
    jpeg = _encode(_noise(), "JPEG")
    result = prep.write_image_folder(
        {"train": [(jpeg, "a", "x"), (jpeg, "a", "x"), (b"not an image", "a", "y"),
                   (jpeg, "b", "")]}, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "train/a").iterdir()) == ["x.jpg", "x_1.jpg"]
    assert [p.name for p in (tmp_path / "train/b").iterdir()] == ["b_3.jpg"]
    assert result["splits"] == {"train": {"a": 2, "b": 1}}
    assert len(result["skipped"]) == 1 and "train/a/y" in result["skipped"][0]


def test_prepare_offline_fails_with_one_line(tmp_path):
    out = tmp_path / "pets"
    r = _run_module("tune_pets.prepare", "--output-dir", str(out), "--no-progress",
                    env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                         "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "Hugging Face hub is unreachable" in lines[0] and "--data-dir" in lines[0]
    assert not out.exists() and not list(tmp_path.glob("pets.tmp-*"))


# ---------------------------------------------------------------- sanity
def test_sanity_cli_end_to_end(odd_data, tmp_path):
    out = tmp_path / "sanity"
    r = _run_module("tune_pets.sanity", "--data-dir", str(odd_data), "--out", str(out),
                    "--grid-per-split", "6", "--no-progress")
    assert r.returncode == 0, r.stderr

    counts = {row["class"]: row for row in _read_csv(out / "class_counts.csv")}
    assert list(counts) == sorted(CLASSES)  # train's class order: sorted folder names
    assert counts["Abyssinian"] == {"class": "Abyssinian", "train": "7", "test": "4", "total": "11"}
    assert counts["Bengal"] == {"class": "Bengal", "train": "6", "test": "4", "total": "10"}
    assert counts["american bulldog"]["total"] == "9"

    odd = {row["path"]: row for row in _read_csv(out / "odd_files.csv")}
    assert set(odd) == {"train/Abyssinian/Abyssinian_gif.jpg",
                        "test/Abyssinian/Abyssinian_rgba.jpg", "test/Bengal/Bengal_gray.jpg",
                        "train/Bengal/README.txt"}
    gif = odd["train/Abyssinian/Abyssinian_gif.jpg"]
    assert (gif["issues"], gif["format"], gif["mode"]) == ("not_jpeg;not_rgb", "GIF", "P")
    assert odd["test/Abyssinian/Abyssinian_rgba.jpg"]["mode"] == "RGBA"
    assert odd["test/Bengal/Bengal_gray.jpg"]["issues"] == "not_rgb"  # a real JPEG, mode L
    assert odd["train/Bengal/README.txt"]["issues"] == "ignored_non_image"
    assert "Abyssinian_gif.jpg: named .jpg but is GIF" in r.stdout

    sizes = _read_csv(out / "image_sizes.csv")
    assert len(sizes) == 19 + 11
    assert {(row["width"], row["height"]) for row in sizes} == {("48", "40")}

    for split in ("train", "test"):
        with Image.open(out / f"grid_{split}.png") as img:
            assert img.format == "PNG" and img.size[0] > 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"train": 19, "test": 11}
    assert summary["num_classes"] == 3
    assert summary["n_odd_files"] == 4
    assert summary["odd_by_issue"] == {"not_jpeg": 2, "not_rgb": 3, "unreadable": 0,
                                       "ignored_non_image": 1}
    assert summary["per_class"]["train"]["min"] == 6 and summary["per_class"]["train"]["max"] == 7
    assert summary["per_class"]["train"]["max_class"] == "Abyssinian"
    s = summary["sizes"]["all"]
    assert s["n"] == 30 and s["width_median"] == 48 and s["aspect_max"] == pytest.approx(1.2)
    assert not list(out.glob(".*.tmp")), "atomic writes leave no temp files"


def test_sanity_flags_unreadable_files(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                (folder / f"{i}.jpg").write_bytes(_encode(_noise(seed=i), "JPEG"))
    good = (root / "train/a/0.jpg").read_bytes()
    (root / "train/a/truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train/b/empty.jpg").write_bytes(b"")
    summary = sanity.run_sanity(root, tmp_path / "out", grid_per_split=8, progress=False)
    bad = {r["path"]: r for r in summary["odd_files"] if "unreadable" in r["issues"]}
    assert set(bad) == {"train/a/truncated.jpg", "train/b/empty.jpg"}
    assert "empty file" in bad["train/b/empty.jpg"]["detail"]
    assert summary["n_unreadable"] == 2 and summary["counts"]["train"] == 8
    # The grid skips unreadable files instead of crashing on them.
    assert (tmp_path / "out/grid_train.png").is_file()


def test_grid_sample_is_deterministic_and_round_robin(odd_data):
    from tune_pets.data import scan_split

    index = scan_split(odd_data, "train")
    a = sanity.grid_sample(index, 5, seed=0)
    assert a == sanity.grid_sample(index, 5, seed=0)
    assert [c for _, c in a[:3]] == sorted(CLASSES)  # one per class before any repeats
    assert len(sanity.grid_sample(index, 100, seed=0)) == 19


def test_sanity_missing_data_dir_is_one_line(tmp_path, capsys):
    code = _run_cli(sanity.main, ["--data-dir", str(tmp_path / "nope"), "--out",
                                  str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "--data-dir" in err
    assert not (tmp_path / "out").exists()


def test_sanity_on_real_sample(tmp_path):
    if not (REAL_SAMPLE / "train").is_dir():
        pytest.skip(f"real data sample not found at {REAL_SAMPLE}")
    summary = sanity.run_sanity(REAL_SAMPLE, tmp_path / "out", grid_per_split=8, progress=False)
    assert summary["counts"] == {"train": 570, "test": 411}
    assert summary["num_classes"] == 37
    odd = {r["path"]: r for r in _read_csv(tmp_path / "out/odd_files.csv")}
    assert odd["train/Abyssinian/Abyssinian_34.jpg"]["format"] == "GIF"
    assert odd["test/Abyssinian/Abyssinian_5.jpg"]["format"] == "PNG"
    assert odd["test/Abyssinian/Abyssinian_5.jpg"]["mode"] == "RGBA"
    rows = _read_csv(tmp_path / "out/class_counts.csv")
    assert len(rows) == 37 and sum(int(r["total"]) for r in rows) == 981
    assert summary["sizes"]["all"]["width_max"] > summary["sizes"]["all"]["width_min"] > 0


# ---------------------------------------------------------------- profiling
def _profile_args(model: str, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [model, "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"),
            "--artifacts-dir", str(tmp_path / "art"), "--no-progress", *extra]


def test_profile_cnn_cli(odd_data, tmp_path):
    # 19 train images, batch 4: 4 steps an epoch, so 3 + 5 profiled + 5 timed steps cycle epochs.
    args = _profile_args("cnn", odd_data, tmp_path, "--steps", "5", "--img-size", "32",
                         "--batch-size", "4")
    out = tmp_path / "art/profiler/cnn"
    out.mkdir(parents=True)
    (out / "cnn.1.pt.trace.json").write_text("{}")  # a previous run's trace: to be replaced
    assert _run_cli(profiling.main, args) == 0
    traces = list(out.glob("*.pt.trace.json"))
    assert len(traces) == 1 and traces[0].name != "cnn.1.pt.trace.json"
    trace = json.loads(traces[0].read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"train_step", "batch"} <= names and any(str(n).startswith("aten::conv") for n in names)

    rows = _read_csv(out / "top_ops.csv")
    assert 0 < len(rows) <= 25
    self_us = [float(r["self_cpu_time_us"]) for r in rows]
    assert self_us == sorted(self_us, reverse=True) and self_us[0] > 0
    assert "Self CPU" in (out / "top_ops.txt").read_text()

    s = json.loads((out / "summary.json").read_text())
    assert (s["model"], s["steps"], s["batch_size"], s["img_size"], s["device"]) == (
        "cnn", 5, 4, 32, "cpu")
    for key in ("images_per_s", "step_time_ms", "compute_time_ms", "profiled_step_time_ms"):
        assert s[key] > 0, key
    assert s["images_per_s"] == pytest.approx(4 / (s["step_time_ms"] / 1000), rel=1e-2)
    assert s["steps_per_epoch"] == 4 and s["n_train"] == 19 and s["nonfinite_steps"] == 0
    assert s["config"]["img_size"] == 32 and s["trace_files"] == [traces[0].name]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temp files left"


def test_profile_vit_cli(odd_data, tmp_path):
    args = _profile_args("vit", odd_data, tmp_path, "--no-pretrained", "--steps", "3",
                         "--backbone-batches", "1")
    assert _run_cli(profiling.main, args) == 0
    out = tmp_path / "art/profiler/vit"
    assert len(list(out.glob("*.pt.trace.json"))) == 1
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == "probe head on cached frozen-backbone features"
    assert s["trainable_params"] == 192 * 3 + 3  # the linear head only (ViT-Tiny: 192 dims)
    assert s["img_size"] == 224 and s["steps"] == 3 and s["images_per_s"] > 0
    assert s["backbone_images_per_s"] > 0 and s["backbone_images"] == 64
    assert s["backbone_input"] == "images" and s["feature_extract_train_est_s"] > 0


def test_run_profile_on_in_memory_data(tmp_path):
    """``reproduce`` calls run_profile with data it already holds."""
    from tune_pets.config import homework_defaults
    from tune_pets.data import CNN_CROP_PCT, CNN_MEAN, CNN_STD
    from tune_pets.train import FitData

    rng = np.random.default_rng(0)
    data = FitData("images", ["a", "b"], rng.integers(0, 256, (6, 36, 36, 3), dtype=np.uint8),
                   np.array([0, 1, 0, 1, 0, 1]),
                   preprocess={"img_size": 32, "crop_pct": CNN_CROP_PCT,
                               "interpolation": "bilinear", "mean": CNN_MEAN, "std": CNN_STD})
    config = homework_defaults("cnn").replace(img_size=32, batch_size=4, width=8)
    s = profiling.run_profile(config, data, 2, tmp_path / "prof")
    assert s["steps"] == 2 and s["step_time_ms"] > 0 and s["trainable_params"] > 0
    assert (tmp_path / "prof/summary.json").is_file() and (tmp_path / "prof/top_ops.csv").is_file()
    with pytest.raises(UserError, match="--steps"):
        profiling.run_profile(config, data, 0, tmp_path / "prof")


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps: must be a positive integer"),
    (["--steps", "many"], "--steps: expected a positive integer"),
    (["--img-size", "128"], "--img-size"),
])
def test_profiling_bad_flags_are_one_line(odd_data, tmp_path, capsys, extra, message):
    code = _run_cli(profiling.main, _profile_args("vit", odd_data, tmp_path, "--no-pretrained",
                                                  *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "art").exists()
