"""sanity (data report) and profiling (torch.profiler around fit's train step): end-to-end CLI
runs on tiny real files, plus the photo samples (prepare: tests/test_prepare.py).

    python -m pytest tests/test_prepare_sanity_profiling.py -q      # about 50 s on 2 cores

Bad input shared by every command (missing data dir, unreadable images listed by sanity): see
tests/test_hardening.py.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ok, run
from PIL import Image

from tune_pets import profiling, sanity
from tune_pets.utils import UserError, cli_main

CLASSES = ("Abyssinian", "american bulldog", "Bengal")
N_TRAIN, N_TEST = 6, 3
# What torch.profiler's C++ side (kineto) prints on a CPU run unless it is quieted.
PROFILER_NOISE = ("USDT", "gpuGetDeviceCount", "CPUAllocator", "kineto")


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
        _encode(_noise(c=1, seed=9)[..., 0], "JPEG", "L")
    )
    (root / "train/Bengal/README.txt").write_text("notes, not an image\n")
    return root


# ---------------------------------------------------------------- sanity
def test_sanity_cli_end_to_end(odd_data, tmp_path):
    art = tmp_path / "artifacts"
    args = ["--data-dir", odd_data, "--artifacts-dir", art, "--grid-per-split", 6, "--no-progress"]
    r = ok(run("sanity", args, tmp_path / "cwd", timeout=120))
    out = art / "data_sanity"
    assert sorted(p.name for p in art.iterdir()) == ["data_sanity"]

    counts = {row["class"]: row for row in _read_csv(out / "class_counts.csv")}
    assert list(counts) == sorted(CLASSES)  # train's class order: sorted folder names
    assert counts["Abyssinian"] == {"class": "Abyssinian", "train": "7", "test": "4", "total": "11"}
    assert counts["Bengal"] == {"class": "Bengal", "train": "6", "test": "4", "total": "10"}
    assert counts["american bulldog"]["total"] == "9"

    odd = {row["path"]: row for row in _read_csv(out / "odd_files.csv")}
    assert set(odd) == {
        "train/Abyssinian/Abyssinian_gif.jpg",
        "test/Abyssinian/Abyssinian_rgba.jpg",
        "test/Bengal/Bengal_gray.jpg",
        "train/Bengal/README.txt",
    }
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
    assert summary["odd_by_issue"] == {
        "not_jpeg": 2,
        "not_rgb": 3,
        "unreadable": 0,
        "ignored_non_image": 1,
    }
    assert summary["per_class"]["train"]["min"] == 6 and summary["per_class"]["train"]["max"] == 7
    assert summary["per_class"]["train"]["max_class"] == "Abyssinian"
    s = summary["sizes"]["all"]
    assert s["n"] == 30 and s["width_median"] == 48 and s["aspect_max"] == pytest.approx(1.2)
    assert not list(out.glob(".*.tmp")), "atomic writes leave no temp files"
    assert list((tmp_path / "cwd").iterdir()) == []


def test_sanity_counts_only_readable_images(make_image_folder, tmp_path):
    """A class of empty files was counted as 3 images and never reported as empty."""
    root = make_image_folder(tmp_path / "d", {"a": (3, 1), "b": (3, 1)})
    for f in (root / "train" / "b").iterdir():
        f.write_bytes(b"")
    summary = sanity.run_sanity(root, tmp_path / "out", progress=False)
    assert summary["counts"] == {"train": 3, "test": 2} and summary["n_unreadable"] == 3
    assert summary["per_class"]["train"]["empty_classes"] == ["b"]


def test_grid_sample_is_deterministic_and_round_robin(odd_data):
    from tune_pets.data import scan_split

    index = scan_split(odd_data, "train")
    a = sanity.grid_sample(index, 5, seed=0)
    assert a == sanity.grid_sample(index, 5, seed=0)
    assert [c for _, c in a[:3]] == sorted(CLASSES)  # one per class before any repeats
    assert len(sanity.grid_sample(index, 100, seed=0)) == 19


def test_sanity_grids_show_every_class_of_the_shipped_sample(tmp_path, monkeypatch):
    """``--data-dir sample`` (the photos in the package, 37 breeds) with the default grid size:
    every breed is on each split's grid (a 36-image grid once dropped yorkshire_terrier)."""
    from tune_pets.sample import sample_dir

    drawn = {}
    real_save_grid = sanity.save_grid

    def save_grid(data_dir, sample, path, title, odd=frozenset()):
        drawn[path.name] = [cls for _, cls in sample]
        real_save_grid(data_dir, sample, path, title, odd)

    monkeypatch.setattr(sanity, "save_grid", save_grid)
    art = tmp_path / "artifacts"
    assert sanity.main(["--data-dir", "sample", "--artifacts-dir", str(art), "--no-progress"]) == 0
    breeds = sorted(p.name for p in (sample_dir() / "train").iterdir() if p.is_dir())
    assert len(breeds) == 37
    assert set(drawn) == {"grid_train.png", "grid_test.png"}
    for name, classes in drawn.items():
        assert sorted(set(classes)) == breeds, f"{name} lacks {set(breeds) - set(classes)}"
        assert (art / "data_sanity" / name).is_file()


def test_sanity_on_real_sample(sample_dir, tmp_path):
    summary = sanity.run_sanity(sample_dir, tmp_path / "out", grid_per_split=8, progress=False)
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
def _profile_args(model: str, data: Path, tmp_path: Path, *extra) -> list[str]:
    out = ["--artifacts-dir", str(tmp_path / "art"), "--no-progress"]
    return [model, "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"), *out,
            *map(str, extra)]  # fmt: skip


def test_profile_cnn_cli(odd_data, tmp_path):
    """A quiet CPU run (no profiler noise) that replaces the previous trace in
    ``<artifacts>/profiling/cnn/``."""
    # 19 train images, batch 4: 4 steps an epoch, so the 14 steps (profiler wait 1 + warmup 2,
    # 5 profiled, 1 untimed, 5 timed) cycle epochs.
    args = _profile_args("cnn", odd_data, tmp_path, "--steps", 5, "--img-size", 32,
                         "--batch-size", 4)  # fmt: skip
    out = tmp_path / "art/profiling/cnn"
    out.mkdir(parents=True)
    (out / "cnn.1.pt.trace.json").write_text("{}")  # a previous run's trace: to be replaced
    proc = ok(run("profiling", args, tmp_path / "cwd", timeout=180))
    assert proc.stderr == "", proc.stderr
    for noise in PROFILER_NOISE:
        assert noise not in proc.stdout, proc.stdout
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["profiling"]
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
        "cnn", 5, 4, 32, "cpu",
    )  # fmt: skip
    for key in ("images_per_s", "step_time_ms", "compute_time_ms", "profiled_step_time_ms"):
        assert s[key] > 0, key
    assert s["images_per_s"] == pytest.approx(4 / (s["step_time_ms"] / 1000), rel=1e-2)
    assert s["steps_per_epoch"] == 4 and s["n_train"] == 19
    assert s["config"]["img_size"] == 32 and s["trace_files"] == [traces[0].name]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temp files left"


@pytest.mark.slow
def test_interrupted_profiling_leaves_the_previous_profile_whole(odd_data, tmp_path):
    """Ctrl-C in the timed steps, after the new trace is written: the folder once held the new
    trace beside the old summary.json, whose trace_files named a deleted file."""
    import signal
    import time

    from helpers import kill_session, start

    args = _profile_args("cnn", odd_data, tmp_path, "--img-size", 64, "--batch-size", 8)
    assert _run_cli(profiling.main, [*args, "--steps", "2"]) == 0
    out = tmp_path / "art/profiling/cnn"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = start("profiling", [*args, "--steps", 100], tmp_path)
    try:
        deadline = time.monotonic() + 240
        # A new trace, wherever it waits, is written: the timed steps are running.
        while not {p.name for p in out.glob("**/*.pt.trace.json")} - set(before):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    summary = json.loads((out / "summary.json").read_text())
    assert all((out / name).is_file() for name in summary["trace_files"])


def test_profile_vit_cli(odd_data, tmp_path):
    args = _profile_args("vit", odd_data, tmp_path, "--no-pretrained", "--steps", 3,
                         "--backbone-batches", 1)  # fmt: skip
    assert _run_cli(profiling.main, args) == 0
    out = tmp_path / "art/profiling/vit"
    assert len(list(out.glob("*.pt.trace.json"))) == 1
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == "probe head on cached frozen-backbone features"
    assert s["trainable_params"] == 192 * 3 + 3  # the linear head only (ViT-Tiny: 192 dims)
    assert s["img_size"] == 224 and s["steps"] == 3 and s["images_per_s"] > 0
    assert s["backbone_images_per_s"] > 0 and s["backbone_images"] == 64
    assert s["backbone_input"] == "images" and s["feature_extract_train_est_s"] > 0


def test_run_profile_on_in_memory_data(tmp_path):
    """``reproduce`` calls run_profile with data it already holds."""
    from tune_pets.engine import FitData
    from tune_pets.models import get_spec

    spec = get_spec("cnn")
    config = spec.defaults.replace(img_size=32, batch_size=4, width=8)
    rng = np.random.default_rng(0)
    data = FitData("images", ["a", "b"], rng.integers(0, 256, (6, 36, 36, 3), dtype=np.uint8),
                   np.array([0, 1, 0, 1, 0, 1]), preprocess=spec.data_config(config))  # fmt: skip
    s = profiling.run_profile(config, data, 2, tmp_path / "prof")
    assert s["steps"] == 2 and s["step_time_ms"] > 0 and s["trainable_params"] > 0
    assert (tmp_path / "prof/summary.json").is_file() and (tmp_path / "prof/top_ops.csv").is_file()
    big = profiling.run_profile(config.replace(batch_size=16), data, 2, tmp_path / "big")
    assert big["batch_size"] == 6, "a batch larger than the split: the batch the steps ran"
    with pytest.raises(UserError, match="--steps"):
        profiling.run_profile(config, data, 0, tmp_path / "prof")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "--steps: must be an integer from 1 to 200"),
        (["--steps", "many"], "--steps: expected an integer from 1 to 200"),
        (["--img-size", "128"], "--img-size"),
    ],
)
def test_profiling_bad_flags_are_one_line(odd_data, tmp_path, capsys, extra, message):
    code = _run_cli(profiling.main, _profile_args("vit", odd_data, tmp_path, "--no-pretrained",
                                                  *extra))  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "art").exists()


# ---------------------------------------------------------------- sanity and profiling numbers


def test_small_side_count_is_strictly_below_224():
    """A 224-px shorter side is the networks' input size, not below it."""
    from tune_pets.sanity import size_stats

    assert size_stats([(224, 300), (300, 223), (500, 500)])["n_short_side_lt_224"] == 1


def test_class_balance_median_is_the_median():
    """Per-class median, not the mean (skewed classes)."""
    from tune_pets.sanity import class_balance

    b = class_balance({"a": 1, "b": 2, "c": 9})
    assert b["median"] == 2.0 and b["mean"] == 4.0


def test_sanity_sizes_leave_out_unreadable_images(tmp_path, make_image_folder):
    """A truncated JPEG's header gives a size, but training cannot read it: not counted."""
    from tune_pets.sanity import run_sanity

    root = make_image_folder(tmp_path / "d", {"a": (2, 1), "b": (2, 1)})
    bad = root / "train" / "a" / "a_0.jpg"
    Image.fromarray(_noise(400, 300)).save(bad)
    bad.write_bytes(bad.read_bytes()[:3000])  # header intact, data cut short
    s = run_sanity(root, tmp_path / "out", grid_per_split=0, workers=1, progress=False)
    assert s["n_unreadable"] == 1
    assert s["sizes"]["all"]["n"] == 5 and s["sizes"]["all"]["width_max"] == 48


def test_sanity_sizes_are_the_sizes_training_sees_after_exif_rotation(tmp_path):
    """A phone photo stored 400x300 with EXIF orientation 6 trains as 300x400: its width,
    height and aspect ratio in the size stats are those (they were the stored ones)."""
    from tune_pets.data import load_rgb

    path = tmp_path / "turned.jpg"
    img = Image.new("RGB", (400, 300), (120, 60, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(path, "JPEG", exif=exif)
    info = sanity.inspect_image(path)
    assert (info["width"], info["height"]) == load_rgb(path).size == (300, 400)


def test_sanity_flags_an_upper_case_jpg_that_is_not_a_jpeg(tmp_path, make_image_folder):
    """A PNG named x.JPG is as odd as one named x.jpg."""
    from tune_pets.sanity import run_sanity

    root = make_image_folder(tmp_path / "d", {"a": (2, 1), "b": (2, 1)})
    Image.fromarray(_noise(40, 48)).save(root / "train" / "a" / "x.JPG", format="PNG")
    s = run_sanity(root, tmp_path / "out", grid_per_split=0, workers=1, progress=False)
    assert s["odd_by_issue"]["not_jpeg"] == 1


def _cnn_profile_setup():
    from tune_pets.engine import FitData
    from tune_pets.models import get_spec

    spec = get_spec("cnn")
    cfg = spec.defaults.replace(img_size=64, batch_size=6, width=4, depth=1)
    images = np.random.default_rng(0).integers(0, 256, (6, 73, 73, 3), dtype=np.uint8)
    return cfg, FitData("images", ["a", "b"], images, np.arange(6) % 2,
                        preprocess=spec.data_config(cfg))  # fmt: skip


def test_images_per_s_counts_the_data_time_too(tmp_path):
    """images_per_s is per whole step (data + compute), as step_time_ms is."""
    from tune_pets.profiling import run_profile

    cfg, data = _cnn_profile_setup()
    s = run_profile(cfg, data, 2, tmp_path)
    assert s["data_time_ms"] > 0.01 * s["step_time_ms"]  # the premise: data time shows
    assert s["images_per_s"] == pytest.approx(6 * 1000 / s["step_time_ms"], rel=1e-3)


def test_profiled_step_times_leave_out_the_profilers_wait_and_warmup(tmp_path):
    """Only the ``steps`` recorded steps are timed, not the profiler's wait and warmup."""
    from tune_pets.engine import Engine
    from tune_pets.profiling import _profiled_run

    cfg, data = _cnn_profile_setup()
    engine = Engine(cfg, data, torch.device("cpu"))
    _, times = _profiled_run(engine, engine.batches.forever(), 2, tmp_path, False)
    assert len(times) == 2
