"""Scoring checkpoints: the metric functions (tune_pets.metrics), the checkpoint format
(tune_pets.checkpoint), ``evaluate_checkpoint`` and the evaluate CLI on real checkpoints and tiny
data.

Bad checkpoints, data dirs and held-out classes through a real process: test_hardening.py.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import ok, run
from PIL import Image
from sklearn.metrics import f1_score

from tune_pets.checkpoint import FORMAT, load_checkpoint, trained_module
from tune_pets.engine import FitData, load_fit_data
from tune_pets.evaluate import Evaluation, evaluate_checkpoint, main
from tune_pets.layout import Layout
from tune_pets.metrics import (
    classification_metrics,
    confusion,
    most_confused,
    per_class_rows,
    prediction_spread,
)
from tune_pets.models import get_spec, register
from tune_pets.train import fit
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
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx((y == p).mean())
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert classification_metrics(y, y) == {"accuracy": 1.0, "macro_f1": 1.0}


def test_macro_f1_counts_a_missed_class_and_ignores_absent_ones():
    # Class 2 is present and never predicted: F1 0 and counted. Classes 3, 4 are nowhere.
    y = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 1])
    m = classification_metrics(y, p)
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


def test_prediction_spread():
    """A model that predicts 2 of 4 classes on imbalanced labels: the facts behind a large gap
    between accuracy and macro-F1."""
    y = np.array([0] * 6 + [1] * 2 + [2] + [3])
    p = np.array([0] * 6 + [1, 0, 0, 0])
    s = prediction_spread(confusion(y, p, 4))
    assert s == {
        "classes_predicted": 2,
        "num_classes": 4,
        "top3_class_share": 0.9,
        "max_min_support": [6, 1],
    }


def test_evaluation_writes_per_class_and_confusion_files(tmp_path):
    classes = ["chat été", "golden retriever"]
    labels, preds = np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.array([0, 0, 0, 1, 1, 1, 1, 1])
    ev = Evaluation("test", classes, labels, preds)
    assert ev.cm.tolist() == [[3, 1], [0, 4]]
    assert ev.scores == {"accuracy": 0.875, "macro_f1": pytest.approx(0.8730158), "n_images": 8}
    assert ev.most_confused() == [("chat été", "golden retriever", 1)]
    ev.write(tmp_path / "p.csv", tmp_path / "c.csv", tmp_path / "c.png", "title")
    rows = read_csv(tmp_path / "c.csv")
    assert list(rows[0]) == ["true\\pred", *classes]
    assert [r["true\\pred"] for r in rows] == classes
    assert [[int(r[c]) for c in classes] for r in rows] == ev.cm.tolist()
    per_class = read_csv(tmp_path / "p.csv")
    assert [(r["class"], int(r["support"])) for r in per_class] == [(c, 4) for c in classes]
    with Image.open(tmp_path / "c.png") as im:
        assert im.format == "PNG" and im.size[0] > 100


# ---------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A CNN and a ViT-probe checkpoint, made as the train CLI makes them (``fit`` +
    ``atomic_torch_save``; the train CLI itself is covered in test_train.py). The probe head is
    fit on random features: evaluate must not care, and no backbone runs over the train split."""
    work = tmp_path_factory.mktemp("evaluate")
    art, cache = work / "artifacts", work / "cache"
    cnn = get_spec("cnn").defaults.replace(img_size=32, epochs=2, batch_size=8)
    data = load_fit_data(
        cnn, tiny_data, split_file=work / "val_split.json", cache_dir=cache, progress=False
    )
    atomic_torch_save(fit(cnn, data).checkpoint, work / "cnn.pt")
    vit_spec = get_spec("vit")
    vit = vit_spec.defaults.replace(pretrained=False, epochs=2, batch_size=8)
    x = np.random.default_rng(0).normal(size=(1, 32, 2, 192)).astype(np.float32)
    y = np.arange(32) % 4
    feats = FitData("features", data.classes, x, y, x[0, :8], y[:8], vit_spec.data_config(vit))
    atomic_torch_save(fit(vit, feats).checkpoint, work / "vit.pt")
    return SimpleNamespace(
        work=work, artifacts=art, cache=cache, cnn=work / "cnn.pt", vit=work / "vit.pt"
    )


def test_checkpoint_format(trained):
    ckpt = torch.load(trained.vit, weights_only=True)
    assert ckpt["format"] == FORMAT and ckpt["model"] == "vit" and ckpt["scope"] == "head"
    assert ckpt["classes"] == CLASSES and ckpt["feature_dim"] == 192
    assert set(ckpt["state_dict"]) == {"weight", "bias"}  # the head only: no backbone inside
    module, config, spec = trained_module(load_checkpoint(trained.vit, "vit"))
    assert isinstance(module, torch.nn.Linear) and not module.training
    assert (config.model, config.pretrained, spec.name) == ("vit", False, "vit")
    module, config, _ = trained_module(load_checkpoint(trained.vit), pretrained=True, weights="w")
    assert (config.pretrained, config.weights) == (True, "w")
    # --no-pretrained on a checkpoint made with a weights file: random weights, not that file
    with_file = {**load_checkpoint(trained.vit), "config": {**ckpt["config"], "weights": "/gone"}}
    _, config, _ = trained_module(with_file, pretrained=False)
    assert (config.pretrained, config.weights) == (False, None)


def test_checkpoint_of_an_earlier_version_loads(trained, tmp_path):
    """Checkpoints written before the registry call the probe vit_probe."""
    ckpt = torch.load(trained.vit, weights_only=True)
    ckpt["model"] = ckpt["config"]["model"] = "vit_probe"
    atomic_torch_save(ckpt, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt", "vit")
    assert loaded["model"] == "vit"
    assert trained_module(loaded)[1].model == "vit"


def _random_bytes(path, good):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _truncated(path, good):
    path.write_bytes(good.read_bytes()[:1000])


def _foreign(path, good):
    torch.save({"weights": torch.zeros(3)}, path)


@pytest.mark.parametrize(
    "make, model, expect",
    [
        (None, "cnn", "file not found"),
        (_random_bytes, "cnn", "not a readable checkpoint"),
        (_truncated, "cnn", "not a readable checkpoint"),
        (_foreign, "cnn", "not a tune_pets checkpoint"),
        ("vit", "cnn", "holds a vit model, not cnn"),
    ],
    ids=["missing", "random-bytes", "truncated", "foreign-dict", "other-model"],
)
def test_load_checkpoint_refuses_what_it_cannot_use(trained, tmp_path, make, model, expect):
    path = tmp_path / "c.pt"
    if make == "vit":
        path = trained.vit
    elif make is not None:
        make(path, trained.cnn)
    with pytest.raises(UserError) as e:
        load_checkpoint(path, model)
    msg = str(e.value)
    assert msg.startswith(f"--checkpoint {path}") and expect in msg and "\n" not in msg


def test_weights_that_do_not_fit_the_model(trained, tmp_path):
    """trained_module refuses them, naming what does not fit; load_checkpoint, which builds no
    model, reads the file."""
    ckpt = torch.load(trained.cnn, weights_only=True)
    ckpt["classes"] = ckpt["classes"][:3]  # a head for 3 classes, weights for 4
    with pytest.raises(UserError, match=r"do not fit the model \(size mismatch for head"):
        trained_module(ckpt)
    atomic_torch_save(ckpt, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt", "cnn")["classes"] == ckpt["classes"]


# ---------------------------------------------------------------- evaluate_checkpoint
def test_evaluate_vit_matches_the_full_model_on_images(
    trained, tmp_path, make_image_folder, monkeypatch
):
    """The probe head is scored on cached backbone features; the full model (backbone + head)
    run on the eval-transformed images must give the same predictions. Nothing is written but
    the cache."""
    from tune_pets.data import eval_transform, load_split

    # 2 test images per class (fewer ViT forwards on a CPU), the same class names.
    data_dir = make_image_folder(tmp_path / "d", {c: (1, 2) for c in CLASSES}, seed=5)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    before = sorted(tmp_path.rglob("*"))
    ckpt = load_checkpoint(trained.vit, "vit")
    ev = evaluate_checkpoint(ckpt, data_dir, "test", cache_dir=trained.cache, progress=False)
    assert ev.n_images == 8 and ev.classes == CLASSES and ev.split == "test"
    assert sorted(tmp_path.rglob("*")) == before, "evaluate_checkpoint wrote files"

    spec = get_spec("vit")
    config = spec.defaults.replace(**{k: ckpt["config"][k] for k in ("pretrained", "pooling")})
    full = spec.build(config, len(CLASSES))
    full.head.load_state_dict(ckpt["state_dict"])
    pre = ckpt["preprocess"]
    test = load_split(
        data_dir,
        "test",
        spec.cache_res(config),
        interpolation=pre["interpolation"],
        cache_dir=trained.cache,
        classes=ckpt["classes"],
        progress=False,
    )
    x = eval_transform(
        torch.from_numpy(test.images), pre["img_size"], pre["crop_pct"], pre["mean"], pre["std"]
    )
    with torch.no_grad():
        preds = full.eval()(x).argmax(1).numpy()
    np.testing.assert_array_equal(ev.labels, test.labels)
    np.testing.assert_array_equal(ev.preds, preds)
    assert ev.scores["accuracy"] == pytest.approx(float((preds == test.labels).mean()))
    assert np.trace(ev.cm) == int((preds == test.labels).sum())


def test_evaluate_never_builds_the_backbone_when_features_are_cached(
    trained, tmp_path, make_image_folder
):
    """Features cached by one evaluation are all the next one needs: with the registry's vit
    spec swapped for one whose backbone cannot be built, scoring still works (and on a cold
    cache the swap is what fails, so the check can fail)."""
    data_dir = make_image_folder(tmp_path / "d", {c: (1, 1) for c in CLASSES}, seed=7)
    ckpt = load_checkpoint(trained.vit, "vit")
    warm = tmp_path / "cache"
    first = evaluate_checkpoint(ckpt, data_dir, "test", cache_dir=warm, progress=False)

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was built")

    real = get_spec("vit")
    register(dataclasses.replace(real, build=no_backbone, build_backbone=no_backbone))
    try:
        again = evaluate_checkpoint(ckpt, data_dir, "test", cache_dir=warm, progress=False)
        with pytest.raises(AssertionError, match="the backbone was built"):
            evaluate_checkpoint(ckpt, data_dir, "test", cache_dir=tmp_path / "cold")
    finally:
        register(real)
    np.testing.assert_array_equal(again.preds, first.preds)


def test_class_names_in_another_unicode_form_get_the_rename_hint(
    trained, tmp_path, make_image_folder
):
    """A copy made on macOS spells 'chat été' in NFD (in train/ and test/ alike): those are the
    checkpoint's classes, so the error says to rename them, not that they are other classes."""
    import unicodedata

    nfd = {unicodedata.normalize("NFD", c): (1, 1) for c in CLASSES}
    data_dir = make_image_folder(tmp_path / "d", nfd)
    ckpt = load_checkpoint(trained.cnn, "cnn")
    with pytest.raises(UserError, match="another Unicode form .* the checkpoint's classes"):
        evaluate_checkpoint(ckpt, data_dir, "test", cache_dir=tmp_path / "cache", progress=False)


# ---------------------------------------------------------------- the CLI
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


@pytest.mark.slow
def test_evaluate_cli_cnn(trained, tiny_data, monkeypatch, capsys):
    proc = ok(
        run(
            "evaluate",
            evaluate_argv("cnn", trained.cnn, tiny_data, trained, "--split", "test"),
            trained.work,
        )
    )
    assert "16 images" in proc.stdout
    layout = Layout(trained.artifacts)
    name = "cnn-test"  # the default --name: <model>-<split>
    metrics = json.loads(layout.evaluation_file(name, "test", "metrics.json").read_text())
    assert metrics["checkpoint"] == str(trained.cnn) and metrics["n_images"] == 16
    assert metrics["checkpoint_sha256"] == hashlib.sha256(trained.cnn.read_bytes()).hexdigest()
    assert metrics["checkpoint_epoch"] == torch.load(trained.cnn, weights_only=True)["epoch"]
    assert metrics["prediction_spread"]["num_classes"] == 4
    acc = metrics["accuracy"]
    assert acc > 0.4, "a trained CNN should beat chance (0.25) on the tinted classes"
    rows = [r for r in read_csv(layout.metrics_csv) if (r["model"], r["split"]) == (name, "test")]
    assert len(rows) == 1
    assert float(rows[0]["accuracy"]) == pytest.approx(acc) and int(rows[0]["n_images"]) == 16
    cm_rows = read_csv(layout.evaluation_file(name, "test", "confusion.csv"))
    cells = np.array([[int(r[c]) for c in CLASSES] for r in cm_rows])
    assert cells.sum() == 16 and cells.sum(1).tolist() == [4, 4, 4, 4]
    assert np.trace(cells) / 16 == pytest.approx(acc, abs=1e-6)
    with Image.open(layout.evaluation_file(name, "test", "confusion.png")) as im:
        im.verify()
    per_class = read_csv(layout.evaluation_file(name, "test", "per_class.csv"))
    assert [int(r["support"]) for r in per_class] == [4, 4, 4, 4]
    # Nothing outside evaluate/<name>/ but the metrics.csv row.
    assert sorted(p.name for p in trained.artifacts.iterdir()) == ["evaluate", "metrics.csv"]

    # metrics.csv is upserted: scoring again (in process) replaces the row instead of adding one.
    monkeypatch.chdir(trained.work)
    with pytest.raises(SystemExit) as e:
        cli_main(main, evaluate_argv("cnn", trained.cnn, tiny_data, trained))
    assert e.value.code == 0, capsys.readouterr().err
    rows = [(r["model"], r["split"]) for r in read_csv(layout.metrics_csv)]
    assert rows.count((name, "test")) == 1


def test_evaluate_scores_a_val_folder_by_default(trained, tiny_data, tmp_path, capsys):
    """README: `val/` is accepted for `test/`; evaluate's --split test once refused such data."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "test").rename(data / "val")
    argv = evaluate_argv("cnn", trained.cnn, data, trained)
    argv[argv.index("--artifacts-dir") + 1] = str(tmp_path / "a")
    with pytest.raises(SystemExit) as e:
        cli_main(main, argv)
    assert e.value.code == 0, capsys.readouterr().err
    assert "cnn on val (16 images)" in capsys.readouterr().out
    assert Layout(tmp_path / "a").evaluation_file("cnn-val", "val", "metrics.json").is_file()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--split", "holdout"], ["--split holdout", "{data}/holdout"]),
        # A path: its files went into the dataset folder (and so did a decode-cache entry).
        (["--split", "{data}/test"], ["--split", "must be a plain folder name"]),
        # --name cnn_baseline would replace reproduce's (cnn_baseline, test) row in metrics.csv.
        (["--name", "cnn_baseline"], ["--name cnn_baseline", "reproduce result's tag"]),
    ],
)
def test_evaluate_bad_flag_is_one_line(trained, tiny_data, tmp_path, capsys, flags, words):
    flags = [f.format(data=tiny_data) for f in flags]
    argv = evaluate_argv("cnn", trained.cnn, tiny_data, trained, *flags)
    argv[argv.index("--artifacts-dir") + 1] = str(tmp_path / "a")
    with pytest.raises(SystemExit) as e:
        cli_main(main, argv, prog="python -m tune_pets.evaluate")
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(w.format(data=tiny_data) in err for w in words), err
    assert not (tmp_path / "a").exists()


def test_evaluate_hashes_the_checkpoint_it_scored(
    trained, tiny_data, tmp_path, monkeypatch, capsys
):
    """The hash in metrics.json is of the bytes scored: it was read from the file again after
    the scoring, and a train that rewrote the checkpoint meanwhile lent its own version's."""
    ckpt = tmp_path / "checkpoint_best.pt"
    shutil.copyfile(trained.cnn, ckpt)
    scored = hashlib.sha256(ckpt.read_bytes()).hexdigest()

    def score_then_rewrite(*args, **kwargs):
        result = evaluate_checkpoint(*args, **kwargs)
        atomic_torch_save({**torch.load(ckpt, weights_only=True), "epoch": 99}, ckpt)
        return result

    monkeypatch.setattr("tune_pets.evaluate.evaluate_checkpoint", score_then_rewrite)
    argv = evaluate_argv("cnn", ckpt, tiny_data, trained)
    argv[argv.index("--artifacts-dir") + 1] = str(tmp_path / "a")
    with pytest.raises(SystemExit) as e:
        cli_main(main, argv)
    assert e.value.code == 0, capsys.readouterr().err
    metrics = Layout(tmp_path / "a").evaluation_file("cnn-test", "test", "metrics.json")
    assert json.loads(metrics.read_text())["checkpoint_sha256"] == scored
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() != scored  # it was rewritten


def test_load_checkpoint_names_a_folder_and_a_missing_preprocess_key(trained, tmp_path):
    with pytest.raises(UserError, match="is a folder; pass the checkpoint file in it"):
        load_checkpoint(tmp_path)
    ckpt = torch.load(trained.cnn, weights_only=True)
    del ckpt["preprocess"]["interpolation"]  # was a KeyError traceback in evaluate
    atomic_torch_save(ckpt, tmp_path / "c.pt")
    with pytest.raises(UserError, match=r"incomplete .*missing preprocess\.interpolation"):
        load_checkpoint(tmp_path / "c.pt")
