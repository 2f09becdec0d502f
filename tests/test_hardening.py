"""Hardening: every CLI against bad input, odd-but-valid input, interrupts and killed writers.

    python -m pytest tests/test_hardening.py -q -m "not slow"   # about 1.5 minutes on 2 cores
    python -m pytest tests/test_hardening.py -q                 # about 4.5 minutes (starts Ray)

The contract for bad input, for every command: exit code 2; stderr is exactly one line that
names the file or option and says what to do; no "Traceback" (``--debug`` shows one); nothing
written to the artifacts or runs dir, and no ``*.tmp`` file anywhere, when the run failed before
training. Every CLI case runs ``python -m tune_pets.<cmd>`` in a real subprocess
(``tests/helpers.py``), offline, on an ImageFolder written here with PIL (3 classes x 6 train x
3 test JPEGs, 40x40) plus the one bad file of the case, with its own cache and artifacts dirs.
``sanity`` is the exception for bad image files: listing them is its job, so it exits 0.

Checked elsewhere, not repeated here: train's and profiling's flag values (test_train,
test_prepare_sanity_profiling), each bad-image kind's detection (test_data), search-space
files through the search CLI (test_search) and their loader (test_config), unreadable, foreign
and mismatched checkpoints (test_evaluate), the model argument of every command
(test_layout_cli).

Cases built with ``bug(reason, ...)`` once exposed the bug their reason describes; they stay
as regression tests.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import helpers
import numpy as np
import pytest
from helpers import kill_session, leftovers, run, start
from PIL import Image

CLASSES = ("a", "b", "c")
N_TRAIN, N_TEST, SIDE = 6, 3, 40
COMMANDS = ("train", "evaluate", "profiling", "sanity", "search", "reproduce")
FAST = ("sanity", "train")  # every case of these runs in the fast suite; the rest once each

# A search that costs a few ms per epoch: 2 conv blocks of width 8 at 32 px, batch 4.
TINY_SPACE = """\
model: cnn
metric: val_acc
mode: max
num_samples: {n}
max_epochs: {epochs}
grace_period: 1
reduction_factor: 2
max_concurrent: 1
seed: 0
resources: {{cpu: 1, gpu: 0}}
fixed: {{img_size: 32, width: 8, depth: 2, batch_size: 4}}
space:
  lr: {{loguniform: [1.0e-3, 1.0e-2]}}
"""


def slow(*values, **kw):
    return pytest.param(*values, marks=pytest.mark.slow, **kw)


def bug(reason: str, *values, slow_: bool = False, **kw):
    """A case that once exposed a bug (``reason`` says which); kept as a regression test."""
    marks = [pytest.mark.slow] if slow_ else []
    return pytest.param(*values, marks=marks, **kw)


# ---------------------------------------------------------------- data written on the fly
def write_folder(
    root: Path, classes=CLASSES, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0
) -> Path:
    """``root/{train,test}/<class>/<class>_<i>.jpg``: class-tinted noise, real JPEGs. (Not
    conftest's ``make_image_folder``: the module-scoped fixtures here need it outside a test.)"""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        tint = np.array([40 + 70 * k, 120, 220 - 70 * k], dtype=np.float64)
        for split, n in (("train", n_train), ("test", n_test)):
            if n == 0:
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(tint + rng.uniform(-40, 40, (SIDE, SIDE, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(folder / f"{name}_{i}.jpg", quality=90)
    return root


def jpeg_bytes(size=(SIDE, SIDE)) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _bomb(w: int, h: int):
    def write(p: Path) -> None:
        # A 1-bit PNG compresses to a few KB and costs ~w*h/8 bytes to write.
        Image.new("1", (w, h)).save(p)

    return write


MAX_PX = Image.MAX_IMAGE_PIXELS or 89_478_485
# name: (file name, writer, words the error must contain besides the file name)
BAD_IMAGES = {
    "zero_byte": ("zero.jpg", lambda p: p.write_bytes(b""), ["empty"]),
    "truncated_jpeg": ("truncated.jpg", lambda p: p.write_bytes(jpeg_bytes()[:100]), ["truncated"]),
    "text_named_jpg": ("notes.jpg", lambda p: p.write_text("not an image\n" * 20), ["unreadable"]),
    # Over PIL's limit (Image.MAX_IMAGE_PIXELS, ~89 Mpx): 1x..2x only warns in PIL, tune_pets
    # refuses it anyway; over 2x PIL itself raises DecompressionBombError.
    "pixel_bomb_over_1x": ("huge.png", _bomb(12_000, 8_000), ["decompression bomb"]),
    "pixel_bomb_over_2x": ("huger.png", _bomb(20_000, 10_000), ["decompression bomb"]),
}


def test_pixel_bombs_straddle_pils_two_limits():
    assert MAX_PX < 12_000 * 8_000 < 2 * MAX_PX < 20_000 * 10_000


def add_bad_image(data: Path, kind: str, split: str = "train", cls: str = "a") -> Path:
    name, write, _ = BAD_IMAGES[kind]
    path = data / split / cls / name
    write(path)
    return path


@pytest.fixture(scope="module")
def good_data(tmp_path_factory) -> Path:
    """A valid ImageFolder shared by the module's cases that break something else: read only."""
    return write_folder(tmp_path_factory.mktemp("good_data"))


@pytest.fixture(scope="module")
def cnn_checkpoint(tmp_path_factory) -> Path:
    """A real tune_pets CNN checkpoint for classes a, b, c at 32 px (built, not trained)."""
    from tune_pets.checkpoint import make_checkpoint
    from tune_pets.models import get_spec
    from tune_pets.utils import atomic_torch_save

    spec = get_spec("cnn")
    config = spec.defaults.replace(img_size=32, width=8, depth=2, epochs=1)
    model = spec.build(config, len(CLASSES))
    ckpt = make_checkpoint(
        config, spec, list(CLASSES), spec.data_config(config), model.state_dict(), 1,
        {"val_acc": 0.5},
    )  # fmt: skip
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_best.pt"
    atomic_torch_save(ckpt, path)
    return path


# ---------------------------------------------------------------- running the CLIs
def cli_args(
    cmd: str, data: Path, work: Path, *extra, model: str = "cnn", checkpoint: Path | None = None
) -> list:
    """The command's arguments for a small, fast run writing only under ``work``."""
    art, cache, runs = work / "artifacts", work / "cache", work / "runs"
    common = ["--data-dir", data, "--no-progress", "--artifacts-dir", art]
    if cmd == "sanity":
        return [*common, *extra]
    common += ["--cache-dir", cache]
    if cmd == "train":
        return [model, *common, "--runs-dir", runs, "--img-size", 32, "--epochs", 1,
                "--batch-size", 4, *extra]  # fmt: skip
    if cmd == "evaluate":
        return [model, *common, "--checkpoint", checkpoint, *extra]
    if cmd == "profiling":
        return [model, *common, "--img-size", 32, "--batch-size", 4, "--steps", 1, *extra]
    if cmd == "search":
        space = work / "space.yaml"
        if not space.exists():
            space.write_text(TINY_SPACE.format(n=1, epochs=2))
        return [model, *common, "--runs-dir", runs, "--search-space", space, "--num-cpus", 2,
                *extra]  # fmt: skip
    if cmd == "reproduce":
        return [model, *common, "--runs-dir", runs, "--baseline", "--epochs", 1,
                "--img-size", 32, "--profile-steps", 0, *extra]  # fmt: skip
    raise ValueError(cmd)


def error_line(proc: subprocess.CompletedProcess, *must_contain) -> str:
    """Assert the bad-input contract on a finished process; return its one stderr line."""
    line = helpers.error_line(proc)  # exit 2, one "error:" line
    err = proc.stderr.strip()
    assert "Traceback" not in err, err[-3000:]
    assert err.splitlines() == [line], f"expected one line on stderr, got:\n{err[-3000:]}"
    for word in must_contain:
        assert str(word) in line, f"{word!r} not in: {line}"
    return line


def files_under(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs if d.exists() for p in d.rglob("*") if p.is_file())


def assert_nothing_written(work: Path) -> None:
    """No artifacts, no TensorBoard runs, no temp files (the decode cache may stay)."""
    written = files_under(work / "artifacts", work / "runs")
    assert not written, f"a failed run left outputs behind: {written}"
    tmp = [str(p) for p in work.rglob("*.tmp")]
    assert not tmp, f"temp files left behind: {tmp}"


# ---------------------------------------------------------------- data dir layout errors
def _missing(root: Path) -> Path:
    return root / "no_such_dir"


def _empty(root: Path) -> Path:
    root.mkdir(parents=True)
    return root


def _train_only(root: Path) -> Path:
    return write_folder(root, n_test=0)


def _class_only_in_test(root: Path) -> Path:
    write_folder(root)
    (root / "test" / "zebra").mkdir()
    Image.new("RGB", (SIDE, SIDE), (9, 9, 9)).save(root / "test" / "zebra" / "zebra_0.jpg")
    return root


def _empty_train_class(root: Path) -> Path:
    write_folder(root)
    (root / "train" / "d").mkdir()
    return root


LAYOUTS = {  # name: (make, words the error line must contain; {data} = the data dir)
    "missing": (_missing, ["--data-dir", "{data}", "does not exist", "prepare"]),
    "empty": (_empty, ["--data-dir", "{data}", "train/"]),
    "train_only": (_train_only, ["{data}", "held-out", "test"]),
    "class_only_in_test": (_class_only_in_test, ["'zebra'", "train"]),
    "empty_train_class": (_empty_train_class, ["{data}/train/d", "no images"]),
}

_LATE = (
    "train, profiling and search only scanned train/, so a held-out class unknown to train/ "
    "was not an error there (README 'Reading rules': it is); search ran to the end and the "
    "mistake surfaced only in reproduce, after retraining"
)
_LATE_REPRO = (
    "reproduce retrained first and failed only when it evaluated on test/, leaving "
    "<artifacts>/cnn_baseline/checkpoint_best.pt and a runs/ dir behind"
)


def _layout_cases():
    for layout in LAYOUTS:
        for cmd in COMMANDS:
            cid = f"{layout}-{cmd}"
            if layout == "empty_train_class" and cmd == "evaluate":
                continue  # evaluate reads only the held-out split
            is_slow = cmd not in FAST and layout != "missing"
            if layout == "class_only_in_test" and cmd in ("train", "profiling", "search"):
                yield bug(_LATE, layout, cmd, slow_=is_slow, id=cid)
            elif layout == "class_only_in_test" and cmd == "reproduce":
                yield bug(_LATE_REPRO, layout, cmd, slow_=is_slow, id=cid)
            else:
                yield slow(layout, cmd, id=cid) if is_slow else pytest.param(layout, cmd, id=cid)


@pytest.mark.parametrize("layout, cmd", list(_layout_cases()))
def test_bad_data_layout_is_one_line_error(layout, cmd, tmp_path, cnn_checkpoint):
    make, words = LAYOUTS[layout]
    data = make(tmp_path / "data")
    args = cli_args(cmd, data, tmp_path, checkpoint=cnn_checkpoint)
    error_line(run(cmd, args, tmp_path, timeout=90), *(w.format(data=data) for w in words))
    assert_nothing_written(tmp_path)


# ---------------------------------------------------------------- bad image files
def _bad_image_cases():
    yield pytest.param("truncated_jpeg", "train", id="truncated_jpeg-train")
    yield pytest.param("pixel_bomb_over_1x", "train", id="pixel_bomb_over_1x-train")
    for cmd in ("evaluate", "profiling", "search", "reproduce"):
        yield slow("truncated_jpeg", cmd, id=f"truncated_jpeg-{cmd}")


@pytest.mark.parametrize("kind, cmd", list(_bad_image_cases()))
def test_bad_image_is_one_line_error_naming_it(kind, cmd, tmp_path, cnn_checkpoint):
    """The split the command decodes holds one bad file: it is named, with the way out."""
    data = write_folder(tmp_path / "data")
    bad = add_bad_image(data, kind, split="test" if cmd == "evaluate" else "train")
    proc = run(cmd, cli_args(cmd, data, tmp_path, checkpoint=cnn_checkpoint), tmp_path)
    error_line(proc, bad, "--skip-bad-images", *BAD_IMAGES[kind][2])
    assert_nothing_written(tmp_path)


def test_sanity_lists_bad_images_instead_of_failing(tmp_path):
    """sanity is the tool that lists odd files: it exits 0, names every unreadable file, and
    its grid skips them."""
    data = write_folder(tmp_path / "data")
    kinds = ("zero_byte", "truncated_jpeg", "pixel_bomb_over_1x")
    bad = {k: add_bad_image(data, k, cls=c).relative_to(data).as_posix()
           for k, c in zip(kinds, CLASSES, strict=True)}  # fmt: skip
    proc = run("sanity", cli_args("sanity", data, tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "artifacts" / "data_sanity"
    with open(out / "odd_files.csv", newline="", encoding="utf-8") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    for kind, rel in bad.items():
        assert rel in proc.stdout, f"{kind}: {rel} not listed"
        assert "unreadable" in rows[rel]["issues"], (kind, rows[rel])
    assert "empty file" in rows[bad["zero_byte"]]["detail"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_unreadable"] == len(kinds)
    assert summary["counts"]["train"] == len(CLASSES) * N_TRAIN  # the images training can use
    assert (out / "grid_train.png").is_file()
    # A rerun without grids leaves none of the earlier run's behind (the report embeds them).
    proc = run("sanity", cli_args("sanity", data, tmp_path, "--grid-per-split", 0), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not list(out.glob("grid_*.png"))


@pytest.mark.slow
def test_reproduce_checks_the_heldout_split_before_training(tmp_path):
    data = write_folder(tmp_path / "data")
    bad = add_bad_image(data, "truncated_jpeg", split="test")
    proc = run("reproduce", cli_args("reproduce", data, tmp_path), tmp_path)
    error_line(proc, bad, "--skip-bad-images")
    assert_nothing_written(tmp_path)


@pytest.mark.slow
def test_skip_bad_images_trains_and_lists_every_skipped_file(tmp_path):
    data = write_folder(tmp_path / "data")
    bad = [add_bad_image(data, kind, cls=CLASSES[i % 3]) for i, kind in enumerate(BAD_IMAGES)]
    proc = run("train", cli_args("train", data, tmp_path, "--skip-bad-images"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"skipped {len(bad)} bad image(s)" in proc.stderr
    for path in bad:
        assert str(path) in proc.stderr, f"{path} not listed as skipped"
    info = json.loads((tmp_path / "artifacts/train/cnn/config.json").read_text())["data"]
    assert info["n_train"] + info["n_val"] == len(CLASSES) * N_TRAIN
    assert len(info["skipped"]) == len(bad)  # and recorded next to the run
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_diverging_run_is_one_line_naming_the_learning_rate(tmp_path):
    """A loss gone NaN is cured by a setting: one line and exit 2, not a traceback."""
    data = write_folder(tmp_path / "data")
    args = cli_args("train", data, tmp_path, "--lr", 10, "--optimizer", "sgd",
                    "--weight-decay", 10, "--epochs", 8)  # fmt: skip
    error_line(run("train", args, tmp_path), "loss became", "lower the learning rate")


@pytest.mark.slow
def test_pipeline_passes_skip_bad_images_to_every_step(tmp_path):
    """The pipeline accepted --skip-bad-images and dropped it: the search failed on the file."""
    data = write_folder(tmp_path / "data")
    bad = add_bad_image(data, "truncated_jpeg", cls=CLASSES[0])
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "cnn.yaml").write_text(TINY_SPACE.format(n=1, epochs=1))
    args = [*cli_args("sanity", data, tmp_path), "--runs-dir", tmp_path / "runs", "--cache-dir",
            tmp_path / "cache", "--smoke", "--models", "cnn", "--search-space-dir", spaces,
            "--skip-bad-images", "--profile-steps", 0]  # fmt: skip
    proc = run("pipeline", args, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr  # each decoding step lists the file it skipped
    assert (tmp_path / "artifacts" / "REPORT.md").is_file()


# ---------------------------------------------------------------- valid but odd images
def _odd_images(folder: Path) -> list[Path]:
    """Every flavour of valid image the README promises to read, one file each."""
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
    out = []

    def save(name: str, img: Image.Image, fmt: str | None = None, **kw) -> None:
        path = folder / name
        img.save(path, format=fmt, **kw)
        out.append(path)

    save("palette.gif", rgb.convert("P", palette=Image.Palette.ADAPTIVE))
    rgba = np.dstack([np.asarray(rgb), np.linspace(0, 255, SIDE * SIDE).reshape(SIDE, SIDE)])
    save("alpha.png", Image.fromarray(rgba.astype(np.uint8), "RGBA"))
    save(
        "palette_transparent.png",
        rgb.convert("P", palette=Image.Palette.ADAPTIVE),
        transparency=0,
    )
    save("gray.jpg", rgb.convert("L"))
    save("cmyk.jpg", rgb.convert("CMYK"))
    save("deep16.png", Image.fromarray((rng.integers(0, 65536, (SIDE, SIDE))).astype(np.uint16)))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display
    save("rotated.jpg", rgb.resize((48, 32)), exif=exif)
    save("photo.dat", rgb, "JPEG")
    save("no_extension", rgb, "PNG")
    save("UPPER.JPEG", rgb, "JPEG")
    save("one_pixel.png", Image.new("RGB", (1, 1), (200, 30, 30)))
    save("sliver.png", Image.new("RGB", (3000, 1), (30, 200, 30)))  # aspect ratio 3000
    return out


@pytest.mark.slow
def test_odd_but_valid_images_all_load_and_train(tmp_path):
    import torch

    classes = ("chat été", "golden retriever", "Ørn")
    data = write_folder(tmp_path / "data", classes=classes, n_train=3)
    odd = _odd_images(data / "train" / classes[0])
    # Junk that must be ignored, not read as images and not an error.
    for folder in (data / "train", data / "train" / classes[0], data / "test" / classes[1]):
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
        (folder / "README.txt").write_text("about these pictures\n")
    n_images = sum(
        1
        for p in (data / "train").rglob("*")
        if p.is_file() and p.name not in (".DS_Store", "README.txt")
    )
    proc = run("train", cli_args("train", data, tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" not in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "artifacts" / "train" / "cnn"
    info = json.loads((out / "config.json").read_text())["data"]
    assert info["n_train"] + info["n_val"] == n_images == 3 * 3 + len(odd)
    split = json.loads((out / "val_split.json").read_text())
    used = set(split["train"]) | set(split["val"])
    for p in odd:
        assert p.relative_to(data).as_posix() in used, f"{p.name} was not used"
    assert not any(".DS_Store" in u or "README" in u for u in used)
    ckpt = torch.load(out / "checkpoint_best.pt", weights_only=True)
    assert ckpt["classes"] == sorted(classes)


# ---------------------------------------------------------------- options out of range
OPTION_CASES = [  # (command, extra args, words the error line must contain)
    ("train", ["--batch-size", "0"], ["--batch-size", "0"]),
    ("train", ["--val-fraction", "0"], ["--val-fraction"]),
    ("search", ["--num-samples", "0"], ["--num-samples", "0"]),
    ("search", ["--gpus-per-trial", "-1"], ["--gpus-per-trial", "-1"]),
    ("search", ["--storage-path", "relative/path"], ["--storage-path", "relative/path",
                                                      "absolute"]),
    ("search", ["--storage-path", "/etc/passwd"], ["--storage-path /etc/passwd is a file"]),
    # cli_args passes --num-cpus, which a cluster ignored without a word.
    ("search", ["--address", "auto"], ["--num-cpus", "--address"]),
    ("reproduce", ["--seeds", "1", "1"], ["--seeds 1 1", "distinct"]),
    ("reproduce", ["--seed", "-1"], ["--seed", "-1"]),
    # The search's seed was checked only in the config, whose error named the YAML file.
    ("search", ["--seed", str(2**32)], ["--seed", str(2**32)]),
]  # fmt: skip
_SEED = (
    "--seed had type=int in train.py/profiling.py and validate_config had no range for seed; "
    "numpy's seeding raised ValueError deep in fit(): exit 1 with a traceback, after "
    "val_split.json was written"
)


def _option_cases():
    for cmd, extra, words in OPTION_CASES:
        yield pytest.param(cmd, extra, words, id=f"{cmd}{''.join(extra)}")
    yield bug(_SEED, "train", ["--seed", "-1"], ["--seed", "-1"], id="train--seed-1")
    yield bug(_SEED, "train", ["--seed", str(2**32)], ["--seed"], slow_=True, id="train--seed2**32")


@pytest.mark.parametrize("cmd, extra, words", list(_option_cases()))
def test_option_out_of_range_is_one_line_error(cmd, extra, words, tmp_path, good_data):
    proc = run(cmd, cli_args(cmd, good_data, tmp_path, *extra), tmp_path, timeout=90)
    error_line(proc, *words)
    assert_nothing_written(tmp_path)


def test_debug_shows_the_traceback(tmp_path):
    proc = run("sanity", cli_args("sanity", tmp_path / "no_such_dir", tmp_path, "--debug"),
               tmp_path, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "UserError" in proc.stderr
    assert "--data-dir" in proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- search-space YAML
# The loader, in process (the search CLI's handling of a loader error: test_search). test_config
# covers syntax errors, unknown samplers, low >= high, unknown keys, bad bounds and non-mappings;
# these are the cases it does not.
YAML_CASES = {
    "num_samples_not_a_number": ("model: cnn\nnum_samples: many\n", ["num_samples", "many"]),
    "empty_choice": ("model: cnn\nspace:\n  batch_size: {choice: []}\n",
                     ["space.batch_size", "choice"]),
    "choice_out_of_range": ("model: cnn\nspace:\n  batch_size: {choice: [0, 32]}\n",
                            ["space.batch_size", "batch_size"]),
    "empty_file": ("", ["mapping"]),
    "python_tag_top_level": ('!!python/object/apply:os.system ["touch {marker}"]\n', []),
    "python_tag_in_value": ('model: cnn\nnum_samples: !!python/object/apply:os.system '
                            '["touch {marker}"]\n', []),
    # The tag itself is refused (an unsafe loader would read os.system, then fail on the model).
    "python_name_tag": ("model: !!python/name:os.system\n",
                        ["could not determine a constructor for the tag", "python/name:os.system"]),
}  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        *YAML_CASES,
        bug("config.load_search_spec read the file with read_text(encoding='utf-8') outside its "
            "try: a non-UTF-8 file raised UnicodeDecodeError (exit 1, traceback)", "not_utf8",
            id="not_utf8"),
        "a_directory",
    ],
)  # fmt: skip
def test_bad_search_space_yaml_is_refused(case, tmp_path):
    from tune_pets.spaces import load_search_spec
    from tune_pets.utils import UserError

    marker = tmp_path / "pwned"
    space = tmp_path / "bad space.yaml"
    words = []
    if case == "not_utf8":
        space.write_bytes(b"model: cnn\nmetric: val_acc \xff\xfe\n")
    elif case == "a_directory":
        space.mkdir()
    else:
        text, words = YAML_CASES[case]
        space.write_text(text.replace("{marker}", str(marker)))
    with pytest.raises(UserError) as e:
        load_search_spec(space)
    msg = str(e.value)
    assert str(space) in msg and "\n" not in msg, msg
    for word in words:
        assert word in msg, f"{word!r} not in: {msg}"
    assert not marker.exists(), "a YAML tag executed code"


# ---------------------------------------------------------------- reproduce inputs
def test_reproduce_without_search_results_says_what_to_run(tmp_path, good_data):
    args = [a for a in cli_args("reproduce", good_data, tmp_path) if a != "--baseline"]
    line = error_line(
        run("reproduce", args, tmp_path, timeout=60),
        tmp_path / "artifacts" / "search" / "cnn" / "best_config.json",
        "python -m tune_pets.search cnn",
        "--best-config",
        "--baseline",
    )
    assert line.startswith("python -m tune_pets.reproduce: error: "), line
    assert_nothing_written(tmp_path)


def _summary(config) -> str:
    """best_config.json as search writes it, around ``config``."""
    return json.dumps({"model": "cnn", "config": config, "metric": "val_acc", "mode": "max",
                       "best_value": 0.5, "trial_id": "t0"})  # fmt: skip


BEST_CONFIGS = {
    "truncated_json": ('{"model": "cnn", "config": {"model": "cnn", "lr": ', ["not valid JSON"]),
    "not_a_dict": ("[1, 2, 3]", ["not a SearchSummary"]),
    "missing_keys": ('{"config": {"model": "cnn"}}', ["not a SearchSummary"]),
    "other_model": (_summary({"model": "vit_probe"}), ["'vit'", "'cnn'"]),
    # RunConfig.from_dict's kinds of error: test_config; one here: reproduce names the file.
    "bad_value": (_summary({"model": "cnn", "lr": "fast"}), ["lr", "fast"]),
    "binary": (b"\x80\x81\xfe\xff" * 8, ["not valid JSON"]),
}


@pytest.mark.parametrize("case", [c if c == "other_model" else slow(c) for c in BEST_CONFIGS])
def test_reproduce_bad_best_config_is_one_line_error(case, tmp_path, good_data):
    content, words = BEST_CONFIGS[case]
    path = tmp_path / "best_config.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    args = [a for a in cli_args("reproduce", good_data, tmp_path) if a != "--baseline"]
    proc = run("reproduce", [*args, "--best-config", path], tmp_path, timeout=60)
    error_line(proc, path, *words)
    assert_nothing_written(tmp_path)


# best_config.json as the search of the previous release wrote it (before records.py): the
# metric's value under best_<metric>, no best_value.
PREVIOUS_RELEASE_BEST_CONFIG = {
    "model": "cnn",
    "config": {"model": "cnn", "epochs": 3, "lr": 0.002, "img_size": 64, "width": 32},
    "val_acc": 0.41,
    "val_macro_f1": 0.38,
    "metric": "val_acc",
    "mode": "max",
    "best_val_acc": 0.41,
    "trial_id": "c485411b",
    "epoch": 3,
    "checkpoint": None,
    "search": {"name": "cnn", "num_trials": 4, "completed": 2, "stopped_early": 2, "failed": 0},
}


def test_reproduce_reads_a_best_config_of_the_previous_release(tmp_path):
    """records.py: "older files still read"; config.py keeps legacy model names for them."""
    from tune_pets import reproduce
    from tune_pets.layout import Layout
    from tune_pets.models import get_spec

    path = tmp_path / "best_config.json"
    path.write_text(json.dumps(PREVIOUS_RELEASE_BEST_CONFIG))
    config, origin = reproduce.resolve_config(get_spec("cnn"), path, Layout(tmp_path), False)
    assert (config.lr, config.img_size, config.width) == (0.002, 64, 32)
    assert origin["trial_id"] == "c485411b" and origin["val_acc"] == 0.41


# ---------------------------------------------------------------- evaluate's checkpoint
class RunsCodeWhenUnpickled:
    """Unpickling this runs ``touch MARKER``: a checkpoint must never be unpickled freely."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _write_checkpoint(kind: str, path: Path, marker: Path) -> None:
    import torch

    if kind == "pickled_object":
        torch.save({"format": "tune_pets/1", "x": RunsCodeWhenUnpickled(marker)}, path)
    elif kind == "tagged_dict_missing_keys":
        torch.save({"format": "tune_pets/1", "epoch": 3}, path)
    else:
        raise ValueError(kind)


CHECKPOINT_CASES = {  # kind: words the error line must contain (besides --checkpoint PATH)
    "pickled_object": ["not a readable checkpoint"],
    "tagged_dict_missing_keys": ["incomplete", "state_dict"],
}


@pytest.mark.parametrize(
    "kind",
    [
        "pickled_object",
        bug("evaluate.load_checkpoint checked only the 'format' tag, then indexed ckpt['model'] "
            "(and later 'config', 'classes', 'scope', 'preprocess', 'state_dict'): KeyError, "
            "exit 1, traceback", "tagged_dict_missing_keys", id="tagged_dict_missing_keys"),
    ],
)  # fmt: skip
def test_evaluate_refuses_bad_checkpoints(kind, tmp_path, good_data):
    marker = tmp_path / "pwned"
    path = tmp_path / f"{kind}.pt"
    _write_checkpoint(kind, path, marker)
    proc = run("evaluate", cli_args("evaluate", good_data, tmp_path, checkpoint=path), tmp_path,
               timeout=60)  # fmt: skip
    error_line(proc, f"--checkpoint {path}", *CHECKPOINT_CASES[kind])
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert_nothing_written(tmp_path)


@pytest.mark.slow
def test_evaluate_checkpoint_trained_on_other_classes(tmp_path, cnn_checkpoint):
    """A valid data dir (test classes within train's) whose classes are not the checkpoint's."""
    data = write_folder(tmp_path / "data", classes=("a", "b", "d"))
    proc = run("evaluate", cli_args("evaluate", data, tmp_path, checkpoint=cnn_checkpoint),
               tmp_path, timeout=60)  # fmt: skip
    error_line(proc, "'d'", f"{data}/test", "checkpoint")
    assert_nothing_written(tmp_path)


# ---------------------------------------------------------------- search without Ray setup
@pytest.mark.slow
def test_gpus_per_trial_without_a_gpu_leaves_nothing(tmp_path, good_data):
    """Regression: search decoded the data and wrote <artifacts>/search/<name>/val_split.json
    before it checked the cluster's resources."""
    proc = run("search", cli_args("search", good_data, tmp_path, "--gpus-per-trial", "1"),
               tmp_path, timeout=120)  # fmt: skip
    error_line(proc, "--gpus-per-trial 1", "GPU")
    assert_nothing_written(tmp_path)


_CTRL_C_IN_RAY_INIT = """
import os, signal, sys, threading, time
from tune_pets import search_ray
# Another thread, as a pipeline has after sanity: a process-directed SIGINT may go to it.
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    search_ray.connect(None, 1)
except KeyboardInterrupt:
    import ray
    print("interrupted, Ray up:", ray.is_initialized())
    ray.shutdown()
"""


@pytest.mark.slow
def test_a_ctrl_c_during_ray_init_is_raised_once_ray_is_up(tmp_path):
    """Raised inside ray.init it left the core worker half-built: a pipeline (whose sanity step
    had started threads, so the signal mask of the main thread did not hold it off) segfaulted
    at exit in 2 of 9 tries, or left Ray's agents running."""
    argv = [sys.executable, "-c", _CTRL_C_IN_RAY_INIT]
    proc = subprocess.run(argv, cwd=tmp_path, env=helpers.env(), capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "interrupted, Ray up: True", proc.stderr[-2000:]


_SIGTERM_AROUND_RAY = """
import os, signal, subprocess, time
from tune_pets import search_ray
from tune_pets.utils import on_sigterm

def sigterm_in(seconds):  # from outside: no thread of ours takes it, it waits while blocked
    subprocess.Popen(["sh", "-c", f"sleep {seconds}; kill -s TERM {os.getpid()}"])

signal.signal(signal.SIGTERM, on_sigterm)  # as cli_main does
sigterm_in(1)
try:
    search_ray.connect(None, 1)
except KeyboardInterrupt:
    import ray
    print("while Ray started: raised once it was up:", ray.is_initialized())
search_ray.disconnect()
try:
    sigterm_in(0)
    time.sleep(5)
except KeyboardInterrupt:
    print("after Ray stopped: raised")
"""


@pytest.mark.slow
def test_a_sigterm_while_ray_starts_or_after_it_stops_is_ours(tmp_path):
    """A SIGTERM held back while ray.init ran was let through after Ray had put its C++ handler
    in: a stack dump and exit -6 (4 of 4 searches at 3.4-4.8 s). After ray.shutdown, SIGTERM
    was at its default action again: a search writing its results, or a pipeline's later
    steps, died with exit -15 and no line (4 of 4, and 3 of 3)."""
    argv = [sys.executable, "-c", _SIGTERM_AROUND_RAY]
    proc = subprocess.run(argv, cwd=tmp_path, env=helpers.env(), capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.splitlines() == [
        "while Ray started: raised once it was up: True",
        "after Ray stopped: raised",
    ], proc.stderr[-2000:]


@pytest.mark.slow
def test_address_without_a_cluster_fails_fast_and_obeys_ctrl_c(tmp_path, good_data):
    args = cli_args("search", good_data, tmp_path, "--address", "127.0.0.1:1")
    i = args.index("--num-cpus")  # a local Ray's size: refused with --address
    proc = start("search", args[:i] + args[i + 2 :], tmp_path)
    t0 = time.monotonic()
    try:
        try:
            # Fast means seconds of start-up (imports, on a busy machine up to ~30 s), not
            # Ray's 14 minutes of retries.
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"still connecting after {time.monotonic() - t0:.0f} s and SIGINT did not "
                    f"stop it"
                ) from None
            raise AssertionError(
                f"still connecting after 90 s; SIGINT: exit {proc.returncode}"
            ) from None
    finally:
        kill_session(proc.pid)
    error_line(
        subprocess.CompletedProcess(proc.args, proc.returncode, out, err), "--address 127.0.0.1:1"
    )
    assert_nothing_written(tmp_path)


# ---------------------------------------------------------------- Ctrl-C and SIGTERM
STOPPED_BY = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


@pytest.fixture(scope="module", params=[signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def interrupted_train(request, tmp_path_factory, good_data):
    """``train --epochs 200`` stopped by Ctrl-C (SIGINT to the process) or by SIGTERM (``kill``,
    a batch scheduler) after its first epoch: (work, signal, exit code, stdout, stderr)."""
    work = tmp_path_factory.mktemp("interrupted_train")
    args = cli_args("train", good_data, work)
    args[args.index("--epochs") + 1] = 200
    proc = start("train", args, work)
    try:
        first = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            first += line
            if line.startswith("epoch"):
                break
        assert proc.poll() is None, f"train ended early: {proc.stderr.read()[-2000:]}"
        time.sleep(0.5)  # into the next epoch (or the checkpoint write)
        proc.send_signal(request.param)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_session(proc.pid)
    return work, request.param, proc.returncode, first + out, err


@pytest.mark.slow
def test_ctrl_c_or_sigterm_during_train_stops_cleanly(interrupted_train):
    """SIGTERM killed train where it stood (temp files stayed); it now ends as Ctrl-C does."""
    import torch

    work, sig, code, out, err = interrupted_train
    word, expected = STOPPED_BY[sig]
    assert code == expected, f"exit {code}; stderr: {err[-2000:]}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], err
    assert "epoch 200" not in out
    ckpts = list((work / "artifacts").rglob("*.pt"))
    assert ckpts and all(p.is_relative_to(work / "artifacts" / "train") for p in ckpts), ckpts
    for ckpt in ckpts:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["format"] == "tune_pets/1" and state["epoch"] >= 1
    assert not list(work.rglob("*.tmp"))


@pytest.mark.slow
def test_ctrl_c_or_sigterm_during_train_says_what_to_do(interrupted_train):
    err = interrupted_train[-1]
    assert re.search(r"rerun|run it again|run the same command|--resume", err), err
    assert "checkpoint_best.pt" in err


def _ignores(pid: int, sig: int) -> bool:
    """Whether process ``pid`` ignores ``sig`` (the SigIgn mask in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return bool(mask >> (sig - 1) & 1)


def _start_a_long_decode(tmp_path: Path, sig: int):
    """``train`` on 800 copies of one 640x480 JPEG (the decode at 256 px takes seconds), once
    both decode workers run and ignore ``sig``: (process, work dir, worker pids)."""
    one = tmp_path / "one.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(one, quality=90)
    for split, n in (("train", 400), ("test", 2)):
        for name in ("a", "b"):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                os.link(one, folder / f"{i}.jpg")
    work = tmp_path / "work"
    proc = start("train", cli_args("train", tmp_path / "data", work, "--img-size", 224), work)
    workers: list[int] = []
    while proc.poll() is None and not any((work / "cache").rglob("*.json")):
        workers = [p for p in helpers.session_pids(proc.pid) if p != proc.pid]
        with contextlib.suppress(OSError):  # a worker just ended
            if len(workers) == 2 and all(_ignores(w, sig) for w in workers):
                return proc, work, workers
        time.sleep(0.01)
    kill_session(proc.pid)
    pytest.fail(f"no decode worker ignored {signal.Signals(sig).name} (the decode ended first)")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_during_the_parallel_decode_stops_at_once(tmp_path, sig):
    """A terminal's Ctrl-C (or a scheduler's SIGTERM) reaches the whole process group, decode
    workers included. A worker that took it between two images died, CPython's executor then
    failed on a cancelled future, and the command hung at exit (2 of 26 Ctrl-Cs). The workers
    now leave it to the command, which drops the queued images and stops."""
    proc, work, _ = _start_a_long_decode(tmp_path, sig)
    try:
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
    finally:
        leftover = leftovers(proc.pid)
    word, code = STOPPED_BY[sig]
    assert proc.returncode == code, err[-2000:]
    assert err.strip().splitlines() == [err.strip()] and word in err, err
    assert not leftover
    assert not list((work / "cache").rglob("*.npy")), "the decode ran to its end"


@pytest.mark.slow
def test_decode_workers_end_with_a_killed_command(tmp_path):
    """Killed outright (SIGKILL, the OOM killer), the command took its decode workers along:
    they stayed blocked on the job queue for good, and ignore SIGTERM now."""
    proc, _, workers = _start_a_long_decode(tmp_path, signal.SIGTERM)
    try:
        proc.kill()
        proc.wait(timeout=60)  # not its pipes: the workers hold them too
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and set(workers) & set(helpers.session_pids(proc.pid)):
            time.sleep(0.05)
        assert not set(workers) & set(helpers.session_pids(proc.pid))
    finally:
        kill_session(proc.pid)


def _read_until_first_trial_done(proc, timeout_s: float):
    """Drain the search's stdout and stderr in background threads; return (stdout lines,
    stderr lines, threads), the lists still growing, once stdout shows its first "[1/N trials
    done]" line, the search ends, or ``timeout_s`` passes."""
    out: list[str] = []
    err: list[str] = []
    seen = threading.Event()

    def drain(stream, into, watch):
        for line in stream:
            into.append(line)
            if watch and "trials done]" in line:
                seen.set()
        seen.set()  # EOF: the search ended

    threads = [
        threading.Thread(target=drain, args=(proc.stdout, out, True), daemon=True),
        threading.Thread(target=drain, args=(proc.stderr, err, False), daemon=True),
    ]
    for t in threads:
        t.start()
    seen.wait(timeout_s)
    return out, err, threads


@pytest.mark.slow
def test_ctrl_c_during_search_prints_a_resume_command_that_works(tmp_path, good_data):
    # Trials here take ~0.3 s once the first actor is up, and Ray copies a trial's result.json
    # to storage at a trial's end or an experiment snapshot, not per report: so Ctrl-C goes in
    # at the first trial's progress line with 39 trials still to run (~12 s), not at a file
    # that may appear near the end (a CI run of 8 trials finished them all before the signal).
    n = 40
    (tmp_path / "space.yaml").write_text(TINY_SPACE.format(n=n, epochs=3))
    args = cli_args("search", good_data, tmp_path)
    proc = start("search", args, tmp_path)
    try:
        out_lines, err_lines, readers = _read_until_first_trial_done(proc, timeout_s=150)
        out = "".join(out_lines)
        assert proc.poll() is None, f"search ended before Ctrl-C: {out[-2000:]}"
        assert "[1/" in out, "no trial finished within 150 s"
        proc.send_signal(signal.SIGINT)  # the driver only, not its process group
        proc.wait(timeout=120)
        for reader in readers:
            reader.join(timeout=30)
        out, err = "".join(out_lines), "".join(err_lines)
    finally:
        kill_session(proc.pid)
    assert proc.returncode != 0, f"exit 0 after Ctrl-C; stdout: {out[-1500:]}"
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "interrupted" in line and "--resume" in line, err[-2000:]
    # Run the printed command as printed (same cwd, same environment).
    resume = shlex.split(line[line.rindex("python -m tune_pets.search") :])
    assert resume[:3] == ["python", "-m", "tune_pets.search"]
    resumed = run("search", resume[3:], tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(tmp_path / "artifacts/search/cnn/trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and len({r["trial_id"] for r in rows}) == n


def _ctrl_c_after_an_epoch(
    proc, experiment: Path, sig: int = signal.SIGINT, left: list | None = None
) -> tuple[str, str]:
    """``sig`` to ``proc`` once a trial of ``experiment`` saved its first epoch (it runs); its
    (stdout, stderr). What of its session outlived it goes into ``left``, then is killed."""
    try:
        deadline = time.monotonic() + 240
        while not any(experiment.glob("trial_*/train_state.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, "no epoch in time"
            time.sleep(0.2)
        proc.send_signal(sig)
        out_err = proc.communicate(timeout=120)
        (left if left is not None else []).extend(helpers.session_pids(proc.pid))
        return out_err
    finally:
        kill_session(proc.pid)


@pytest.mark.slow
def test_sigterm_during_search_saves_its_state_and_stops_ray(tmp_path, good_data):
    """SIGTERM (a batch scheduler's time limit, ``kill``) stops a search as Ctrl-C does. It hit
    Ray's C++ handler ("*** SIGTERM received", a stack dump, abort: rc -6 in 3 of 3), and
    before Ray was up it killed the command where it stood."""
    from tune_pets.search import ray_state_saved

    (tmp_path / "space.yaml").write_text(TINY_SPACE.format(n=1, epochs=400))
    proc = start("search", cli_args("search", good_data, tmp_path), tmp_path)
    experiment = tmp_path / "artifacts" / "ray_results" / "cnn"
    left: list[int] = []  # Ray's own processes included
    _, err = _ctrl_c_after_an_epoch(proc, experiment, signal.SIGTERM, left)
    assert proc.returncode == 143, f"exit {proc.returncode}: {err[-2000:]}"
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "terminated" in last and "--resume" in last, err[-2000:]
    assert ray_state_saved(experiment), sorted(p.name for p in experiment.iterdir())
    assert not left, f"still running after the search exited: {left}"


@pytest.mark.slow
def test_ctrl_c_after_the_last_trial_started_is_still_an_interrupt(tmp_path, good_data):
    """Tune's own Ctrl-C handler marks running trials TERMINATED: a one-trial search stopped
    mid-trial exited 0 with the trial recorded as "stopped early", and pipeline went on."""
    (tmp_path / "space.yaml").write_text(TINY_SPACE.format(n=1, epochs=400))
    proc = start("search", cli_args("search", good_data, tmp_path), tmp_path)
    out, err = _ctrl_c_after_an_epoch(proc, tmp_path / "artifacts" / "ray_results" / "cnn")
    assert proc.returncode == 130, f"exit {proc.returncode}: {out[-1500:]}"
    assert "interrupted" in err.strip().splitlines()[-1] and "--resume" in err, err[-2000:]
    assert not (tmp_path / "artifacts" / "search" / "cnn" / "best_config.json").exists()


@pytest.mark.slow
def test_a_resumed_search_ends_when_its_time_budget_is_spent(tmp_path, good_data):
    """Tune counts the budget over every session: the resumed one stops early, and its own
    time is less than the budget. It was taken for an interrupt (exit 130, "resume with ..."),
    every time. The wall time reported is the sessions' total (it was the last session's)."""
    (tmp_path / "space.yaml").write_text(TINY_SPACE.format(n=500, epochs=3))
    args = cli_args("search", good_data, tmp_path, "--time-budget-s", 25)
    proc = start("search", args, tmp_path)
    _, err = _ctrl_c_after_an_epoch(proc, tmp_path / "artifacts" / "ray_results" / "cnn")
    assert proc.returncode == 130, err[-2000:]
    out = tmp_path / "artifacts" / "search" / "cnn"
    first = json.loads((out / "search_spec.json").read_text())["sessions"]
    assert first["n"] == 1 and first["search_s"] > 0
    resumed = run("search", [*args, "--resume"], tmp_path, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    search = json.loads((out / "best_config.json").read_text())["search"]
    assert search["sessions"] == 2 and "over 2 sessions" in resumed.stdout
    assert search["wall_time_s"] > round(first["search_s"], 1), (search, first)


@pytest.mark.slow
def test_ashas_rungs_survive_a_resume(tmp_path, good_data):
    """Tune snapshots the searcher and the callbacks, not the scheduler: a resumed search's ASHA
    started with empty rungs and stopped trials that the first session's scores would have kept.
    After a Ctrl-C (two trials done, one at a time) and --resume, the last saved scheduler state
    holds every trial of both sessions at the first rung: the one restored is the one used."""
    import pickle

    import ray.cloudpickle

    (tmp_path / "space.yaml").write_text(TINY_SPACE.format(n=5, epochs=20))
    args = cli_args("search", good_data, tmp_path)
    exp = tmp_path / "artifacts" / "ray_results" / "cnn"
    proc = start("search", args, tmp_path)
    try:
        deadline = time.monotonic() + 240
        while len(list(exp.glob("trial_*"))) < 3:  # one at a time: two have finished
            assert proc.poll() is None and time.monotonic() < deadline, "no third trial in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 130, err[-2000:]
    resumed = run("search", [*args, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(sorted(exp.glob("callback-states-*.pkl"))[-1], "rb") as f:
        states = ray.cloudpickle.load(f)
    saved = [pickle.loads(s["scheduler"]) for s in states.values() if s and "scheduler" in s]
    assert len(saved) == 1
    # Ray's ASHA keeps its rungs as (milestone, {trial_id: score}) in one bracket.
    rungs = dict(saved[0]["_brackets"][0]._rungs)
    with open(tmp_path / "artifacts" / "search" / "cnn" / "trials.csv", newline="") as f:
        trial_ids = {r["trial_id"] for r in csv.DictReader(f)}
    assert len(trial_ids) == 5 and set(rungs[1]) == trial_ids, (rungs, trial_ids)


@pytest.mark.slow
def test_a_budget_that_ends_before_any_epoch_says_what_to_change(tmp_path, good_data):
    """1 s is less than a trial's start: no epoch, no best. A resumed search keeps its budget,
    so there it is "start it anew" (it said "raise --time-budget-s", which --resume refuses)."""
    args = cli_args("search", good_data, tmp_path, "--time-budget-s", 1)
    assert "raise --time-budget-s" in error_line(run("search", args, tmp_path))
    resumed = error_line(run("search", [*args, "--resume"], tmp_path))
    assert "start it anew with --overwrite and a larger --time-budget-s" in resumed


@pytest.mark.slow
def test_ctrl_c_in_a_pipeline_search_stops_the_pipeline_with_its_resume_flag(tmp_path, good_data):
    """The search's exit 130 was "step failed with exit code 130" (exit 2); and before the
    search told a late Ctrl-C apart, the pipeline went on to reproduce a half-run search."""
    args = ["--smoke", "--models", "cnn", "--num-samples", 1, "--max-epochs", 400, "--data-dir",
            good_data, "--no-progress", "--artifacts-dir", tmp_path / "A", "--runs-dir",
            tmp_path / "R", "--cache-dir", tmp_path / "cache"]  # fmt: skip
    proc = start("pipeline", args, tmp_path)
    _, err = _ctrl_c_after_an_epoch(proc, tmp_path / "A" / "ray_results" / "cnn")
    assert proc.returncode == 130, err[-2000:]
    assert "run the same pipeline command with --resume" in err.strip().splitlines()[-1]
    assert not (tmp_path / "A" / "cnn").exists(), "a reproduce ran after the interrupt"


# ---------------------------------------------------------------- two experiments, one storage
@pytest.mark.slow
def test_two_named_searches_share_a_storage_path_without_interfering(tmp_path, good_data):
    storage = tmp_path / "shared_ray_results"
    counts = {"first": 2, "second": 3}
    for name, n in counts.items():
        (tmp_path / "space.yaml").write_text(TINY_SPACE.format(n=n, epochs=2))
        args = cli_args("search", good_data, tmp_path, "--name", name, "--storage-path", storage)
        proc = run("search", args, tmp_path, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ids = {}
    for name, n in counts.items():
        assert len(list((storage / name).rglob("result.json"))) == n  # Ray's trial records
        out = tmp_path / "artifacts" / "search" / name
        with open(out / "trials.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == n
        ids[name] = {r["trial_id"] for r in rows}
        best = json.loads((out / "best_config.json").read_text())
        assert best["search"]["name"] == name and best["search"]["num_trials"] == n
        assert best["trial_id"] in ids[name]
        assert (out / "optuna.db").is_file()
    assert not ids["first"] & ids["second"]
    assert not (tmp_path / "artifacts" / "ray_results").exists()


# ---------------------------------------------------------------- atomic writes
class FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this on purpose")


def _only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_json_failure_keeps_the_old_file(tmp_path):
    from tune_pets.utils import atomic_write_json

    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"ok": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(path, {"ok": 2, "bad": object()})
    assert path.read_bytes() == before and _only(tmp_path) == ["metrics.json"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_path_failure_midway_keeps_the_old_file(tmp_path, exc):
    from tune_pets.utils import atomic_path, atomic_write_text

    path = tmp_path / "trials.csv"
    atomic_write_text(path, "old,complete\n")
    with pytest.raises(exc), atomic_path(path) as tmp:
        tmp.write_text("new,half")
        raise exc("stopped midway")
    assert path.read_text() == "old,complete\n" and _only(tmp_path) == ["trials.csv"]


def test_atomic_torch_save_failure_midway_keeps_the_old_file(tmp_path):
    import torch

    from tune_pets.utils import atomic_torch_save

    path = tmp_path / "checkpoint_best.pt"
    atomic_torch_save({"epoch": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    # The big tensor is written before the pickler reaches the object that fails.
    with pytest.raises(RuntimeError, match="on purpose"):
        atomic_torch_save({"epoch": 2, "w": torch.zeros(100_000), "z": FailsToPickle()}, path)
    assert path.read_bytes() == before and _only(tmp_path) == ["checkpoint_best.pt"]
    assert torch.load(path, weights_only=True)["epoch"] == 1


_WRITER = """
import sys, torch
from tune_pets.utils import atomic_torch_save
path = sys.argv[1]
blob = torch.arange(3_000_000, dtype=torch.float32)  # 12 MB per write
i = 0
while True:
    i += 1
    atomic_torch_save({"i": i, "blob": blob + i}, path)
    print(i, flush=True)
"""


def test_sigkill_during_atomic_torch_save_leaves_a_loadable_file(tmp_path):
    """Kill a writer that rewrites a 12 MB checkpoint in a loop at random moments: the file
    always loads and holds one complete write (the last reported or the one after it)."""
    import torch

    path = tmp_path / "checkpoint_best.pt"
    rng = random.Random(0)
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)],
            cwd=tmp_path, env=helpers.env(), stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            for _ in range(3):
                assert proc.stdout.readline(), "the writer died"
            time.sleep(rng.uniform(0.0, 0.1))
            proc.kill()
            # read(), not communicate(): that reads the pipe past what readline() buffered.
            out = proc.stdout.read()
            proc.wait(timeout=30)
        finally:
            proc.kill()
        last = int(out.split()[-1]) if out.split() else 3
        state = torch.load(path, weights_only=True)
        assert last <= state["i"] <= last + 1
        assert torch.equal(state["blob"][:3], torch.tensor([0.0, 1.0, 2.0]) + state["i"])
    # What a SIGKILLed writer cannot clean up: at most hidden temp files next to the target.
    assert all(
        n.startswith(".checkpoint_best.pt.") and n.endswith(".tmp")
        for n in _only(tmp_path)
        if n != "checkpoint_best.pt"
    )
