"""Evaluation: the metric functions, and the evaluate CLI on real checkpoints and tiny data."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score

from tune_pets.config import homework_defaults
from tune_pets.evaluate import (
    classification_metrics,
    confusion,
    evaluate_checkpoint,
    load_checkpoint,
    main,
    model_from_checkpoint,
    most_confused,
    per_class_rows,
    write_confusion,
)
from tune_pets.models import data_config
from tune_pets.train import FitData, fit, load_fit_data
from tune_pets.utils import UserError, atomic_torch_save, cli_main

CLASSES = ["Abyssinian", "chat été", "golden retriever", "pug"]


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- metric functions
def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 5, 200))
    m = classification_metrics(y, p, 5)
    assert m["accuracy"] == pytest.approx((y == p).mean())
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert classification_metrics(y, y, 5) == {"accuracy": 1.0, "macro_f1": 1.0}


def test_macro_f1_counts_a_missed_class_and_ignores_absent_ones():
    # Class 2 is present and never predicted: F1 0 and counted. Classes 3, 4 are nowhere.
    y = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 1])
    m = classification_metrics(y, p, 5)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((1.0 + 0.8 + 0.0) / 3)


def test_confusion_and_per_class_rows():
    y = np.array([0, 0, 1, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0, 1])
    cm = confusion(y, p, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert cm.sum() == len(y)
    rows = per_class_rows(y, p, ["a", "b", "c", "d"])
    assert [r["class"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["support"] for r in rows] == [2, 3, 1, 0]
    assert rows[0]["precision"] == pytest.approx(0.5) and rows[1]["recall"] == pytest.approx(2 / 3)
    assert rows[2]["f1"] == 0 and rows[3]["f1"] == 0
    assert sorted(most_confused(cm, ["a", "b", "c", "d"])) == [
        ("a", "b", 1),
        ("b", "a", 1),
        ("c", "b", 1),
    ]
    big = np.array([[5, 3, 0], [1, 5, 7], [2, 0, 5]])
    assert most_confused(big, ["x", "y", "z"], k=2) == [("y", "z", 7), ("x", "y", 3)]


def test_write_confusion_files(tmp_path):
    cm = np.array([[3, 1], [0, 4]])
    write_confusion(
        cm, ["chat été", "golden retriever"], tmp_path / "c.csv", tmp_path / "c.png", "title"
    )
    rows = read_csv(tmp_path / "c.csv")
    assert list(rows[0]) == ["true\\pred", "chat été", "golden retriever"]
    assert [[int(r[c]) for c in ("chat été", "golden retriever")] for r in rows] == cm.tolist()
    with Image.open(tmp_path / "c.png") as im:
        assert im.format == "PNG" and im.size[0] > 100


# ---------------------------------------------------------------- checkpoints, then the CLI
@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A CNN and a ViT-probe checkpoint, made as the train CLI makes them (``fit`` +
    ``atomic_torch_save``; the train CLI itself is covered in test_train.py). The probe head is
    fit on random features: evaluate must not care, and no backbone runs over the train split."""
    work = tmp_path_factory.mktemp("evaluate")
    art, cache = work / "artifacts", work / "cache"
    cnn = homework_defaults("cnn").replace(img_size=32, epochs=2, batch_size=8)
    data = load_fit_data(
        cnn, tiny_data, split_file=art / "cnn" / "val_split.json", cache_dir=cache, progress=False
    )
    atomic_torch_save(fit(cnn, data).checkpoint, art / "cnn" / "checkpoint_best.pt")
    vit = homework_defaults("vit").replace(pretrained=False, epochs=2, batch_size=8)
    x = np.random.default_rng(0).normal(size=(1, 32, 2, 192)).astype(np.float32)
    y = np.arange(32) % 4
    feats = FitData("features", data.classes, x, y, x[0, :8], y[:8], data_config(vit))
    atomic_torch_save(fit(vit, feats).checkpoint, art / "vit" / "checkpoint_best.pt")
    return SimpleNamespace(
        work=work,
        artifacts=art,
        cache=cache,
        cnn=art / "cnn" / "checkpoint_best.pt",
        vit=art / "vit" / "checkpoint_best.pt",
    )


def evaluate_argv(model, ckpt, data_dir, trained, *extra) -> list[str]:
    return [
        model,
        "--checkpoint",
        str(ckpt),
        "--data-dir",
        str(data_dir),
        "--artifacts-dir",
        str(trained.artifacts),
        "--cache-dir",
        str(trained.cache),
        "--no-progress",
        *extra,
    ]


def run_evaluate(argv: list[str], cwd) -> subprocess.CompletedProcess:
    """``python -m tune_pets.evaluate ARGV`` in a fresh interpreter; output decoded as UTF-8."""
    return subprocess.run(
        [sys.executable, "-m", "tune_pets.evaluate", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=240,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


def expect_exit_2(argv, capsys, *needles) -> str:
    with pytest.raises(SystemExit) as e:
        cli_main(main, argv, prog="python -m tune_pets.evaluate")
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.slow
def test_evaluate_cli_cnn(trained, tiny_data):
    proc = run_evaluate(
        evaluate_argv("cnn", trained.cnn, tiny_data, trained, "--split", "test"), cwd=trained.work
    )
    assert proc.returncode == 0, proc.stderr
    assert "16 images" in proc.stdout
    art = trained.artifacts
    rows = [r for r in read_csv(art / "metrics.csv") if (r["model"], r["split"]) == ("cnn", "test")]
    assert len(rows) == 1
    acc = float(rows[0]["accuracy"])
    assert int(rows[0]["n_images"]) == 16
    assert acc > 0.4, "a trained CNN should beat chance (0.25) on the tinted classes"
    cm_rows = read_csv(art / "confusion_cnn.csv")
    assert list(cm_rows[0]) == ["true\\pred", *CLASSES]
    assert [r["true\\pred"] for r in cm_rows] == CLASSES
    cells = np.array([[int(r[c]) for c in CLASSES] for r in cm_rows])
    assert cells.sum() == 16 and cells.sum(1).tolist() == [4, 4, 4, 4]
    assert np.trace(cells) / 16 == pytest.approx(acc, abs=1e-6)
    with Image.open(art / "confusion_cnn.png") as im:
        im.verify()
    per_class = read_csv(art / "cnn" / "per_class_test.csv")
    assert [r["class"] for r in per_class] == CLASSES
    assert [int(r["support"]) for r in per_class] == [4, 4, 4, 4]

    # metrics.csv is upserted: scoring again replaces the row instead of adding one.
    ckpt = load_checkpoint(trained.cnn, "cnn")
    again = evaluate_checkpoint(
        ckpt, tiny_data, "test", art, cache_dir=trained.cache, progress=False
    )
    assert again["test_acc"] == pytest.approx(acc, abs=1e-6)
    assert [(r["model"], r["split"]) for r in read_csv(art / "metrics.csv")].count(
        ("cnn", "test")
    ) == 1


def test_evaluate_vit_matches_the_full_model_on_images(trained, tmp_path, make_image_folder):
    """The probe is scored on cached backbone features; the full model (backbone + head) run on
    the eval-transformed images must give the same predictions."""
    from tune_pets.data import cache_res, eval_transform, load_split

    # 2 test images per class (fewer ViT forwards on a CPU), the same class names.
    data_dir = make_image_folder(tmp_path / "d", {c: (1, 2) for c in CLASSES}, seed=5)
    ckpt = load_checkpoint(trained.vit, "vit_probe")
    assert ckpt["scope"] == "head"
    out = evaluate_checkpoint(
        ckpt, data_dir, "test", trained.artifacts, cache_dir=trained.cache, progress=False
    )
    assert out["n_images"] == 8
    model, config = model_from_checkpoint(ckpt)
    assert config.pretrained is False
    pre = ckpt["preprocess"]
    test = load_split(
        data_dir,
        "test",
        cache_res(pre["img_size"], pre["crop_pct"]),
        interpolation=pre["interpolation"],
        cache_dir=trained.cache,
        classes=ckpt["classes"],
        progress=False,
    )
    x = eval_transform(
        torch.from_numpy(test.images), pre["img_size"], pre["crop_pct"], pre["mean"], pre["std"]
    )
    with torch.no_grad():
        preds = model.eval()(x).argmax(1).numpy()
    assert out["test_acc"] == pytest.approx(float((preds == test.labels).mean()))
    rows = {(r["model"], r["split"]) for r in read_csv(trained.artifacts / "metrics.csv")}
    assert ("vit", "test") in rows
    cm_rows = read_csv(trained.artifacts / "confusion_vit.csv")
    cells = np.array([[int(r[c]) for c in CLASSES] for r in cm_rows])
    assert cells.sum() == 8
    assert np.trace(cells) == int((preds == test.labels).sum())


def test_vit_checkpoint_passed_as_cnn(trained, tiny_data, capsys):
    expect_exit_2(
        evaluate_argv("cnn", trained.vit, tiny_data, trained),
        capsys,
        "holds a vit model",
        str(trained.vit),
    )


def test_corrupted_checkpoint(trained, tiny_data, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    expect_exit_2(evaluate_argv("cnn", bad, tiny_data, trained), capsys, "--checkpoint", "bad.pt")


@pytest.mark.slow
def test_corrupted_checkpoint_in_a_real_process(trained, tiny_data, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    proc = run_evaluate(evaluate_argv("cnn", bad, tiny_data, trained), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "bad.pt" in proc.stderr


def test_truncated_and_foreign_checkpoints(trained, tiny_data, tmp_path, capsys):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(trained.cnn.read_bytes()[:1000])
    expect_exit_2(evaluate_argv("cnn", cut, tiny_data, trained), capsys, "cut.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    expect_exit_2(
        evaluate_argv("cnn", foreign, tiny_data, trained), capsys, "not a tune_pets checkpoint"
    )
    expect_exit_2(
        evaluate_argv("cnn", tmp_path / "missing.pt", tiny_data, trained), capsys, "not found"
    )


def test_evaluate_cli_bad_data_dir_and_split(trained, tmp_path, capsys):
    expect_exit_2(
        evaluate_argv("cnn", trained.cnn, tmp_path / "nowhere", trained), capsys, "--data-dir"
    )
    (tmp_path / "only_test" / "test" / "pug").mkdir(parents=True)
    expect_exit_2(
        evaluate_argv("cnn", trained.cnn, tmp_path / "only_test", trained),
        capsys,
        "--data-dir",
        "train/",
    )


def test_evaluate_missing_split_folder(trained, tiny_data, capsys):
    expect_exit_2(
        evaluate_argv("cnn", trained.cnn, tiny_data, trained, "--split", "holdout"),
        capsys,
        "--split holdout",
    )


def test_weights_that_do_not_fit_the_model(trained, tmp_path):
    ckpt = torch.load(trained.cnn, weights_only=True)
    ckpt["config"]["width"] = 8
    with pytest.raises(UserError, match="do not fit"):
        model_from_checkpoint(ckpt)
    atomic_torch_save(ckpt, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt", "cnn")["config"]["width"] == 8


def test_heldout_class_unknown_to_the_checkpoint(trained, tmp_path, make_image_folder, capsys):
    root = make_image_folder(tmp_path / "d", {c: (1, 1) for c in CLASSES})
    make_image_folder(tmp_path / "d", {"zebra": (0, 2)}, seed=1)
    expect_exit_2(evaluate_argv("cnn", trained.cnn, root, trained), capsys, "zebra")
