"""reproduce, report and pipeline end to end: real subprocesses, real files, tiny data.

    python -m pytest tests/test_reproduce_report.py -q          # about 2.5-3.5 minutes on 2 cores
    python -m pytest tests/test_reproduce_report.py -m "not slow"   # usage checks only (seconds)

Every command runs as ``python -m tune_pets.<module>`` in a subprocess of its own session, from
an empty working directory, with every output folder (``--artifacts-dir``, ``--runs-dir``,
``--cache-dir``) under pytest's tmp_path; whatever a pipeline leaves behind (Ray's raylet,
gcs_server, workers) is killed by session id afterwards. Retrains use a 2-block, width-8 CNN at
32 px for 2 epochs on conftest's tiny ImageFolder (4 classes x 10 train x 4 test JPEGs).
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
from pathlib import Path

import pytest
from procs import kill_session

from tune_pets.config import RunConfig, homework_defaults

REPO = Path(__file__).resolve().parents[1]
REPRODUCE_TIMEOUT_S = 180
PIPELINE_TIMEOUT_S = 420
TAGS = ("cnn_baseline", "cnn", "vit_baseline", "vit")
# The retrained config of the determinism tests: a few ms per step at 32 px.
TINY_CNN = RunConfig(model="cnn", img_size=32, width=8, depth=2, epochs=2, batch_size=8)


# ---------------------------------------------------------------- processes
def _env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "TUNE_PETS_DEBUG")
    }
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    return env


def run(cmd: list, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a new session from ``cwd``; kill what it leaves behind."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(
            f"{' '.join(map(str, cmd))} timed out after {timeout}s\n"
            f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
        )
    finally:
        leftover = kill_session(proc.pid)
        assert not leftover, f"processes survived {cmd[:3]}: {leftover}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def module(name: str, *args, cwd: Path, timeout: float = REPRODUCE_TIMEOUT_S):
    return run([sys.executable, "-m", f"tune_pets.{name}", *args], cwd, timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    )
    return proc


def reproduce_args(data: Path, root: Path, cache: Path, *extra) -> list:
    """``reproduce cnn`` writing everything under ``root`` (artifacts ``root/A``)."""
    return [
        "cnn",
        "--data-dir", data,
        "--artifacts-dir", root / "A",
        "--runs-dir", root / "R",
        "--cache-dir", cache,
        "--no-progress",
        "--profile-steps", 3,
        *extra,
    ]  # fmt: skip


def write_best_config(path: Path, config: RunConfig = TINY_CNN) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"config": config.to_dict(), "trial_id": "x", "val_acc": 0.5}
    path.write_text(json.dumps(body), encoding="utf-8")
    return path


# ---------------------------------------------------------------- file helpers
def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def drop_timings(obj):
    """``obj`` without the keys that measure time (``train_time_s``, ``train_images_per_s``,
    ``epoch_time_s``, anything ending in ``_s``), recursively."""
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
            if " " in tok or "::" in tok:  # commands, op names
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
            rows[(cells[0], cells[1])] = cells
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
        proc = module(
            "reproduce",
            *reproduce_args(tiny_data, root / name, cache, "--best-config", best, "--seed", 0),
            cwd=root / name / "cwd",
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
    assert m1["per_seed"][0]["epochs"] == TINY_CNN.epochs
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
    assert c["tag"] == "cnn"
    assert c["deterministic"] is True
    assert c["seeds"] == [0]
    assert c["device"] == "cpu"
    # The resolved config is the best config (the seed and determinism are recorded apart).
    expected = TINY_CNN.to_dict()
    assert {k: v for k, v in c["config"].items() if k not in ("seed", "deterministic")} == {
        k: v for k, v in expected.items() if k not in ("seed", "deterministic")
    }
    assert c["origin"]["source"] == str(det_runs["best"])
    assert c["origin"]["trial_id"] == "x" and c["origin"]["val_acc"] == 0.5
    env = c["env"]
    assert env["torch"] == torch.__version__
    assert env["timm"] == timm.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    for key in ("numpy", "ray", "optuna", "platform", "cpu_count"):
        assert env.get(key), f"config.json env lacks {key}"
    assert "git_commit" in env
    if (REPO / ".git").exists() and shutil.which("git"):
        assert re.fullmatch(r"[0-9a-f]{4,40}", env["git_commit"] or ""), env["git_commit"]
    assert c["data"]["n_train"] == 40  # all of train: the val split is folded back in
    # TensorBoard logs went to the runs dir given, and nothing to the working directory.
    assert (run1["R"] / "cnn-seed0").is_dir()
    assert list((run1["A"].parent / "cwd").iterdir()) == []


@pytest.mark.slow
def test_reproduce_seeds_mean_std_and_metrics_csv(det_runs, cache_dir, tmp_path):
    """``--seeds 0 1``: two retrains; seed 0 is bitwise the single-seed run of det_runs."""
    proc = ok(
        module(
            "reproduce",
            *reproduce_args(
                det_runs["data"], tmp_path, cache_dir, "--best-config", det_runs["best"],
                "--seeds", 0, 1,
            ),
            cwd=tmp_path / "cwd",
        )
    )  # fmt: skip
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
    ok(module("report", "--artifacts-dir", art, cwd=tmp_path / "cwd", timeout=60))
    rows = results_rows((art / "REPORT.md").read_text(encoding="utf-8"))
    cells = rows[("cnn", "tuned")]
    assert cells[2] == "2"
    assert cells[3] == f"{m['test_acc']:.4f} +- {m['test_acc_std']:.4f}"
    assert cells[4] == f"{m['test_macro_f1']:.4f} +- {m['test_macro_f1_std']:.4f}"


# ---------------------------------------------------------------- 2. no search result
def test_reproduce_without_search_says_what_to_do(tiny_data, cache_dir, tmp_path):
    proc = module(
        "reproduce", *reproduce_args(tiny_data, tmp_path, cache_dir), cwd=tmp_path / "cwd"
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("python -m tune_pets.reproduce: error: "), line
    for word in ("tune_pets.search", "--best-config", "--baseline"):
        assert word in line, f"{word!r} not in {line!r}"
    assert str(tmp_path / "A" / "search" / "cnn" / "best_config.json") in line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "A" / "cnn").exists()
    assert not (tmp_path / "A" / "metrics.csv").exists()
    assert not (tmp_path / "R").exists()


def test_reproduce_best_config_for_other_model_is_refused(tiny_data, cache_dir, tmp_path):
    best = write_best_config(tmp_path / "best.json", homework_defaults("vit"))
    proc = module(
        "reproduce",
        *reproduce_args(tiny_data, tmp_path, cache_dir, "--best-config", best),
        cwd=tmp_path / "cwd",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'vit'" in lines[0] and str(best) in lines[0], proc.stderr
    assert not (tmp_path / "A" / "cnn").exists()


# ---------------------------------------------------------------- 3. --baseline
@pytest.mark.slow
def test_reproduce_baseline_writes_its_own_tag(tiny_data, cache_dir, tmp_path):
    ok(
        module(
            "reproduce",
            *reproduce_args(tiny_data, tmp_path, cache_dir, "--baseline", "--epochs", 2,
                            "--img-size", 32),
            cwd=tmp_path / "cwd",
        )
    )  # fmt: skip
    art = tmp_path / "A"
    out = art / "cnn_baseline"
    for name in ("checkpoint_best.pt", "config.json", "metrics.json", "per_class_test.csv"):
        assert (out / name).is_file(), name
    assert not (art / "cnn").exists(), "--baseline must not write the tuned model's folder"
    assert (art / "confusion_cnn_baseline.png").is_file()
    assert (art / "profiler" / "cnn_baseline" / "summary.json").is_file()
    assert (tmp_path / "R" / "cnn_baseline-seed0").is_dir()

    c = read_json(out / "config.json")
    assert "homework defaults" in c["origin"]["source"]
    assert c["tag"] == "cnn_baseline" and c["deterministic"] is True
    expected = homework_defaults("cnn").replace(epochs=2, img_size=32, deterministic=True).to_dict()
    assert c["config"] == expected
    m = read_json(out / "metrics.json")
    assert m["model"] == "cnn_baseline" and m["n_seeds"] == 1
    rows = read_csv(art / "metrics.csv")
    assert [r["model"] for r in rows] == ["cnn_baseline"]
    assert float(rows[0]["accuracy"]) == pytest.approx(m["test_acc"], abs=1e-6)


# ---------------------------------------------------------------- 4. report from a pipeline
def pipeline_args(data: Path, root: Path, *extra) -> list:
    return [
        "--smoke",
        "--data-dir", data,
        "--no-pretrained",
        "--artifacts-dir", root / "A",
        "--runs-dir", root / "R",
        "--cache-dir", root / "cache",
        "--no-progress",
        "--num-cpus", 2,
        # Short retrains: the smoke search spaces are used as shipped.
        "--epochs", 2,
        "--img-size", 32,
        "--profile-steps", 3,
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pipeline_run(tiny_data, tmp_path_factory) -> dict:
    """The smoke pipeline, both models, on the tiny data (50-90 s on 2 cores)."""
    root = tmp_path_factory.mktemp("pipeline")
    proc = module(
        "pipeline", *pipeline_args(tiny_data, root), cwd=root / "cwd", timeout=PIPELINE_TIMEOUT_S
    )
    return {"proc": proc, "root": root, "A": root / "A"}


@pytest.fixture
def report(pipeline_run) -> str:
    ok(pipeline_run["proc"])
    path = pipeline_run["A"] / "REPORT.md"
    assert path.is_file()
    return path.read_text(encoding="utf-8")


@pytest.mark.slow
def test_pipeline_report_claims_only_files_that_exist(pipeline_run, report):
    art = pipeline_run["A"]
    refs = assert_claims_exist(report, art)
    links = LINK.findall(report)
    # Every figure the pipeline produced is linked: data grids, search plots, confusions.
    for rel in (
        "data_sanity/grid_train.png",
        "data_sanity/grid_test.png",
        *(
            f"search/{m}/{p}"
            for m in ("cnn", "vit")
            for p in ("optimization_history.png", "param_importances.png", "learning_curves.png")
        ),
        *(f"confusion_{t}.png" for t in TAGS),
    ):
        assert rel in links, f"{rel} not linked"
    assert "data_sanity/odd_files.csv" in refs
    assert "missing" not in report.lower(), "a complete pipeline run reported something missing"
    # Everything the pipeline ran is there, and nothing escaped into the working directory.
    assert list((pipeline_run["root"] / "cwd").iterdir()) == []
    for tag in TAGS:
        assert (art / "profiler" / tag / "summary.json").is_file(), tag
        assert f"### Profile ({tag})" in report


@pytest.mark.slow
def test_pipeline_report_table_matches_metrics_json(pipeline_run, report):
    rows = results_rows(report)
    assert set(rows) == {label(t) for t in TAGS}
    for tag in TAGS:
        m = read_json(pipeline_run["A"] / tag / "metrics.json")
        cells = rows[label(tag)]
        assert cells[2] == str(m["n_seeds"]) == "1"
        assert cells[3] == f"{m['test_acc']:.4f}", (tag, cells)
        assert cells[4] == f"{m['test_macro_f1']:.4f}", (tag, cells)
        # The pipeline passed --epochs 2 to both retrains (baseline and tuned, same budget).
        assert [r["epochs"] for r in m["per_seed"]] == [2]
        if tag.startswith("cnn"):
            assert read_json(pipeline_run["A"] / tag / "config.json")["config"]["img_size"] == 32


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_pipeline_report_search_counts_match_trials_csv(pipeline_run, report, model):
    text = sections(report)[f"### Search ({model})"]
    match = SEARCH_LINE.search(text)
    assert match, text
    n, planned, completed, stopped, failed = map(int, match.groups())
    out = pipeline_run["A"] / "search" / model
    trials = read_csv(out / "trials.csv")
    status = collections.Counter(r["status"] for r in trials)
    assert n == len(trials)
    assert (completed, stopped, failed) == (
        status["completed"],
        status["stopped early"],
        status["failed"],
    )
    assert completed + stopped + failed == n
    smoke = (REPO / "search_spaces" / "smoke" / f"{model}.yaml").read_text(encoding="utf-8")
    assert planned == int(re.search(r"^num_samples:\s*(\d+)", smoke, re.M).group(1)) == n
    best = read_json(out / "best_config.json")
    assert f"Best trial `{best['trial_id']}`" in text
    assert best["trial_id"] in {r["trial_id"] for r in trials}
    val_acc = re.search(r"val_acc (\d\.\d{4})", text).group(1)
    assert val_acc == f"{best['val_acc']:.4f}"
    assert math.isclose(
        max(float(r["best_val_acc"]) for r in trials if r["best_val_acc"]), best["val_acc"]
    )


@pytest.fixture(scope="module")
def report_missing_profile(pipeline_run, tmp_path_factory) -> dict:
    """A copy of the pipeline's artifacts without ``profiler/cnn_baseline``, report rerun."""
    ok(pipeline_run["proc"])
    root = tmp_path_factory.mktemp("report_missing")
    art = root / "A"
    shutil.copytree(pipeline_run["A"], art, ignore=shutil.ignore_patterns("ray_results"))
    shutil.rmtree(art / "profiler" / "cnn_baseline")
    proc = ok(module("report", "--artifacts-dir", art, cwd=root / "cwd", timeout=60))
    return {"proc": proc, "A": art, "report": (art / "REPORT.md").read_text(encoding="utf-8")}


@pytest.mark.slow
def test_report_says_missing_and_links_nothing_absent(report_missing_profile, report):
    text, art = report_missing_profile["report"], report_missing_profile["A"]
    assert_claims_exist(text, art)
    profile = sections(text)["### Profile (cnn_baseline)"]
    assert "missing" in profile and "profiler/cnn_baseline" in profile, profile
    assert "images/s" not in profile  # no numbers invented for it
    for ref in claimed_files(text):
        assert "profiler/cnn_baseline" not in ref
    # The other pieces are untouched: same table, the other profiles still reported.
    assert results_rows(text) == results_rows(report)
    for tag in ("cnn", "vit", "vit_baseline"):
        assert "missing" not in sections(text)[f"### Profile ({tag})"]
    assert text.lower().count("missing") == 1


@pytest.mark.slow
def test_report_missing_baseline_profile_hint_reruns_the_baseline(report_missing_profile):
    profile = sections(report_missing_profile["report"])["### Profile (cnn_baseline)"]
    assert "`python -m tune_pets.reproduce cnn --baseline`" in profile, profile


# ---------------------------------------------------------------- 5. real sample
@pytest.mark.slow
def test_pipeline_on_real_sample_cnn(sample_dir, tmp_path):
    """The cheapest meaningful run on real photos (37 breeds, odd files included): cnn only,
    2 trials of 1 epoch, 1-epoch retrains at 32 px (40-60 s on 2 cores)."""
    args = pipeline_args(
        sample_dir, tmp_path, "--models", "cnn", "--num-samples", 2, "--max-epochs", 1
    )
    args[args.index("--epochs") + 1] = 1
    ok(module("pipeline", *args, cwd=tmp_path / "cwd", timeout=PIPELINE_TIMEOUT_S))
    art = tmp_path / "A"
    text = (art / "REPORT.md").read_text(encoding="utf-8")
    assert_claims_exist(text, art)
    rows = results_rows(text)
    for tag in ("cnn", "cnn_baseline"):
        m = read_json(art / tag / "metrics.json")
        cells = rows[label(tag)]
        assert cells[3] == f"{m['test_acc']:.4f}" and cells[4] == f"{m['test_macro_f1']:.4f}"
        assert read_json(art / tag / "config.json")["data"]["n_train"] == 570
    assert "37 classes" in sections(text)["## Data"]
    # vit was not run: its rows say missing rather than showing numbers.
    assert "missing" in rows[("vit", "tuned")][3]
    assert not (art / "vit").exists()


# ---------------------------------------------------------------- 6. the shell wrapper
def test_run_pipeline_sh_help(tmp_path):
    proc = run(["bash", REPO / "scripts" / "run_pipeline.sh", "--help"], tmp_path, 60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m tune_pets.pipeline")
    for flag in ("--smoke", "--models", "--seeds", "--no-pretrained", "--artifacts-dir"):
        assert flag in proc.stdout, flag
    assert list(tmp_path.iterdir()) == []


def test_run_pipeline_sh_bad_option_exits_2(tmp_path):
    proc = run(["bash", REPO / "scripts" / "run_pipeline.sh", "--no-such-flag"], tmp_path, 60)
    assert proc.returncode == 2, proc.stderr
    assert "--no-such-flag" in proc.stderr
