"""reproduce, report and the pipeline end to end: real subprocesses, real files, tiny data; the
README's quick start from a plain copy of the repository; figures drawn in their own style.

    python -m pytest tests/test_reproduce_report.py -q               # about 4.5 minutes on 2 cores
    python -m pytest tests/test_reproduce_report.py -q -m "not slow"   # about 15 s

Every command runs as ``python -m tune_pets.<module>`` (``tests/helpers.py``) in a subprocess
of its own session, from an empty working directory, with every output folder under pytest's
tmp_path. Retrains use a 2-block, width-8 CNN at 32 px for 2 epochs on conftest's tiny
ImageFolder (4 classes x 10 train x 4 test JPEGs); their search result is a ``SearchSummary``
written here, not a search. The pipeline tests share one run: ``pipeline --smoke`` from a copy of
the repository with no ``../shared`` beside it, offline, on the photos shipped in the package
(needs the search command).
"""

from __future__ import annotations

import collections
import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import copy_checkout, env, has_checkout, ok, run

from tune_pets.config import RunConfig
from tune_pets.models import get_spec
from tune_pets.records import SearchSummary

REPO = Path(__file__).resolve().parents[1]
PIPELINE_TIMEOUT_S = 600
QUICK_START_TARGET_S = 180  # README: 1-3 minutes on 2 CPU cores, cold caches
TAGS = ("cnn_baseline", "cnn", "vit_baseline", "vit")
# The retrained config of the determinism tests: a few ms per step at 32 px.
TINY_CNN = RunConfig(model="cnn", img_size=32, width=8, depth=2, epochs=2, batch_size=8)


# ---------------------------------------------------------------- commands
def reproduce_args(data: Path, root: Path, cache: Path, *extra, profile_steps=3) -> list:
    """``reproduce cnn`` writing everything under ``root`` (artifacts ``root/A``)."""
    profile = [] if profile_steps is None else ["--profile-steps", profile_steps]
    return [
        "cnn",
        "--data-dir", data,
        "--artifacts-dir", root / "A",
        "--runs-dir", root / "R",
        "--cache-dir", cache,
        "--no-progress",
        *profile,
        *extra,
    ]  # fmt: skip


def write_best_config(path: Path, config: RunConfig = TINY_CNN) -> Path:
    """What a search would leave: ``best_config.json`` as a ``SearchSummary``."""
    SearchSummary(
        model=config.model, config=config.to_dict(), metric="val_acc", mode="max",
        best_value=0.5, trial_id="x", epoch=2, val_acc=0.5,
    ).write(path)  # fmt: skip
    return path


# ---------------------------------------------------------------- file helpers
def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def drop_timings(obj):
    """``obj`` without the keys that measure time (``train_time_s``, ``train_images_per_s``,
    anything ending in ``_s``), recursively."""
    if isinstance(obj, dict):
        return {k: drop_timings(v) for k, v in obj.items() if not k.endswith("_s")}
    if isinstance(obj, (list, tuple)):
        return [drop_timings(v) for v in obj]
    return obj


def assert_same_checkpoint(a, b, where: str = "checkpoint") -> int:
    """Bitwise-equal tensors, equal metadata (timings aside); returns the tensor count."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
        return 1
    if isinstance(a, dict):
        assert isinstance(b, dict), where
        ka = {k for k in a if not str(k).endswith("_s")}
        kb = {k for k in b if not str(k).endswith("_s")}
        assert ka == kb, f"{where}: keys {sorted(ka ^ kb)} in one checkpoint only"
        return sum(assert_same_checkpoint(a[k], b[k], f"{where}.{k}") for k in sorted(ka))
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        return sum(
            assert_same_checkpoint(x, y, f"{where}[{i}]")
            for i, (x, y) in enumerate(zip(a, b, strict=True))
        )
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0


def load_checkpoint(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- REPORT.md parsing
LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
TICKS = re.compile(r"`([^`]+)`")
FILE_EXT = re.compile(r"\.(csv|json|png|md|pt|txt|db|pkl)$")
SEARCH_LINE = re.compile(
    r"(\d+) trials \(of (\d+) planned\): (\d+) completed, (\d+) stopped early by ASHA, "
    r"(\d+) failed"
)
# The baseline vs tuned table's columns.
MODEL, CONFIG, BACKBONE, SIZE, EPOCHS, IMG, SEEDS, ACC, F1, HOMEWORK = range(10)


def sections(report: str) -> dict[str, str]:
    """``{"## cnn": text, "### Search (cnn)": text, ...}``: each heading's own text (up to the
    next heading of any level)."""
    out, head = {}, ""
    for line in report.splitlines():
        if line.startswith("#"):
            head = line.strip()
            out[head] = ""
        else:
            out[head] = out.get(head, "") + line + "\n"
    return out


def claimed_files(report: str) -> list[str]:
    """Every image link, and every backticked path, on lines that do not say "missing"."""
    refs = []
    for line in report.splitlines():
        if "missing" in line.lower():
            continue
        refs += LINK.findall(line)
        for tok in TICKS.findall(line):
            if " " in tok or "::" in tok or tok.startswith("--"):  # commands, ops, flags
                continue
            if "/" in tok or FILE_EXT.search(tok):
                refs.append(tok)
    return refs


def assert_claims_exist(report: str, root: Path) -> list[str]:
    refs = claimed_files(report)
    for ref in refs:
        assert "://" not in ref, ref
        if os.path.isabs(ref):  # the data dir, recorded as given
            assert Path(ref).exists(), f"REPORT.md refers to {ref}, which does not exist"
        else:
            assert (root / ref).exists(), f"REPORT.md refers to {ref}, absent under {root}"
    for link in LINK.findall(report):
        assert not os.path.isabs(link), f"figure links must be relative: {link}"
    return refs


def results_rows(report: str) -> dict[tuple[str, str], list[str]]:
    """The baseline vs tuned table: ``{(model, label): cells}``."""
    table = sections(report)["## Baseline vs tuned (test split, scored once per seed)"]
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| model ") and "---" not in line:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[(cells[MODEL], cells[CONFIG])] = cells
    return rows


def label(tag: str) -> tuple[str, str]:
    model = tag.split("_")[0]
    return model, ("baseline (homework config)" if tag.endswith("_baseline") else "tuned")


# ---------------------------------------------------------------- 1. determinism
@pytest.fixture(scope="module")
def det_runs(tiny_data, tmp_path_factory) -> dict:
    """The same best_config.json reproduced twice (seed 0) into two artifacts dirs, sharing a
    decode cache (the first run decodes, the second reads the cache)."""
    root = tmp_path_factory.mktemp("determinism")
    best = write_best_config(root / "best_config.json")
    cache = root / "cache"
    runs = []
    for name in ("run1", "run2"):
        proc = run(
            "reproduce",
            reproduce_args(tiny_data, root / name, cache, "--best-config", best, "--seed", 0),
            root / name / "cwd",
        )
        runs.append({"proc": proc, "A": root / name / "A", "R": root / name / "R"})
    return {"best": best, "runs": runs, "data": tiny_data, "root": root}


@pytest.mark.slow
def test_reproduce_twice_is_bitwise_identical(det_runs):
    r1, r2 = det_runs["runs"]
    ok(r1["proc"])
    ok(r2["proc"])
    m1 = read_json(r1["A"] / "cnn" / "metrics.json")
    m2 = read_json(r2["A"] / "cnn" / "metrics.json")
    # The timing keys exist (so dropping them is not what makes the files equal) ...
    assert "train_images_per_s" in m1 and "train_time_s" in m1["per_seed"][0]
    # ... and everything else is identical.
    assert drop_timings(m1) == drop_timings(m2)
    assert m1["n_seeds"] == 1 and [r["seed"] for r in m1["per_seed"]] == [0]
    assert (m1["epochs"], m1["img_size"], m1["trial_id"]) == (TINY_CNN.epochs, 32, "x")
    assert 0.0 <= m1["test_acc"] <= 1.0 and 0.0 <= m1["test_macro_f1"] <= 1.0

    c1 = load_checkpoint(r1["A"] / "cnn" / "checkpoint_best.pt")
    c2 = load_checkpoint(r2["A"] / "cnn" / "checkpoint_best.pt")
    n_tensors = assert_same_checkpoint(c1, c2)
    assert n_tensors >= len(c1["state_dict"]) > 0
    assert c1["config"]["deterministic"] is True and c1["config"]["seed"] == 0
    # The confusion matrices (from the same predictions) match too.
    assert (r1["A"] / "confusion_cnn.csv").read_bytes() == (
        r2["A"] / "confusion_cnn.csv"
    ).read_bytes()


@pytest.mark.slow
def test_reproduce_config_json_records_protocol(det_runs):
    import timm
    import torch

    run1 = det_runs["runs"][0]
    ok(run1["proc"])
    c = read_json(run1["A"] / "cnn" / "config.json")
    assert c["name"] == "cnn"
    assert c["deterministic"] is True and c["determinism"]
    assert c["seeds"] == [0]
    assert c["device"] == "cpu" and c["precision"] == "fp32"
    # The resolved config is the best config (the seed and determinism are recorded apart).
    ignore = ("seed", "deterministic")
    assert {k: v for k, v in c["config"].items() if k not in ignore} == {
        k: v for k, v in TINY_CNN.to_dict().items() if k not in ignore
    }
    assert c["origin"]["source"] == str(det_runs["best"])
    assert c["origin"]["trial_id"] == "x" and c["origin"]["val_acc"] == 0.5
    env_ = c["env"]
    assert env_["torch"] == torch.__version__
    assert env_["timm"] == timm.__version__
    assert env_["python"] == ".".join(map(str, sys.version_info[:3]))
    for key in ("numpy", "ray", "optuna", "platform", "cpu_count"):
        assert env_.get(key), f"config.json env lacks {key}"
    assert "git_commit" in env_
    if has_checkout():
        assert re.fullmatch(r"[0-9a-f]{4,40}", env_["git_commit"] or ""), env_["git_commit"]
    assert c["data"]["n_train"] == 40  # all of train: the val split is folded back in
    # TensorBoard logs went to the runs dir given, and nothing to the working directory.
    assert (run1["R"] / "cnn-seed0").is_dir()
    assert list((run1["A"].parent / "cwd").iterdir()) == []
    # One line per epoch reaches a redirected log (stdout is a pipe here).
    epochs = re.findall(r"^cnn seed 0 epoch +(\d+)/2 ", run1["proc"].stdout, re.M)
    assert epochs == ["1", "2"], run1["proc"].stdout


@pytest.mark.slow
def test_reproduce_seeds_mean_std_and_metrics_csv(det_runs, cache_dir, tmp_path):
    """``--seeds 0 1``: two retrains; seed 0 is bitwise the single-seed run of det_runs."""
    args = reproduce_args(
        det_runs["data"], tmp_path, cache_dir, "--best-config", det_runs["best"], "--seeds", 0, 1
    )
    proc = ok(run("reproduce", args, tmp_path / "cwd"))
    art = tmp_path / "A"
    m = read_json(art / "cnn" / "metrics.json")
    per_seed = m["per_seed"]
    assert [r["seed"] for r in per_seed] == [0, 1]
    assert m["n_seeds"] == 2
    accs = [r["test_acc"] for r in per_seed]
    f1s = [r["test_macro_f1"] for r in per_seed]
    assert m["test_acc"] == pytest.approx(statistics.fmean(accs), abs=1e-12)
    assert m["test_macro_f1"] == pytest.approx(statistics.fmean(f1s), abs=1e-12)
    assert m["test_acc_std"] == pytest.approx(statistics.stdev(accs), abs=1e-12)
    assert m["test_macro_f1_std"] == pytest.approx(statistics.stdev(f1s), abs=1e-12)

    # Seed 0 here is the same retrain as the single-seed runs: same numbers, same weights.
    single = read_json(det_runs["runs"][0]["A"] / "cnn" / "metrics.json")
    assert drop_timings(per_seed[0]) == drop_timings(single["per_seed"][0])
    c0 = load_checkpoint(art / "cnn" / "checkpoint_best.pt")
    assert_same_checkpoint(
        c0, load_checkpoint(det_runs["runs"][0]["A"] / "cnn" / "checkpoint_best.pt")
    )
    # Seed 1 is a different run (the seed is not ignored).
    c1 = load_checkpoint(art / "cnn" / "checkpoint_seed1.pt")
    assert c1["config"]["seed"] == 1
    import torch

    assert any(
        not torch.equal(c0["state_dict"][k], c1["state_dict"][k])
        for k in c0["state_dict"]
        if c0["state_dict"][k].is_floating_point()
    ), "seeds 0 and 1 trained identical weights"

    # The per-class rows are the first seed's (their support-weighted recall is its accuracy),
    # and a seed's train time is the sum of its epochs' (as TensorBoard has them).
    per_class = read_csv(art / "cnn" / "per_class_test.csv")
    support = sum(int(r["support"]) for r in per_class)
    recalled = sum(float(r["recall"]) * int(r["support"]) for r in per_class)
    assert recalled / support == pytest.approx(accs[0], abs=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for r in per_seed:
        events = EventAccumulator(str(tmp_path / "R" / f"cnn-seed{r['seed']}"))
        times = [e.value for e in events.Reload().Scalars("epoch_time_s")]
        assert len(times) > 1 and r["train_time_s"] == pytest.approx(sum(times), abs=0.01)

    rows = [r for r in read_csv(art / "metrics.csv") if r["model"] == "cnn"]
    assert len(rows) == 1, rows
    assert int(rows[0]["n_seeds"]) == 2
    assert float(rows[0]["accuracy"]) == pytest.approx(m["test_acc"], abs=1e-6)
    assert float(rows[0]["macro_f1"]) == pytest.approx(m["test_macro_f1"], abs=1e-6)
    assert float(rows[0]["accuracy_std"]) == pytest.approx(m["test_acc_std"], abs=1e-6)
    # Per-seed evaluation files of seed 1 are folded into metrics.json, not left around.
    assert not list(art.glob("*seed1*"))
    assert read_json(art / "cnn" / "config.json")["seeds"] == [0, 1]
    assert "2 seed(s)" in proc.stdout

    # The report shows mean +- std for several seeds.
    ok(run("report", ["--artifacts-dir", art], tmp_path / "cwd", timeout=60))
    cells = results_rows((art / "REPORT.md").read_text(encoding="utf-8"))[("cnn", "tuned")]
    assert cells[SEEDS] == "0, 1"
    assert cells[ACC] == f"{m['test_acc']:.4f} ± {m['test_acc_std']:.4f}"
    assert cells[F1] == f"{m['test_macro_f1']:.4f} ± {m['test_macro_f1_std']:.4f}"


def test_a_retrain_stopped_while_writing_leaves_no_old_scores_in_metrics_csv(
    tiny_data, cache_dir, tmp_path, monkeypatch
):
    """A Ctrl-C during the profile (the last step, after the retrain and its new checkpoint)
    left metrics.csv showing the previous run's scores beside the new files."""
    import torch

    from tune_pets import profiling
    from tune_pets.layout import Layout
    from tune_pets.reproduce import reproduce

    config = get_spec("cnn").defaults.replace(epochs=1, img_size=32, width=8, deterministic=True)
    layout = Layout(tmp_path / "A")
    kw = {"device": torch.device("cpu"), "cache_dir": cache_dir, "progress": False}
    reproduce(config, tiny_data, layout, "cnn", [0], {}, profile_steps=0, **kw)
    assert [r["model"] for r in read_csv(layout.metrics_csv)] == ["cnn"]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(profiling, "run_profile", stopped)
    with pytest.raises(KeyboardInterrupt):
        reproduce(config.replace(lr=0.1), tiny_data, layout, "cnn", [1], {}, profile_steps=1, **kw)
    assert read_csv(layout.metrics_csv) == [] and not layout.result_metrics("cnn").exists()


# ---------------------------------------------------------------- 2. --baseline
@pytest.mark.slow
def test_reproduce_baseline_writes_its_own_tag(tiny_data, cache_dir, tmp_path):
    """The homework config under the same protocol, with reproduce's default profile."""
    args = reproduce_args(tiny_data, tmp_path, cache_dir, "--baseline", "--epochs", 1,
                          "--img-size", 32, profile_steps=None)  # fmt: skip
    ok(run("reproduce", args, tmp_path / "cwd"))
    art = tmp_path / "A"
    out = art / "cnn_baseline"
    for name in ("checkpoint_best.pt", "config.json", "metrics.json", "per_class_test.csv"):
        assert (out / name).is_file(), name
    assert not (art / "cnn").exists(), "--baseline must not write the tuned model's folder"
    assert (art / "confusion_cnn_baseline.png").is_file()
    assert (tmp_path / "R" / "cnn_baseline-seed0").is_dir()
    # The default profile is light: 10 steps (--profile-steps for more).
    profile = read_json(art / "profiler" / "cnn_baseline" / "summary.json")
    assert profile["steps"] == 10

    c = read_json(out / "config.json")
    assert "homework defaults" in c["origin"]["source"]
    assert c["name"] == "cnn_baseline" and c["deterministic"] is True
    expected = get_spec("cnn").defaults.replace(epochs=1, img_size=32, deterministic=True)
    assert c["config"] == expected.to_dict()
    m = read_json(out / "metrics.json")
    assert (m["tag"], m["n_seeds"], m["trial_id"], m["smoke"]) == ("cnn_baseline", 1, None, False)
    assert (m["epochs"], m["img_size"], m["profile_steps"]) == (1, 32, 10)
    rows = read_csv(art / "metrics.csv")
    assert [r["model"] for r in rows] == ["cnn_baseline"]
    assert float(rows[0]["accuracy"]) == pytest.approx(m["test_acc"], abs=1e-6)

    # A rerun replaces the whole result: no profile, seed checkpoint or record of the old run
    # stays beside the new numbers (the report showed the old run's profile as this one's).
    ok(run("reproduce", [*args, "--seeds", 1, 2, "--profile-steps", 0], tmp_path / "cwd"))
    assert sorted(p.name for p in out.glob("checkpoint_*.pt")) == [
        "checkpoint_best.pt",
        "checkpoint_seed2.pt",
    ]
    ok(run("reproduce", [*args, "--profile-steps", 0], tmp_path / "cwd"))
    assert sorted(p.name for p in out.glob("checkpoint_*.pt")) == ["checkpoint_best.pt"]
    assert not (art / "profiler" / "cnn_baseline").exists()
    assert read_json(out / "metrics.json")["profile_steps"] == 0


# ---------------------------------------------------------------- 3. the quick start, plain clone
@pytest.fixture(scope="module")
def quick_start(tmp_path_factory) -> dict:
    """The README's quick start, ``python -m tune_pets.pipeline --smoke``, in a copy of the
    repository with no ``../shared`` beside it, offline, importing the copy (not the editable
    install), with a cold decode cache."""
    if not has_checkout():
        pytest.skip("needs a git checkout to copy")
    root = tmp_path_factory.mktemp("plain_clone")
    clone = copy_checkout(root / "tune_pets")
    assert not (root / "shared").exists()
    extra_env = {"PYTHONPATH": str(clone), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run(  # the package the commands below import
        [sys.executable, "-c", "import tune_pets; print(tune_pets.__file__)"],
        cwd=clone, env=env(**extra_env), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    before = {p for p in clone.rglob("*") if p.is_file()}
    t0 = time.monotonic()
    proc = run(
        "pipeline",
        ["--smoke", "--no-progress", "--cache-dir", root / "cache"],
        clone,
        timeout=PIPELINE_TIMEOUT_S,
        extra_env=extra_env,
    )
    wall = time.monotonic() - t0
    new = {p.relative_to(clone) for p in clone.rglob("*") if p.is_file()} - {
        p.relative_to(clone) for p in before
    }
    return {"proc": proc, "wall": wall, "clone": clone, "A": clone / "artifacts", "new": new,
            "imported": where.stdout.strip()}  # fmt: skip


@pytest.fixture
def report(quick_start) -> str:
    proc, wall = quick_start["proc"], quick_start["wall"]
    assert proc.returncode == 0, (
        f"quick start: exit {proc.returncode} after {wall:.0f}s\nstdout:\n{proc.stdout[-4000:]}"
        f"\nstderr:\n{proc.stderr[-6000:]}"
    )
    path = quick_start["A"] / "REPORT.md"
    assert path.is_file(), f"no REPORT.md after {wall:.0f}s"
    return path.read_text(encoding="utf-8")


@pytest.mark.slow
def test_plain_clone_quick_start_runs_offline(quick_start, report):
    wall = quick_start["wall"]
    assert Path(quick_start["imported"]).is_relative_to(quick_start["clone"]), quick_start
    rows = results_rows(report)
    for kind in ("baseline (homework config)", "tuned"):
        backbone = rows[("vit", kind)][BACKBONE]
        assert "random" in backbone, f"{backbone!r} (quick start took {wall:.0f}s)"
    # The shipped sample: 37 breeds, 5 train images each (the val split folded back in).
    assert "37 classes" in sections(report)["## Data"], f"(quick start took {wall:.0f}s)"
    for tag in ("cnn", "cnn_baseline"):
        assert read_json(quick_start["A"] / tag / "config.json")["data"]["n_train"] == 185
    # Everything went to artifacts/ and runs/ of the working directory, nothing elsewhere.
    stray = sorted(
        str(p) for p in quick_start["new"]
        if p.parts[0] not in ("artifacts", "runs") and "__pycache__" not in p.parts
    )  # fmt: skip
    assert not stray, f"the quick start wrote outside artifacts/ and runs/: {stray[:10]}"
    print(f"quick start: {wall:.0f}s (target <= {QUICK_START_TARGET_S}s on 2 cores, cold caches)")


@pytest.mark.slow
def test_pipeline_report_claims_only_files_that_exist(quick_start, report):
    art = quick_start["A"]
    refs = assert_claims_exist(report, art)
    links = LINK.findall(report)
    # Every figure the pipeline produced is linked: data grids, search plots, confusions.
    for rel in (
        "data_sanity/grid_train.png",
        "data_sanity/grid_test.png",
        *(f"search/{m}/{p}.png" for m in ("cnn", "vit") for p in ("optimization_history",
                                                                    "learning_curves")),
        *(f"confusion_{t}.png" for t in TAGS),
    ):  # fmt: skip
        assert rel in links, f"{rel} not linked"
    for model in ("cnn", "vit"):
        importances = f"search/{model}/param_importances.png"
        search = sections(report)[f"### Search ({model})"]
        assert (importances in links) == (art / importances).is_file()
        assert importances in links or "parameter importances: not drawn" in search, search
    assert "data_sanity/odd_files.csv" in refs
    assert "missing" not in report.lower(), "a complete pipeline run reported something missing"
    for tag in TAGS:
        assert (art / "profiler" / tag / "summary.json").is_file(), tag
        assert f"### Profile ({tag})" in report


@pytest.mark.slow
def test_pipeline_report_table_matches_metrics_json(quick_start, report):
    from tune_pets.pipeline import SMOKE

    rows = results_rows(report)
    assert set(rows) == {label(t) for t in TAGS}
    for tag in TAGS:
        m = read_json(quick_start["A"] / tag / "metrics.json")
        cells = rows[label(tag)]
        assert cells[SEEDS] == "0" and m["n_seeds"] == 1
        assert cells[ACC] == f"{m['test_acc']:.4f}", (tag, cells)
        assert cells[F1] == f"{m['test_macro_f1']:.4f}", (tag, cells)
        # A smoke run, marked as such; baseline and tuned under the same epochs and size.
        assert cells[SIZE] == "smoke" and m["smoke"] is True
        assert cells[EPOCHS] == str(m["epochs"]) == str(SMOKE["epochs"])
        size = SMOKE["img_size"] if tag.startswith("cnn") else 224
        assert cells[IMG] == str(m["img_size"]) == str(size)
        assert m["profile_steps"] == SMOKE["profile_steps"]
    assert "different settings" not in report


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_pipeline_report_search_counts_match_trials_csv(quick_start, report, model):
    from tune_pets.spaces import default_space, load_search_spec

    text = sections(report)[f"### Search ({model})"]
    match = SEARCH_LINE.search(text)
    assert match, text
    n, planned, completed, stopped, failed = map(int, match.groups())
    out = quick_start["A"] / "search" / model
    trials = read_csv(out / "trials.csv")
    status = collections.Counter(r["status"] for r in trials)
    assert n == len(trials)
    assert (completed, stopped, failed) == (
        status["completed"],
        status["stopped early"],
        status["failed"],
    )
    assert completed + stopped + failed == n
    assert planned == load_search_spec(default_space(model, smoke=True)).num_samples == n
    best = read_json(out / "best_config.json")
    assert f"Best trial `{best['trial_id']}`" in text
    assert best["trial_id"] in {r["trial_id"] for r in trials}
    val_acc = re.search(r"val_acc (\d\.\d{4})", text).group(1)
    assert val_acc == f"{best['val_acc']:.4f}"
    assert math.isclose(
        max(float(r["best_val_acc"]) for r in trials if r["best_val_acc"]), best["val_acc"]
    )
    # The tuned retrain is the search's best trial: no stale-trial flag.
    assert read_json(quick_start["A"] / model / "metrics.json")["trial_id"] == best["trial_id"]


@pytest.fixture(scope="module")
def report_missing_profile(quick_start, tmp_path_factory) -> dict:
    """A copy of the pipeline's artifacts without ``profiler/cnn_baseline``, report rerun."""
    ok(quick_start["proc"])
    root = tmp_path_factory.mktemp("report_missing")
    art = root / "A"
    shutil.copytree(quick_start["A"], art, ignore=shutil.ignore_patterns("ray_results"))
    shutil.rmtree(art / "profiler" / "cnn_baseline")
    proc = ok(run("report", ["--artifacts-dir", art], root / "cwd", timeout=60))
    return {"proc": proc, "A": art, "report": (art / "REPORT.md").read_text(encoding="utf-8")}


@pytest.mark.slow
def test_report_says_missing_and_links_nothing_absent(report_missing_profile, report):
    text, art = report_missing_profile["report"], report_missing_profile["A"]
    assert_claims_exist(text, art)
    profile = sections(text)["### Profile (cnn_baseline)"]
    assert "missing" in profile and "profiler/cnn_baseline" in profile, profile
    assert "images/s" not in profile  # no numbers invented for it
    assert "`python -m tune_pets.reproduce cnn --baseline`" in profile, profile
    for ref in claimed_files(text):
        assert "profiler/cnn_baseline" not in ref
    # The other pieces are untouched: same table, the other profiles still reported.
    assert results_rows(text) == results_rows(report)
    for tag in ("cnn", "vit", "vit_baseline"):
        assert "missing" not in sections(text)[f"### Profile ({tag})"]
    assert text.lower().count("missing") == 1


# ---------------------------------------------------------------- 4. figures keep their own style
FIGURE = """
import sys
from pathlib import Path
import numpy as np
if sys.argv[2] == "after_optuna":
    import warnings
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization.matplotlib import plot_optimization_history
    warnings.simplefilter("ignore")  # optuna's ExperimentalWarning
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0) ** 2, n_trials=5)
    plot_optimization_history(study)
    print("facecolor", plt.rcParams["axes.facecolor"], "grid", plt.rcParams["axes.grid"])
from tune_pets.figures import confusion_figure
cm = np.array([[5, 1, 0, 0], [2, 3, 1, 0], [0, 0, 6, 0], [1, 0, 0, 4]])
confusion_figure(cm, ["Abyssinian", "chat été", "golden retriever", "pug"], "cnn on test",
                 Path(sys.argv[1]))
"""


def test_confusion_figure_ignores_the_style_optuna_leaves_behind(tmp_path):
    """The same confusion matrix drawn alone and after Optuna's matplotlib plots (which switch
    the global style to ggplot), each in a fresh process: identical pixels."""
    import numpy as np
    from PIL import Image

    def draw(name: str, mode: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", FIGURE, str(tmp_path / name), mode],
            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=180,
        )  # fmt: skip

    alone = ok(draw("alone.png", "alone"))
    after = ok(draw("after.png", "after_optuna"))
    # The precondition: Optuna did leave its style behind in that process.
    assert "facecolor #E5E5E5 grid True" in after.stdout, (alone.stdout, after.stdout)
    with Image.open(tmp_path / "alone.png") as a, Image.open(tmp_path / "after.png") as b:
        pa, pb = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    assert pa.shape == pb.shape, (pa.shape, pb.shape)
    differ = int((pa != pb).any(axis=-1).sum())
    assert differ == 0, f"{differ} pixels differ after Optuna's plots"


# ---------------------------------------------------------------- 5. the shell wrapper
def _bash(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_pipeline_refuses_to_replace_an_earlier_search_unasked(tmp_path, capsys):
    """It passed --overwrite to every search: a smoke pipeline into the default artifacts/
    deleted a real search's results and Ray state without a word."""
    from tune_pets import pipeline
    from tune_pets.utils import cli_main

    best = write_best_config(tmp_path / "A" / "search" / "cnn" / "best_config.json")
    argv = ["--smoke", "--models", "cnn", "--artifacts-dir", str(tmp_path / "A")]
    with pytest.raises(SystemExit) as e:
        cli_main(pipeline.main, argv)
    line = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "search 'cnn' already has results" in line
    assert "--overwrite" in line and "--resume" in line and "--skip-search" in line
    assert sorted(p.name for p in (tmp_path / "A").iterdir()) == ["search"]  # nothing ran
    assert best.is_file()
    # --resume with results but no Ray state: refused before sanity too (it was refused after,
    # by the search, naming a --name the pipeline does not have).
    with pytest.raises(SystemExit) as e:
        cli_main(pipeline.main, [*argv, "--resume"])
    line = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "no Ray state to continue" in line and "--skip-search" in line
    assert sorted(p.name for p in (tmp_path / "A").iterdir()) == ["search"]


def test_a_second_pipeline_in_one_artifacts_dir_is_refused_at_once(tmp_path):
    """It passed the checks while the first had written nothing, rewrote the first one's sanity
    files, and was refused only at its search, told to pass a --name pipeline does not take."""
    from tune_pets import pipeline
    from tune_pets.layout import Layout
    from tune_pets.utils import UserError, exclusive_lock

    art = tmp_path / "A"
    art.mkdir()
    with exclusive_lock(Layout(art).pipeline_lock):  # the running one
        with pytest.raises(UserError) as refused:
            pipeline.main(["--smoke", "--models", "cnn", "--artifacts-dir", str(art)])
        msg = str(refused.value)
        assert f"a pipeline in {art} is already running (pid " in msg
        assert "another --artifacts-dir" in msg
        assert [p.name for p in art.iterdir()] == [".pipeline.lock"]  # no step ran


def test_a_ctrl_c_in_a_pipeline_says_resume_once_a_search_has_started(tmp_path, monkeypatch):
    """A Ctrl-C in a reproduce step said "run the same command again to start over", which
    is refused (the search has results); before any search it is still the right advice."""
    from tune_pets import pipeline, reproduce, sanity, search

    def ctrl_c(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(sanity, "main", lambda argv: 0)
    monkeypatch.setattr(search, "main", lambda argv: 0)
    monkeypatch.setattr(reproduce, "main", ctrl_c)
    argv = ["--smoke", "--models", "cnn", "--artifacts-dir", str(tmp_path / "A")]
    with pytest.raises(KeyboardInterrupt) as e:
        pipeline.main(argv)
    assert str(e.value) == (
        "step 'reproduce cnn (tuned)' stopped; run the same pipeline command with --resume to go on"
    )
    monkeypatch.setattr(search, "main", lambda argv: 143)  # stopped by SIGTERM, its state saved
    with pytest.raises(KeyboardInterrupt) as e:
        pipeline.main(argv)
    assert str(e.value).startswith("step 'search cnn' stopped; run the same pipeline command with")
    monkeypatch.setattr(sanity, "main", ctrl_c)
    with pytest.raises(KeyboardInterrupt) as e:
        pipeline.main(argv)
    assert str(e.value) == ""  # cli_main's own line: the same command starts over


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--skip-search"], ["--skip-search", "no search results for cnn"]),
        (["--search-space-dir", "nowhere"], ["--search-space-dir nowhere", "no cnn.yaml"]),
        # These two waited for the whole search: reproduce refused them.
        (["--seeds", "1", "1"], ["--seeds 1 1", "distinct"]),
        (["--img-size", "8"], ["--img-size"]),
    ],
)
def test_pipeline_checks_its_flags_before_any_step(tmp_path, capsys, flags, words):
    """These failed only after sanity had run and written its files."""
    from tune_pets import pipeline
    from tune_pets.utils import cli_main

    argv = ["--smoke", "--models", "cnn", "--artifacts-dir", str(tmp_path / "A"), *flags]
    with pytest.raises(SystemExit) as e:
        cli_main(pipeline.main, argv)
    line = capsys.readouterr().err.strip()
    assert e.value.code == 2 and all(w in line for w in words), line
    assert not (tmp_path / "A").exists()


def test_run_pipeline_sh_help(tmp_path):
    proc = _bash(REPO / "scripts" / "run_pipeline.sh", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m tune_pets.pipeline")
    for flag in ("--smoke", "--models", "--seeds", "--no-pretrained", "--artifacts-dir"):
        assert flag in proc.stdout, flag
    assert list(tmp_path.iterdir()) == []


def test_run_pipeline_sh_keeps_relative_paths_relative_to_the_caller(tmp_path):
    """It changed into the repo first: spaces/cnn.yaml here was "not there"."""
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "cnn.yaml").write_text("model: cnn\n")
    args = ["--models", "cnn", "--search-space-dir", "spaces", "--data-dir", "no_data",
            "--artifacts-dir", "A"]  # fmt: skip
    proc = _bash(REPO / "scripts" / "run_pipeline.sh", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "--data-dir no_data does not exist" in proc.stderr, proc.stderr  # the next check


def test_run_pipeline_sh_bad_option_exits_2(tmp_path):
    proc = _bash(REPO / "scripts" / "run_pipeline.sh", "--no-such-flag", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "--no-such-flag" in proc.stderr


# ---------------------------------------------------------------- which config reproduce trains
def test_resolve_config_refuses_what_would_be_trained_wrong(tmp_path, capsys):
    """A folder for --best-config; a best config missing a searched key (it trained at the
    default and was still called tuned); --baseline with --best-config (silently ignored)."""
    from tune_pets.layout import Layout
    from tune_pets.models import get_spec
    from tune_pets.reproduce import main, resolve_config
    from tune_pets.utils import UserError, cli_main

    spec, layout = get_spec("cnn"), Layout(tmp_path / "A")
    with pytest.raises(UserError, match="is a folder; pass the best_config.json in it"):
        resolve_config(spec, tmp_path, layout, baseline=False)
    path = tmp_path / "best_config.json"
    search = {"search_space": {"lr": ["loguniform", [1e-4, 1e-2]]}, "spec_file": "/x/smoke/c.yaml"}
    config = {k: v for k, v in TINY_CNN.to_dict().items() if k != "lr"}
    SearchSummary(model="cnn", config=config, metric="val_acc", mode="max", best_value=0.5,
                  trial_id="x", search=search).write(path)  # fmt: skip
    with pytest.raises(UserError, match="config lacks the searched lr"):
        resolve_config(spec, path, layout, baseline=False)
    config["lr"] = 0.003
    SearchSummary(model="cnn", config=config, metric="val_acc", mode="max", best_value=0.5,
                  trial_id="x", search=search).write(path)  # fmt: skip
    resolved, origin = resolve_config(spec, path, layout, baseline=False)
    assert resolved.lr == 0.003 and origin["smoke"] is True  # a smoke search's retrain is smoke
    with pytest.raises(SystemExit) as e:
        cli_main(main, ["cnn", "--baseline", "--best-config", str(path)])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_retrain_on_the_shipped_sample_is_marked_smoke(tmp_path):
    """It read "full" in the report unless --smoke was passed: 296 photos rank nothing."""
    from tune_pets.reproduce import main

    argv = ["cnn", "--baseline", "--data-dir", "sample", "--epochs", "1", "--img-size", "32",
            "--profile-steps", "0", "--no-progress", "--artifacts-dir", str(tmp_path / "A"),
            "--runs-dir", str(tmp_path / "R"), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    assert read_json(tmp_path / "A" / "cnn_baseline" / "metrics.json")["smoke"] is True


def test_a_searchs_step_cap_is_dropped_from_the_retrain_and_said(tiny_data, tmp_path, capsys):
    """A smoke search caps its epochs' steps; the retrain runs full epochs, and now says so."""
    from tune_pets.reproduce import main

    best = write_best_config(
        tmp_path / "best.json", TINY_CNN.replace(epochs=1, max_steps_per_epoch=2)
    )
    argv = ["cnn", "--best-config", str(best), "--data-dir", str(tiny_data), "--profile-steps",
            "0", "--no-progress", "--runs-dir", str(tmp_path / "R"), "--cache-dir",
            str(tmp_path / "c")]  # fmt: skip
    for extra, cap in (([], 0), (["--max-steps-per-epoch", "2"], 2)):
        art = tmp_path / f"A{cap}"
        assert main([*argv, "--artifacts-dir", str(art), *extra]) == 0
        said = "the retrain runs full epochs" in capsys.readouterr().out
        assert said == (cap == 0)
        assert read_json(art / "cnn" / "config.json")["config"]["max_steps_per_epoch"] == cap
