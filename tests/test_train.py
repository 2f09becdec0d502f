"""fit() on tiny real data (CNN on images, ViT probe on frozen features) and the train CLI
end to end: real files, real timm, real TensorBoard event files.

The engine under fit (data loading, optimizer, schedule, divergence detection, the overfit
check): test_engine.py. Bad input to the CLI through a real process: test_hardening.py.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import ok, run

from tune_pets import cli
from tune_pets.engine import FitData, NonFiniteLossError, load_fit_data
from tune_pets.layout import Layout
from tune_pets.models import get_spec
from tune_pets.train import build_parser, fit, main
from tune_pets.utils import UserError, atomic_torch_save, cli_main, exclusive_lock

METRIC_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "epoch_time_s")
CNN = get_spec("cnn").defaults.replace(img_size=32, epochs=2, batch_size=8, width=16)
VIT = get_spec("vit").defaults.replace(pretrained=False, epochs=2, batch_size=8)


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in history]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- fit() in process
@pytest.fixture(scope="module")
def cnn_data(tiny_data, tmp_path_factory) -> FitData:
    work = tmp_path_factory.mktemp("cnn_data")
    return load_fit_data(
        CNN, tiny_data, split_file=work / "val_split.json", cache_dir=work / "cache", progress=False
    )


@pytest.fixture(scope="module")
def vit_cache(tmp_path_factory):
    """One feature cache for this module: the random-init backbone runs over the data once."""
    return tmp_path_factory.mktemp("vit_cache")


@pytest.fixture(scope="module")
def vit_data(tiny_data, tmp_path_factory, vit_cache) -> FitData:
    work = tmp_path_factory.mktemp("vit_data")
    return load_fit_data(
        VIT, tiny_data, split_file=work / "val_split.json", cache_dir=vit_cache, progress=False
    )


@pytest.mark.parametrize("metric", ["val_acc", "val_loss"])
def test_fit_history_and_checkpoints(cnn_data, metric):
    cfg = CNN.replace(epochs=3, metric=metric)
    sign = 1.0 if metric == "val_acc" else -1.0  # val_loss: lower is better
    calls = []
    result = fit(cfg, cnn_data, lambda m, c: calls.append((m, c)))
    assert len(result.history) == 3 and len(calls) == 3
    for epoch, m in enumerate(result.history, 1):
        assert m["epoch"] == epoch
        for k in METRIC_KEYS:
            assert k in m and math.isfinite(m[k]), (k, m)
        assert 0 <= m["train_acc"] <= 1 and 0 <= m["val_acc"] <= 1
    # A checkpoint exactly on the epochs that improved the metric; the last of them is returned.
    best, expect_best = -math.inf, []
    for m in result.history:
        expect_best.append(sign * m[metric] > best)
        best = max(best, sign * m[metric])
    assert [c is not None for _, c in calls] == expect_best
    assert [m for m, _ in calls] == result.history
    best_epoch = max(i for i, b in enumerate(expect_best, 1) if b)
    assert result.best_epoch == best_epoch
    assert result.best_metrics == result.history[best_epoch - 1]
    ckpt = result.checkpoint
    assert ckpt is calls[best_epoch - 1][1]
    assert ckpt["epoch"] == best_epoch and ckpt["model"] == "cnn" and ckpt["scope"] == "model"
    assert ckpt["classes"] == cnn_data.classes
    assert ckpt["metrics"][metric] == result.best_metrics[metric]
    assert ckpt["config"]["metric"] == metric
    assert (result.precision, result.determinism) == ("fp32", {"seed": 0, "deterministic": False})
    # The model learns the tinted classes.
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert max(m["val_acc"] for m in result.history) > 0.25


def test_checkpoint_loads_with_weights_only(cnn_data, tmp_path):
    result = fit(CNN.replace(epochs=1), cnn_data)
    atomic_torch_save(result.checkpoint, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["format"] == "tune_pets/1"
    assert loaded["config"] == CNN.replace(epochs=1).to_dict()
    assert loaded["preprocess"] == cnn_data.preprocess
    assert_same_state(loaded["state_dict"], result.checkpoint["state_dict"])
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


def test_fit_same_seed_is_identical(cnn_data):
    a = fit(CNN, cnn_data)
    b = fit(CNN, cnn_data)
    assert without_time(a.history) == without_time(b.history)
    assert_same_state(a.checkpoint["state_dict"], b.checkpoint["state_dict"])
    c = fit(CNN.replace(seed=1), cnn_data)
    assert not all(
        torch.equal(a.checkpoint["state_dict"][k], c.checkpoint["state_dict"][k])
        for k in a.checkpoint["state_dict"]
    )


def test_fit_stops_on_divergence_without_reporting_the_epoch():
    """A NaN feature makes the first epoch's loss NaN: fit raises, and the callback (a search
    trial's report) never sees the diverged epoch."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 16, 2, 8)).astype(np.float32)
    x[0, :, 0, 3] = np.nan
    data = FitData("features", ["a", "b"], x, np.arange(16) % 2, x[0], np.arange(16) % 2)
    calls = []
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        fit(VIT.replace(batch_size=4), data, lambda m, c: calls.append(m))
    assert calls == []


@pytest.mark.parametrize("pooling, dim", [("cls", 192), ("mean", 192), ("both", 384)])
def test_vit_probe_fit_on_features(vit_data, pooling, dim):
    assert vit_data.kind == "features" and vit_data.feature_dim == 192
    assert vit_data.train_x.shape == (1, 32, 2, 192) and vit_data.val_x.shape == (8, 2, 192)
    assert vit_data.preprocess["mean"] == (0.5, 0.5, 0.5)
    result = fit(VIT.replace(pooling=pooling), vit_data)
    assert len(result.history) == 2
    for m in result.history:
        for k in METRIC_KEYS:
            assert math.isfinite(m[k]), (k, m)
    ckpt = result.checkpoint
    assert ckpt["scope"] == "head" and ckpt["model"] == "vit" and ckpt["feature_dim"] == 192
    assert set(ckpt["state_dict"]) == {"weight", "bias"}
    assert ckpt["state_dict"]["weight"].shape == (4, dim)


def test_fit_without_val_keeps_last_epoch(cnn_data):
    data = FitData(
        "images",
        cnn_data.classes,
        cnn_data.train_x,
        cnn_data.train_y,
        preprocess=cnn_data.preprocess,
    )
    calls = []
    result = fit(CNN, data, lambda m, c: calls.append(c))
    assert result.best_epoch == 2 and all(c is not None for c in calls)
    assert "val_acc" not in result.history[-1]
    assert result.checkpoint["epoch"] == 2


# ---------------------------------------------------------------- the CLI, end to end
def cnn_args(data_dir, work, runs: str) -> list:
    return [
        "cnn",
        "--data-dir",
        data_dir,
        "--epochs",
        2,
        "--img-size",
        32,
        "--batch-size",
        8,
        "--cache-dir",
        work / "cache",
        "--artifacts-dir",
        work / "artifacts",
        "--runs-dir",
        work / runs,
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def cnn_cli(tiny_data, tmp_path_factory):
    """The CNN trained twice by the CLI with the same flags (second run: warm caches, and the
    first run's TensorBoard folder, which it must start afresh)."""
    work = tmp_path_factory.mktemp("cnn_cli")
    out = Layout(work / "artifacts").train_run("cnn")
    first = run("train", cnn_args(tiny_data, work, "runs1"), work)
    snap = {}
    if first.returncode == 0:
        snap = {
            "metrics": json.loads((out / "metrics.json").read_text(encoding="utf-8")),
            "split": (out / "val_split.json").read_text(encoding="utf-8"),
            "ckpt": torch.load(out / "checkpoint_best.pt", weights_only=True),
        }
    second = run("train", cnn_args(tiny_data, work, "runs1"), work)
    return SimpleNamespace(work=work, out=out, first=first, second=second, **snap)


@pytest.mark.slow
def test_cli_train_cnn_writes_artifacts(cnn_cli):
    ok(cnn_cli.first)
    out = cnn_cli.out
    assert out == cnn_cli.work / "artifacts" / "train" / "cnn"
    assert "epoch   1" in cnn_cli.first.stdout and "epoch   2" in cnn_cli.first.stdout
    ckpt = torch.load(out / "checkpoint_best.pt", weights_only=True)
    assert ckpt["format"] == "tune_pets/1" and ckpt["model"] == "cnn"
    assert ckpt["classes"] == ["Abyssinian", "chat été", "golden retriever", "pug"]
    assert ckpt["config"]["img_size"] == 32 and ckpt["config"]["epochs"] == 2
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["name"] == "cnn" and config["seeds"] == [0]
    assert config["config"]["batch_size"] == 8 and config["config"]["optimizer"] == "adamw"
    assert config["env"]["torch"] == torch.__version__
    assert config["data"]["n_train"] == 32 and config["data"]["n_val"] == 8
    assert config["data"]["split_seed"] == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert len(metrics["history"]) == 2 and metrics["best_epoch"] in (1, 2)
    assert metrics["best"] == metrics["history"][metrics["best_epoch"] - 1]
    assert ckpt["epoch"] == metrics["best_epoch"]
    for m in metrics["history"]:
        for k in METRIC_KEYS:
            assert math.isfinite(m[k]), (k, m)
    split = json.loads((out / "val_split.json").read_text(encoding="utf-8"))
    assert len(split["train"]) == 32 and len(split["val"]) == 8
    assert not set(split["train"]) & set(split["val"])
    assert not list(out.glob(".*.tmp"))
    # An exploratory run writes only its own folder: never reproduce's artifacts/<tag>/.
    assert sorted(p.name for p in (cnn_cli.work / "artifacts").iterdir()) == ["train"]


@pytest.mark.slow
def test_cli_train_writes_tensorboard_scalars(cnn_cli):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ok(cnn_cli.first)
    run_dir = Layout(cnn_cli.work / "artifacts", cnn_cli.work / "runs1").train_tb("cnn")
    assert run_dir == cnn_cli.work / "runs1" / "train" / "cnn"
    # One event file: the rerun deleted the first run's, so its curves are not drawn twice.
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert set(METRIC_KEYS) <= tags
    val_acc = acc.Scalars("val_acc")
    assert [e.step for e in val_acc] == [1, 2]
    expected = [m["val_acc"] for m in cnn_cli.metrics["history"]]
    assert [e.value for e in val_acc] == pytest.approx(expected)


@pytest.mark.slow
def test_cli_train_rerun_is_identical(cnn_cli):
    ok(cnn_cli.first)
    ok(cnn_cli.second)
    out = cnn_cli.out
    again = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert again["best_epoch"] == cnn_cli.metrics["best_epoch"]
    assert without_time(again["history"]) == without_time(cnn_cli.metrics["history"])
    assert (out / "val_split.json").read_text(encoding="utf-8") == cnn_cli.split
    ckpt = torch.load(out / "checkpoint_best.pt", weights_only=True)
    assert_same_state(ckpt["state_dict"], cnn_cli.ckpt["state_dict"])


@pytest.mark.slow
def test_cli_train_vit_probe(tiny_data, tmp_path, vit_data, vit_cache):
    """Also: features cached by another process (vit_data, another split-file path) are
    reused, and --run-name names both output folders."""
    cached = sorted((vit_cache / "features").glob("*.npy"))
    assert len(cached) == 1  # all of train once; the val split indexes into it
    args = [
        "vit",
        "--no-pretrained",
        "--data-dir",
        tiny_data,
        "--epochs",
        2,
        "--batch-size",
        8,
        "--run-name",
        "probe 1",
        "--cache-dir",
        vit_cache,
        "--artifacts-dir",
        tmp_path / "a",
        "--runs-dir",
        tmp_path / "r",
        "--no-progress",
    ]
    proc = ok(run("train", args, tmp_path))
    assert "epoch   2" in proc.stdout
    out = tmp_path / "a" / "train" / "probe 1"
    ckpt = torch.load(out / "checkpoint_best.pt", weights_only=True)
    assert ckpt["model"] == "vit" and ckpt["scope"] == "head"
    assert ckpt["state_dict"]["weight"].shape == (4, 192)
    assert ckpt["config"]["pretrained"] is False
    assert ckpt["preprocess"]["mean"] == (0.5, 0.5, 0.5)
    assert ckpt["preprocess"]["interpolation"] == "bicubic"
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert len(metrics["history"]) == 2
    assert sorted((vit_cache / "features").glob("*.npy")) == cached
    assert list((tmp_path / "r" / "train" / "probe 1").glob("events.out.tfevents.*"))
    # Same features, same seed: the CLI's history is the in-process fit's history.
    assert without_time(metrics["history"]) == without_time(fit(VIT, vit_data).history)


def test_cli_overfit_check(tiny_data, tmp_path, monkeypatch, capsys):
    """The CLI's overfit mode, in process (the interpreter start-up is covered above): PASS,
    exit 0, and no checkpoint or TensorBoard run written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli_main(
            main,
            [
                "cnn",
                "--overfit-batches",
                "1",
                "--data-dir",
                str(tiny_data),
                "--img-size",
                "32",
                "--batch-size",
                "8",
                "--cache-dir",
                "cache",
                "--no-progress",
            ],
        )
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    assert "overfit check (1 batch(es)): PASS" in out
    assert not list((tmp_path / "artifacts").rglob("checkpoint_best.pt"))
    assert not list((tmp_path / "artifacts").rglob("val_split.json"))  # it needs no val split
    assert not (tmp_path / "runs").exists()


def test_rerun_that_cannot_start_leaves_the_earlier_run_whole(tiny_data, tmp_path, capsys):
    """A rerun of a run name whose --runs-dir is a file: it once deleted the earlier run's
    checkpoint, config.json and metrics.json before failing on the TensorBoard folder."""
    argv = cnn_args(tiny_data, tmp_path, "runs")
    argv[argv.index("--epochs") + 1] = 1
    with pytest.raises(SystemExit) as e:
        cli_main(main, list(map(str, argv)))
    assert e.value.code == 0
    out = Layout(tmp_path / "artifacts").train_run("cnn")
    files = ("checkpoint_best.pt", "config.json", "metrics.json", "val_split.json")
    before = {f: (out / f).read_bytes() for f in files}
    (tmp_path / "not_a_dir").write_text("")
    failing = [*argv, "--split-seed", 7]  # a new split is made, then the start fails
    failing[failing.index("--runs-dir") + 1] = tmp_path / "not_a_dir"
    with pytest.raises(SystemExit) as e:
        cli_main(main, list(map(str, failing)))
    assert e.value.code == 2 and "not_a_dir" in capsys.readouterr().err
    assert {f: (out / f).read_bytes() for f in before} == before, "the split was replaced"
    # A failure inside fit, before its first epoch (the TensorBoard folder exists by then):
    # the earlier run's event file was deleted before training.
    events = list((tmp_path / "runs" / "train" / "cnn").glob("events.out.tfevents.*"))
    assert len(events) == 1
    with pytest.raises(SystemExit) as e:
        diverge = ["--optimizer", "sgd", "--weight-decay", 10, "--lr", 10, "--batch-size", 2]
        cli_main(main, list(map(str, [*argv, "--split-seed", 7, *diverge])))
    assert e.value.code == 2 and "lower the learning rate" in capsys.readouterr().err
    assert all(f.is_file() for f in events), "the earlier run's curves were deleted"
    assert {f: (out / f).read_bytes() for f in before} == before


def test_a_second_train_of_the_same_run_name_is_refused_while_one_runs(tiny_data, tmp_path):
    """Two runs writing one run folder would interleave their checkpoints and metrics."""
    lock = Layout(tmp_path / "artifacts").train_run("cnn") / ".lock"
    lock.parent.mkdir(parents=True)
    with exclusive_lock(lock):  # the running one
        with pytest.raises(UserError) as refused:
            main(list(map(str, cnn_args(tiny_data, tmp_path, "runs"))))
        msg = str(refused.value)
        assert "train run 'cnn' is already running (pid " in msg and "--run-name" in msg
        assert sorted(p.name for p in lock.parent.iterdir()) == [".lock"]


# Bad flags in process (fast). The same contract through a real process, for every command, and
# the flags these cases do not cover (unknown model, --batch-size 0, a missing or train-less
# data dir): test_hardening.py.
@pytest.mark.parametrize(
    "argv, expect",
    [
        (["cnn", "--epochs", "0"], "--epochs"),
        (["cnn", "--lr", "-1"], "--lr"),
        (["cnn", "--lr", "nan"], "--lr"),
        (["cnn", "--val-fraction", "1.5"], "--val-fraction"),
        (["cnn", "--split-seed", "-1"], "--split-seed"),
        (["vit", "--img-size", "32", "--no-pretrained"], "--img-size"),
        (["cnn", "--label-smoothing", "1.5"], "--label-smoothing"),
        (["cnn", "--run-name", ".."], "--run-name"),  # would reach outside artifacts/train/
        (["vit", "--weights", "nofile.pt"], "--weights nofile.pt: file not found"),
        # read before the data is decoded (minutes on the full set), not after
        (["vit", "--weights", __file__], "cannot read it as safetensors"),
        # torch parses these: they crashed after the data was loaded
        (["cnn", "--device", "mps"], "--device mps: expected auto, cpu, cuda or cuda:N"),
        (["cnn", "--device", "meta"], "--device meta: expected auto, cpu, cuda or cuda:N"),
    ],
)
def test_cli_bad_flags_fail_with_one_line(tmp_path, monkeypatch, capsys, argv, expect):
    monkeypatch.chdir(tmp_path)
    argv = [*argv, "--data-dir", str(tmp_path / "no_data"), "--cache-dir", str(tmp_path / "c")]
    with pytest.raises(SystemExit) as e:
        cli_main(main, argv, prog="python -m tune_pets.train")
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert expect in err and "Traceback" not in err
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--data-dir", "sample", "--cache-dir", "afile"], "--cache-dir"),
        (["--data-dir", "afile"], "--data-dir afile is a file"),
    ],
)
def test_a_path_option_naming_a_file_is_one_line(tmp_path, monkeypatch, capsys, flags, expect):
    """--cache-dir (or $TUNE_PETS_CACHE) or --data-dir naming a file: one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as e:
        cli_main(main, ["cnn", *flags, "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "afile" in err and expect in err, err


def test_weights_path_is_stored_absolute(tmp_path, monkeypatch):
    """Checkpoints and best_config.json are read from other working folders: a relative
    --weights once crashed evaluate there."""
    monkeypatch.chdir(tmp_path)
    import timm
    from safetensors.torch import save_file

    backbone = timm.create_model(get_spec("vit").defaults.backbone, num_classes=0)
    save_file(backbone.state_dict(), str(tmp_path / "w.safetensors"))  # checked before the data
    args = build_parser().parse_args(["vit", "--weights", "w.safetensors"])
    config = cli.config_from_args(args, get_spec("vit").defaults)
    assert config.weights == str(tmp_path / "w.safetensors")


def _feature_rows(n: int, dim: int, seed: int = 0):
    x = np.random.default_rng(seed).normal(size=(1, n, 2, dim)).astype(np.float32)
    return x, np.arange(n) % 2


def test_fit_reports_the_best_epochs_metrics_not_the_last():
    """The val labels are the train labels flipped, so val_loss is best at epoch 1:
    best_metrics are that epoch's, not the last one's."""
    from tune_pets.engine import FitData
    from tune_pets.models import get_spec
    from tune_pets.train import fit

    x, y = _feature_rows(32, 16)
    data = FitData("features", ["a", "b"], x, y, x[0], 1 - y)
    cfg = get_spec("vit").defaults.replace(epochs=4, batch_size=8, lr=0.05, metric="val_loss")
    result = fit(cfg, data)
    assert result.best_epoch < len(result.history)  # the test's premise
    assert result.best_metrics["epoch"] == result.best_epoch
    assert result.best_metrics == result.history[result.best_epoch - 1]
