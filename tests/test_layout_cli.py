"""One artifact layout, one command line: where each command writes (nothing overwrites
another command's result), what every command's ``--help`` says, ``python -m tune_pets``, and
the report's warnings, built from records written directly (no training).

    python -m pytest tests/test_layout_cli.py -q                 # about 30 s on 2 cores
    python -m pytest tests/test_layout_cli.py -q -m "not slow"   # parsers and report: seconds

The parser checks import every command's ``build_parser()``; a command whose module does not
import yet fails its own parametrized case only.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import env, leftovers, ok, run, session_pids

from tune_pets.config import RunConfig
from tune_pets.layout import Layout
from tune_pets.models import model_names
from tune_pets.records import ReproduceResult, RunInfo, SearchSummary
from tune_pets.utils import UserError

COMMANDS = (
    "prepare",
    "sanity",
    "train",
    "evaluate",
    "profiling",
    "search",
    "reproduce",
    "report",
    "pipeline",
)
WRITES_ARTIFACTS = tuple(c for c in COMMANDS if c != "prepare")  # prepare writes a data dir
# The retrained config: a 2-block, width-8 CNN at 32 px, 1 epoch (a few seconds on 2 cores).
TINY_CNN = RunConfig(model="cnn", img_size=32, width=8, depth=2, epochs=1, batch_size=8)


def parser(cmd: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"tune_pets.{cmd}").build_parser()


def options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if not isinstance(a, argparse._HelpAction)]


def flag(a: argparse.Action) -> str:
    return a.option_strings[-1] if a.option_strings else a.dest


def shows_default(default) -> bool:
    """Options whose ``--help`` must say "(default: ...)": a default other than None/False.
    (Identity checks: 0 == False, and a 0 default is worth showing.)"""
    return not (default is None or default is False or default == argparse.SUPPRESS)


def help_blocks(text: str) -> dict[str, str]:
    """``--help`` output split per option: ``{"--data-dir": "its lines joined", ...}``."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line.strip()
        elif current and line.startswith("   ") and line.strip():
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def results_rows(report: str) -> dict[tuple[str, str], list[str]]:
    """The baseline vs tuned table of REPORT.md: ``{(model, "tuned" | "baseline"): cells}``."""
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("| model ") and "---" not in line:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 10:
                rows[(cells[0], "baseline" if "baseline" in cells[1] else "tuned")] = cells
    return rows


# ---------------------------------------------------------------- (a) no command overwrites another
@pytest.mark.slow
def test_train_profiling_evaluate_leave_reproduces_result_alone(tiny_data, tmp_path):
    """reproduce cnn, then train / profiling / evaluate of the same model: each writes only its
    own folder, and REPORT.md still shows the reproduced test accuracy and profile."""
    layout = Layout(tmp_path / "A", tmp_path / "R")
    cwd = tmp_path / "cwd"
    common = ["--data-dir", tiny_data, "--cache-dir", tmp_path / "cache", "--no-progress"]
    out = ["--artifacts-dir", layout.artifacts]
    SearchSummary(
        model="cnn", config=TINY_CNN.to_dict(), metric="val_acc", mode="max", best_value=0.5,
        trial_id="t0", val_acc=0.5,
    ).write(layout.best_config("cnn"))  # fmt: skip
    ok(run("reproduce", ["cnn", *common, *out, "--runs-dir", layout.runs, "--profile-steps", 2],
           cwd))  # fmt: skip
    reproduced = ReproduceResult.read(layout.result_metrics("cnn"), "metrics.json")
    art0, runs0 = tree(layout.artifacts), tree(layout.runs)
    assert "profiler/cnn/summary.json" in art0 and "cnn/checkpoint_best.pt" in art0

    hp = ["--epochs", 1, "--img-size", 32, "--batch-size", 8]
    ok(run("train", ["cnn", *common, *out, "--runs-dir", layout.runs, *hp], cwd))
    art1, runs1 = tree(layout.artifacts), tree(layout.runs)
    for path in changed(art0, art1):
        assert path.startswith("train/cnn/"), f"train wrote {path} outside artifacts/train/"
    assert {"train/cnn/checkpoint_best.pt", "train/cnn/config.json"} <= set(art1)
    for path in changed(runs0, runs1):
        assert path.startswith("train/cnn/"), f"train logged {path} outside runs/train/"
    assert changed(runs0, runs1), "train wrote no TensorBoard logs"

    ok(run("profiling", ["cnn", *common, *out, "--steps", 1, "--img-size", 32], cwd))
    train_ckpt = layout.train_run("cnn") / "checkpoint_best.pt"
    ok(run("evaluate", ["cnn", *common, *out, "--checkpoint", train_ckpt], cwd))
    art2 = tree(layout.artifacts)
    for path in changed(art1, art2):
        assert path.startswith(("profiling/cnn/", "evaluate/cnn-test/")) or path == "metrics.csv", (
            f"profiling or evaluate wrote {path}"
        )
    assert "profiling/cnn/summary.json" in art2 and "evaluate/cnn-test/test_metrics.json" in art2
    # metrics.csv: evaluate added its own row; reproduce's row is untouched.
    rows = (layout.metrics_csv).read_text(encoding="utf-8").splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["cnn", "cnn-test"], rows

    ok(run("report", out, cwd))
    text = layout.report.read_text(encoding="utf-8")
    cells = results_rows(text)[("cnn", "tuned")]
    assert cells[7] == f"{reproduced.test_acc:.4f}", cells
    assert cells[8] == f"{reproduced.test_macro_f1:.4f}", cells
    profile = text.split("### Profile (cnn)")[1].split("###")[0]
    assert "over 2 steps" in profile, profile  # reproduce's profile, not the 1-step standalone
    assert "train/" not in text and "profiling/" not in text
    assert not cwd.exists() or list(cwd.iterdir()) == []


# ---------------------------------------------------------------- (b) every command's parser
@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_option_has_help_and_shows_its_default(cmd, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    p = parser(cmd)
    text = p.format_help()
    blocks = help_blocks(text)
    for a in options(p):
        assert a.help and a.help != argparse.SUPPRESS and a.help.strip(), f"{flag(a)}: no help"
        if a.option_strings and shows_default(a.default):
            shown = " ".join(map(str, a.default)) if isinstance(a.default, list) else a.default
            assert f"(default: {shown}" in blocks[a.option_strings[0]], (
                f"{cmd} --help does not show the default of {flag(a)}: "
                f"{blocks[a.option_strings[0]]!r}"
            )
    assert "`" not in text, f"{cmd} --help has reST/markdown backticks:\n{text}"
    assert "--debug" in blocks


@pytest.mark.parametrize("cmd", WRITES_ARTIFACTS)
def test_commands_that_write_artifacts_take_artifacts_dir(cmd):
    (a,) = [a for a in options(parser(cmd)) if "--artifacts-dir" in a.option_strings]
    assert a.default == "artifacts"


# Flags whose help differs between commands on purpose: (command, flag) -> why.
OWN_MEANING = {
    ("sanity", "--seed"): "seeds the grid sample, not a training run",
    ("search", "--seed"): "seeds the TPE sampler too",
    ("search", "--split-seed"): "its default comes from the search-space YAML",
    ("reproduce", "--seed"): "its default is the retrained config's seed",
    ("reproduce", "--epochs"): "its default is the retrained config's, not the homework's",
    ("reproduce", "--img-size"): "its default is the retrained config's, not the homework's",
    ("reproduce", "--max-steps-per-epoch"): "its default is the retrained config's",
    ("evaluate", "--name"): "names evaluate's output folder (search's: the experiment)",
    ("pipeline", "--epochs"): "the retrains' epochs only (the search's are --max-epochs)",
    ("pipeline", "--img-size"): "the retrains' size; skipped, not refused, for fixed-size models",
    ("pipeline", "--smoke"): "runs the smoke study",
    ("pipeline", "--data-dir"): "its default depends on --smoke",
    ("search", "--max-steps-per-epoch"): "its default is the YAML's fixed value, else 0",
    ("pipeline", "--resume"): "applies to every model's search",
    ("pipeline", "--overwrite"): "applies to every model's search",
    ("reproduce", "--smoke"): "only marks the results as a smoke run",
}


def test_same_flag_same_help_across_commands():
    texts: dict[str, dict[str, str]] = {}
    problems = []
    for cmd in COMMANDS:
        try:
            p = parser(cmd)
        except Exception as e:  # noqa: BLE001 - listed with the other problems below
            problems.append(f"{cmd}: no parser ({type(e).__name__}: {e})")
            continue
        for a in options(p):
            if (cmd, flag(a)) in OWN_MEANING:
                continue
            text = a.help
            if not a.option_strings:  # the model: "which model to train (cnn: ...; vit: ...)"
                text = text[text.index("(") :]
            texts.setdefault(flag(a), {})[cmd] = text
    problems += [f"{f}: {by_cmd}" for f, by_cmd in texts.items() if len(set(by_cmd.values())) > 1]
    assert not problems, "the same flag has different help texts:\n" + "\n".join(problems)
    # The shared flags really are shared.
    for name in ("--data-dir", "--artifacts-dir", "--no-progress", "--no-pretrained"):
        assert len(texts[name]) >= 5, (name, sorted(texts[name]))


@pytest.mark.parametrize("cmd", ("train", "evaluate", "profiling", "search", "reproduce"))
def test_model_argument_lists_the_registry(cmd, capsys):
    p = parser(cmd)
    (a,) = [a for a in options(p) if a.dest == "model"]
    assert list(a.choices) == model_names()
    with pytest.raises(SystemExit) as e:
        p.parse_args(["resnet"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    for word in ("resnet", *model_names()):
        assert word in err


@pytest.mark.parametrize("cmd", ("train", "evaluate", "profiling", "reproduce"))
def test_threads_beyond_the_cpus_is_refused_before_torch_starts_them(cmd, capsys):
    """--threads 100000 reached torch.set_num_threads: 32,444 threads, and the machine's
    process limit ran out (every fork failed) before the command did."""
    p, given = parser(cmd), ["cnn", *(["--checkpoint", "c.pt"] if cmd == "evaluate" else [])]
    assert p.parse_args([*given, "--threads", str(os.cpu_count())]).threads == os.cpu_count()
    with pytest.raises(SystemExit) as e:
        p.parse_args([*given, "--threads", "100000"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "--threads" in err and f"the {os.cpu_count()} CPUs" in err, err


@pytest.mark.parametrize(
    "cmd, argv",
    [
        ("profiling", ["cnn", "--steps", "201"]),
        ("reproduce", ["cnn", "--profile-steps", "201"]),
        ("pipeline", ["--profile-steps", "201"]),
        ("train", ["cnn", "--run-name", "x" * 201]),
    ],
)
def test_numbers_and_names_that_exhaust_the_machine_are_refused(cmd, argv, capsys):
    """--profile-steps 100000000 grew the profiler's trace until the OOM killer ended the run
    (no message; reproduce had already removed the tag's old results); a 300-character
    --run-name failed with a traceback (File name too long)."""
    with pytest.raises(SystemExit) as e:
        parser(cmd).parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and argv[-2] in err and ("200" in err), err


def test_unwritable_storage_path_and_a_folder_in_the_reports_place_are_one_line(tmp_path, capsys):
    """Ray's pyarrow error for a --storage-path it cannot make has no file name (a 39-line
    traceback); a folder named REPORT.md gave an IsADirectoryError traceback."""
    from tune_pets import report, search
    from tune_pets.utils import cli_main

    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        argv = ["cnn", "--data-dir", "sample", "--artifacts-dir", str(tmp_path / "A")]
        cli_main(search.main, [*argv, "--storage-path", str(tmp_path / "file" / "sub")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.endswith("sub: Not a directory; pick a folder you can write")
    (tmp_path / "A" / "REPORT.md").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        cli_main(report.main, ["--artifacts-dir", str(tmp_path / "A")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and f"{tmp_path / 'A' / 'REPORT.md'}: Is a directory" in err, err
    assert len(err.splitlines()) == 1


def test_out_of_memory_is_one_line_naming_the_sizes(capsys):
    """profiling vit --backbone-batches 100000000 asked numpy for 47.7 GiB: a 31-line
    traceback. An allocation that cannot be met is the sizes asked for, not a bug."""
    import numpy as np

    from tune_pets.utils import cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(lambda argv: np.empty((2**40, 2**20), dtype=np.uint8), [])
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err.startswith("tune_pets: error: out of memory (")
    assert err.endswith("use a smaller --batch-size, --img-size or --backbone-batches"), err
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError: its traceback
        cli_main(lambda argv: (_ for _ in ()).throw(RuntimeError("a bug")), [])


# ---------------------------------------------------------------- (c) python -m tune_pets
def test_python_m_tune_pets_lists_every_command(tmp_path):
    def tune_pets(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "tune_pets", *args],
            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    proc = ok(tune_pets())
    listed = re.findall(r"^  (\w+)  ", proc.stdout, re.M)
    assert listed == list(COMMANDS), proc.stdout
    ok_help = ok(tune_pets("report", "--help"))
    assert "--artifacts-dir" in ok_help.stdout
    bad = tune_pets("no_such_command")
    assert bad.returncode == 2 and "no_such_command" in bad.stderr
    # --debug before the command too (it was "unknown command '--debug'"): the traceback.
    debug = tune_pets("--debug", "report", "--artifacts-dir", "missing")
    assert debug.returncode == 2 and "Traceback" in debug.stderr, debug.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_ctrl_c_while_a_command_starts_is_one_line(tmp_path, sig):
    """A Ctrl-C in a command's first seconds, while it imports torch (before ``cli_main``):
    one line and exit 130, not a traceback into torch, and never lost (torch's C extension took
    a KeyboardInterrupt raised while it imported numpy for "numpy not installed"). SIGTERM: the
    same with exit 143 (it killed the command with no line)."""
    how, code = ("interrupted", 130) if sig == signal.SIGINT else ("terminated", 143)
    argv = [sys.executable, "-X", "importtime", "-m", "tune_pets.train", "--help"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env(), stderr=subprocess.PIPE, text=True)
    # -X importtime writes a line as each import ends; the package's own comes first, then the
    # command module's imports take a second or more (torch).
    for line in proc.stderr:
        if line.rstrip().endswith("| tune_pets"):
            break
    proc.send_signal(sig)
    rest = [ln for ln in proc.stderr.read().splitlines() if ln and not ln.startswith("import ")]
    assert proc.wait(timeout=60) == code
    assert rest == [f"python -m tune_pets.train: {how} while starting; nothing was written"]


_STOPPED_IN_EXEC = """
import os, signal, threading
from tune_pets.utils import cli_main

def main(argv):
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    exec("import time\\nwhile True: time.sleep(0.01)")  # as a lazy import's exec would be

cli_main(main, [], prog="stopped_in_exec")
"""


def test_a_sigterm_inside_exec_still_exits_143(tmp_path):
    """A KeyboardInterrupt that left an exec() of a string set CPython's "unhandled
    KeyboardInterrupt" flag, and python -m then died by SIGINT (exit -2) after printing the
    right line: 3 of 15 SIGTERMed evaluate/reproduce runs, whose imports exec code."""
    (tmp_path / "stopped_in_exec.py").write_text(_STOPPED_IN_EXEC)
    argv = [sys.executable, "-m", "stopped_in_exec"]
    proc = subprocess.run(argv, cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().startswith("stopped_in_exec: terminated:"), proc.stderr


def test_the_harness_sees_a_process_a_command_left_behind():
    """Every subprocess test asserts that its command left nothing running; the check once
    killed the processes first and then asked which were alive (never any)."""
    code = "import subprocess; subprocess.Popen(['sleep', '300'])"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    assert proc.wait(timeout=30) == 0
    left = leftovers(proc.pid, grace_s=1)
    assert len(left) == 1 and not session_pids(proc.pid), left  # found, then killed


# ---------------------------------------------------------------- (d) the report's warnings
def _result(tag: str, acc: float, f1: float, epochs: int, img: int, **kw) -> ReproduceResult:
    seed = {"seed": 0, "test_acc": acc, "test_macro_f1": f1}
    return ReproduceResult(tag=tag, split="test", test_acc=acc, test_macro_f1=f1,
                           per_seed=[seed], epochs=epochs, img_size=img, **kw)  # fmt: skip


def _summary(model: str, trial_id: str) -> SearchSummary:
    config = RunConfig(model=model).to_dict()
    return SearchSummary(model=model, config=config, metric="val_acc", mode="max",
                         best_value=0.5, trial_id=trial_id, epoch=1, val_acc=0.5)  # fmt: skip


def _profile(steps: int) -> dict:
    return {"step": "full CNN on augmented image batches", "images_per_s": 100.0,
            "step_time_ms": 80.0, "batch_size": 8, "img_size": 64, "device": "cpu",
            "steps": steps}  # fmt: skip


@pytest.fixture
def flagged_report(tmp_path) -> str:
    """Artifacts that should each raise one flag: cnn baseline and tuned trained under different
    epochs and sizes, on different data; cnn's tuned row retrained from trial aaaa1111 while the
    search now says bbbb2222; random ViT backbones in a smoke run; vit's baseline with accuracy
    far above macro-F1 (5 of 37 classes predicted); a 5-step cnn profile. vit's pair is the
    control: same settings, same data, same trial."""
    from tune_pets.utils import atomic_write_json

    layout = Layout(tmp_path / "A")
    spread = {"classes_predicted": 5, "num_classes": 37, "top3_class_share": 0.7312,
              "max_min_support": [150, 3]}  # fmt: skip
    results = [
        _result("cnn_baseline", 0.30, 0.28, epochs=3, img=64),
        _result("cnn", 0.35, 0.33, epochs=2, img=128, trial_id="aaaa1111"),
        _result("vit_baseline", 0.42, 0.04, 2, 224, backbone="random", smoke=True,
                prediction_spread=spread),
        _result("vit", 0.10, 0.09, 2, 224, backbone="random", smoke=True, trial_id="cccc3333",
                prediction_spread={**spread, "classes_predicted": 30}),
    ]  # fmt: skip
    for r in results:
        r.write(layout.result_metrics(r.tag))
    for tag, data_dir, fingerprint in (
        ("cnn_baseline", "sample", "f1"),
        ("cnn", "data/a", "f2"),
        ("vit_baseline", "data/a", "f2"),
        ("vit", "data/a", "f2"),
    ):
        data = {"data_dir": data_dir, "train_fingerprint": fingerprint}
        RunInfo(name=tag, config={}, data=data).write(layout.result_config(tag))
    _summary("cnn", "bbbb2222").write(layout.best_config("cnn"))
    _summary("vit", "cccc3333").write(layout.best_config("vit"))
    atomic_write_json(layout.profile("cnn") / "summary.json", _profile(5))
    atomic_write_json(layout.profile("cnn_baseline") / "summary.json", _profile(50))
    from tune_pets import report

    assert report.main(["--artifacts-dir", str(layout.artifacts)]) == 0
    return layout.report.read_text(encoding="utf-8")


def test_report_rows_say_backbone_size_epochs_img_and_seeds(flagged_report):
    rows = results_rows(flagged_report)
    #   model, config, backbone, size, epochs, img, seeds, test_acc, test_macro_f1, homework
    assert rows[("cnn", "baseline")][2:9] == ["-", "full", "3", "64", "0", "0.3000", "0.2800"]
    assert rows[("cnn", "tuned")][2:7] == ["-", "full", "2", "128", "0"]
    for kind in ("baseline", "tuned"):
        backbone, size = rows[("vit", kind)][2:4]
        assert "random" in backbone and "meaningless" in backbone, backbone
        assert size == "smoke"


def test_report_gives_each_score_its_own_std(tmp_path):
    from tune_pets.report import results_section

    layout = Layout(tmp_path)
    seeds = [{"seed": 0}, {"seed": 1}]
    ReproduceResult(tag="cnn", split="test", test_acc=0.5, test_macro_f1=0.4, test_acc_std=0.01,
                    test_macro_f1_std=0.02, n_seeds=2, per_seed=seeds,
                    ).write(layout.result_metrics("cnn"))  # fmt: skip
    row = next(line for line in results_section(layout) if line.startswith("| cnn | tuned"))
    assert "| 0.5000 ± 0.0100 | 0.4000 ± 0.0200 |" in row, row


def test_report_names_the_heldout_split_and_small_tuned_values_in_full(tmp_path):
    """A copy with val/ and no test/ is scored on val/: the heading said "test split". A tuned
    weight decay of 1.4e-06 read 0.000001 (6 decimals)."""
    from tune_pets.report import results_section, search_section

    layout = Layout(tmp_path)
    ReproduceResult(tag="cnn", split="val", test_acc=0.5, test_macro_f1=0.4).write(
        layout.result_metrics("cnn")
    )
    assert results_section(layout)[0].startswith("## Baseline vs tuned (val split,")
    summary = _summary("cnn", "aaaa1111")
    summary.config["weight_decay"] = 1.4e-06
    summary.search["search_space"] = {"weight_decay": ["loguniform", [1e-06, 0.1]]}
    summary.write(layout.best_config("cnn"))
    assert "| weight_decay | 1.4e-06 | loguniform" in "\n".join(search_section(layout, "cnn"))


def test_report_says_when_the_tuned_row_retrains_the_baseline_config(tmp_path):
    """The search may pick the homework point (it is evaluated first): the two rows were
    identical with no word on why, which read as a bug; with other fixed settings (the shipped
    spaces) whole configs never matched and the note never came."""
    from tune_pets.report import results_section

    layout = Layout(tmp_path)
    config = RunConfig(model="vit").to_dict()
    for tag in ("vit", "vit_baseline"):
        _result(tag, 0.036, 0.0228, epochs=2, img=224).write(layout.result_metrics(tag))
        RunInfo(name=tag, config=config).write(layout.result_config(tag))
    said = [n for n in results_section(layout) if "picked the homework configuration" in n]
    assert len(said) == 1 and said[0].startswith("- vit:"), said
    RunInfo(name="vit", config={**config, "lr": 0.01}).write(layout.result_config("vit"))
    assert not [n for n in results_section(layout) if "picked the homework" in n]
    # The shipped spaces fix epochs and img_size apart from the homework's: the rows then
    # differ there even when every searched value is the homework's.
    summary = _summary("vit", "aaaa1111")
    summary.search["search_space"] = {"lr": ["loguniform", [1e-4, 1e-2]]}
    summary.write(layout.best_config("vit"))
    RunInfo(name="vit", config={**config, "epochs": 20}).write(layout.result_config("vit"))
    (said,) = [n for n in results_section(layout) if "picked the homework" in n]
    assert said == (
        "- vit: the search picked the homework's value of every searched hyperparameter (its "
        "first point); the rows differ only in settings it did not search: epochs."
    )
    RunInfo(name="vit", config={**config, "epochs": 20, "lr": 0.01}).write(
        layout.result_config("vit")
    )
    assert not [n for n in results_section(layout) if "picked the homework" in n]


def _notes(report: str) -> list[str]:
    section = report.split("## Baseline vs tuned")[1].split("\n## ")[0]
    return [line for line in section.splitlines() if line.startswith("- ")]


def test_report_flags_each_misleading_comparison_once(flagged_report):
    notes = _notes(flagged_report)
    settings = [n for n in notes if "different settings" in n]
    assert len(settings) == 1 and "cnn" in settings[0], notes
    assert "3 epochs at 64 px" in settings[0] and "2 epochs at 128 px" in settings[0]
    stale = [n for n in notes if "trial" in n]
    assert len(stale) == 1 and "aaaa1111" in stale[0] and "bbbb2222" in stale[0], notes
    assert "python -m tune_pets.reproduce cnn --data-dir data/a`" in stale[0]  # its data
    diverge = [n for n in notes if "macro-F1" in n]
    assert len(diverge) == 1 and diverge[0].startswith("- vit_baseline"), notes
    assert "5 of 37 classes" in diverge[0] and "73 %" in diverge[0], diverge
    data = [n for n in notes if "different data" in n]
    assert len(data) == 1 and "cnn" in data[0] and "`sample`" in data[0], notes
    assert len(notes) == 4, notes  # nothing flagged for the vit pair


def test_report_flags_a_step_capped_retrain_and_labels_first_seed_figures(tmp_path):
    """A capped retrain read as the same "2 | 64" as a full one; the figures and the class count
    of the divergence note are the first seed's, beside the seeds' mean, and said nothing."""
    from tune_pets.report import build_report

    layout = Layout(tmp_path / "A")
    spread = {"classes_predicted": 5, "num_classes": 37}
    base = _result("cnn_baseline", 0.5, 0.1, 2, 64, n_seeds=2, prediction_spread=spread,
                   most_confused=[["a", "b", 3]])  # fmt: skip
    base.per_seed.append({"seed": 1, "test_acc": 0.5, "test_macro_f1": 0.1})
    base.write(layout.result_metrics("cnn_baseline"))
    _result("cnn", 0.5, 0.4, 2, 64, max_steps_per_epoch=2).write(layout.result_metrics("cnn"))
    report = build_report(layout)
    settings = [n for n in _notes(report) if "different settings" in n]
    assert len(settings) == 1 and "2 epochs of at most 2 steps at 64 px" in settings[0], report
    assert "| 2 (<= 2 steps) | 64 |" in report
    assert "the model (seed 0, the first of 2) ever predicts 5 of 37" in report
    confusion = report.split("### Confusion matrix (cnn_baseline)")[1].split("###")[0]
    assert "of one run (seed 0, the first of 2)" in confusion
    assert "sample standard deviation" in report


def test_report_says_how_many_steps_a_profile_rests_on(flagged_report):
    short = flagged_report.split("### Profile (cnn)\n")[1].split("###")[0]
    assert "5 steps" in short and "short sample" in short and "--profile-steps" in short, short
    enough = flagged_report.split("### Profile (cnn_baseline)\n")[1].split("###")[0]
    assert "50 steps" in enough and "short sample" not in enough, enough


def test_report_follows_the_named_search_the_tuned_result_came_from(tmp_path):
    """reproduce --best-config search/k3/best_config.json: the report showed search/cnn/ (or
    "missing") and told the user to retrain from it, which would replace the k3 result."""
    from tune_pets import report

    layout = Layout(tmp_path / "A")
    _summary("cnn", "aaaa1111").write(layout.best_config("k3"))
    _summary("cnn", "bbbb2222").write(layout.best_config("cnn"))  # another search
    _result("cnn", 0.35, 0.33, epochs=2, img=128, trial_id="aaaa1111").write(
        layout.result_metrics("cnn")
    )
    origin = {"source": str(layout.best_config("k3").resolve()), "trial_id": "aaaa1111"}
    RunInfo(name="cnn", config=RunConfig().to_dict(), origin=origin).write(
        layout.result_config("cnn")
    )
    assert report.main(["--artifacts-dir", str(layout.artifacts)]) == 0
    text = layout.report.read_text(encoding="utf-8")
    assert "### Search (cnn, --name k3)" in text and "Best trial `aaaa1111`" in text
    assert "bbbb2222" not in text


# ---------------------------------------------------------------- metrics.csv, its one writer
def test_metrics_csv_rows_from_concurrent_writers_are_all_kept(tmp_path):
    """An evaluate during a reproduce into one --artifacts-dir: each read-change-replace of
    metrics.csv once raced the other (2 x 100 rows ended as 149)."""
    code = (
        "import sys; from pathlib import Path; from tune_pets.records import write_metrics_row\n"
        "for i in range(100):\n"
        "    write_metrics_row(Path(sys.argv[1]), f'{sys.argv[2]}{i}', 'test', {'accuracy': i})\n"
    )
    path = tmp_path / "metrics.csv"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), tag], env=env())
        for tag in ("a", "b")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    rows = path.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + 200 and len(set(rows)) == 201


def test_metrics_csv_scores_have_one_precision_whoever_writes_them(tmp_path):
    from tune_pets.records import write_metrics_row

    path = tmp_path / "metrics.csv"
    write_metrics_row(path, "cnn", "test", {"accuracy": 2 / 3, "n_seeds": 1, "n_images": 3})
    row = path.read_text(encoding="utf-8").splitlines()[1].split(",")
    assert row[:4] == ["cnn", "test", "0.666667", ""] and row[-2:] == ["1", "3"]


@pytest.mark.parametrize(
    "content", [bytes(range(256)), b"a,b\n1,2\n"], ids=["not-text", "other-columns"]
)
def test_metrics_csv_that_is_not_the_table_is_refused_not_overwritten(tmp_path, content):
    from tune_pets.records import write_metrics_row
    from tune_pets.utils import UserError

    path = tmp_path / "metrics.csv"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"metrics.csv: not a table with the columns model, split"):
        write_metrics_row(path, "cnn", "test", {"accuracy": 0.5})
    assert path.read_bytes() == content


# ---------------------------------------------------------------- report on damaged artifacts
def test_report_shows_damaged_artifacts_as_damaged_and_still_writes(tmp_path, capsys):
    """Valid JSON of the wrong shape crashed the report (AttributeError), a non-UTF-8
    top_ops.csv too (UnicodeDecodeError); an unreadable file was shown as "missing"."""
    from tune_pets import report
    from tune_pets.utils import cli_main

    layout = Layout(tmp_path / "A")
    files = {
        layout.sanity_summary: b"[]",
        layout.profile("cnn") / "summary.json": b"[1, 2]",
        layout.profile("cnn") / "top_ops.csv": bytes(range(256)),
        layout.result_metrics("cnn"): b'{"test_acc": 0.5',
        layout.best_config("cnn"): b'"x"',
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        cli_main(report.main, ["--artifacts-dir", str(layout.artifacts)])
    assert e.value.code == 0, capsys.readouterr().err
    text = layout.report.read_text(encoding="utf-8")
    for what in ("data sanity summary", "metrics.json (run `python -m tune_pets.reproduce cnn`)",
                 "search results in `search/cnn/`", "profiler/cnn/summary.json"):  # fmt: skip
        assert f"_damaged: {what}" in text, what
    assert "_missing: metrics.json (run `python -m tune_pets.reproduce vit`)" in text


_SANITY = {"data_dir": "d", "num_classes": 2, "counts": {"train": 4}, "splits": ["train"],
           "per_class": {"train": {"min": 2, "max": 2}}, "sizes": {"all": {"n": 4}}}  # fmt: skip


@pytest.mark.parametrize(
    "file, field, value, damaged",
    [
        ("sanity", "counts", "abc", "data sanity summary"),
        ("sanity", "per_class", [1], "data sanity summary"),
        ("sanity", "sizes", None, "data sanity summary"),
        ("sanity", "splits", None, "data sanity summary"),
        ("profile", "steps", "abc", "profiler/cnn/summary.json"),
        ("search", "sessions", "abc", "search/cnn/best_config.json"),
        ("search", "search_space", "abc", "search/cnn/best_config.json"),
    ],
)
def test_a_field_of_the_wrong_type_damages_its_section_not_the_report(
    tmp_path, capsys, file, field, value, damaged
):
    """JSON of the right type with a field of the wrong one ("counts": "abc") crashed the
    whole report with a traceback: now that section says "damaged" and the others stand."""
    from tune_pets import report
    from tune_pets.utils import atomic_write_json, cli_main

    layout = Layout(tmp_path / "A")
    summary = _summary("cnn", "aaaa1111")
    summary.search.update(sessions=1, search_space={"lr": ["loguniform", [1e-4, 1e-2]]})
    files = {"sanity": (layout.sanity_summary, json.loads(json.dumps(_SANITY))),
             "profile": (layout.profile("cnn") / "summary.json", _profile(50)),
             "search": (layout.best_config("cnn"), summary.to_dict())}  # fmt: skip
    _result("cnn", 0.5, 0.4, epochs=2, img=64).write(layout.result_metrics("cnn"))
    for path, content in files.values():
        atomic_write_json(path, content)
    with pytest.raises(SystemExit) as e:
        cli_main(report.main, ["--artifacts-dir", str(layout.artifacts)])
    assert e.value.code == 0, capsys.readouterr().err
    assert "_damaged" not in layout.report.read_text(encoding="utf-8")
    path, content = files[file]
    inner = content["search"] if file == "search" else content
    inner[field] = value
    atomic_write_json(path, content)
    with pytest.raises(SystemExit) as e:
        cli_main(report.main, ["--artifacts-dir", str(layout.artifacts)])
    assert e.value.code == 0, capsys.readouterr().err
    text = layout.report.read_text(encoding="utf-8")
    assert text.count("_damaged") == 1 and f"_damaged: {damaged} (run `" in text
    assert "| cnn | tuned |" in text and "## Environment" in text


@pytest.mark.parametrize(
    "field, value", [("test_acc", "high"), ("n_seeds", True), ("epochs", 2.5), ("per_seed", {})]
)
def test_a_record_field_of_the_wrong_type_is_damage_not_a_crash(tmp_path, capsys, field, value):
    """A hand-edited metrics.json ("test_acc": "high") crashed the report's formatting."""
    from tune_pets import report
    from tune_pets.utils import cli_main

    layout = Layout(tmp_path / "A")
    good = ReproduceResult(tag="cnn", split="test", test_acc=0.5, test_macro_f1=0.4, epochs=3)
    path = layout.result_metrics("cnn")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**good.to_dict(), "test_acc_std": 0}))  # an int float: fine
    assert ReproduceResult.read(path, "metrics file").test_acc == 0.5
    path.write_text(json.dumps({**good.to_dict(), field: value}))
    with pytest.raises(UserError, match=rf"{field} is a \w+ \(.*\), not "):
        ReproduceResult.read(path, "metrics file")
    with pytest.raises(SystemExit) as e:
        cli_main(report.main, ["--artifacts-dir", str(layout.artifacts)])
    assert e.value.code == 0, capsys.readouterr().err
    assert "_damaged: metrics.json" in layout.report.read_text(encoding="utf-8")


def test_metrics_items_of_the_wrong_shape_are_damage_not_a_crash(tmp_path, capsys):
    """ "per_seed": [1] and "most_confused": [1] passed the field type check and crashed the
    report (AttributeError, TypeError: cannot unpack)."""
    from tune_pets import report
    from tune_pets.utils import cli_main

    layout = Layout(tmp_path / "A")
    path = layout.result_metrics("cnn")
    path.parent.mkdir(parents=True)
    good = ReproduceResult(tag="cnn", split="test", test_acc=0.5, test_macro_f1=0.4).to_dict()
    path.write_text(json.dumps({**good, "per_seed": [1]}))
    with pytest.raises(UserError, match=r"per_seed holds an item that is not a JSON object"):
        ReproduceResult.read(path, "metrics file")
    path.write_text(json.dumps({**good, "most_confused": [1]}))
    with pytest.raises(SystemExit) as e:
        cli_main(report.main, ["--artifacts-dir", str(layout.artifacts)])
    assert e.value.code == 0, capsys.readouterr().err
    text = layout.report.read_text(encoding="utf-8")
    assert "### Confusion matrix (cnn)\n\n_damaged: cnn/metrics.json (run `" in text


def test_report_leaves_out_damaged_top_ops_rows_and_names_imbalance_only_when_there(tmp_path):
    """A top_ops.csv of other columns crashed the report (KeyError: 'name'); a cut-short one
    gave a garbage row. The accuracy/macro-F1 note called a balanced test split imbalanced."""
    from tune_pets import report
    from tune_pets.utils import atomic_write_json

    layout = Layout(tmp_path / "A")
    atomic_write_json(layout.profile("cnn") / "summary.json", _profile(50))
    top_ops = layout.profile("cnn") / "top_ops.csv"
    top_ops.write_text("rank,op\n1,conv\n")
    assert "| op |" not in "\n".join(report.profiler_section(layout, "cnn"))
    top_ops.write_text("name,calls,self_cpu_pct\naten::conv2d,10,50.0\naten::na")
    section = "\n".join(report.profiler_section(layout, "cnn"))
    assert "`aten::conv2d` | 10 |" in section and "aten::na`" not in section
    spread = {"classes_predicted": 5, "num_classes": 37, "top3_class_share": 0.08}
    balanced = ReproduceResult(tag="cnn", split="test", test_acc=0.4, test_macro_f1=0.2,
                               prediction_spread={**spread, "max_min_support": [3, 3]})  # fmt: skip
    (note,) = report._divergence_note("cnn", balanced)
    assert "5 of 37 classes." in note and "imbalanced" not in note


def test_each_reproduce_seed_has_its_own_tensorboard_run():
    """Runs/<tag>-seed<N>: seeds of one tag must not write into one TensorBoard run."""
    from tune_pets.layout import Layout

    layout = Layout(Path("A"), Path("R"))
    assert layout.reproduce_tb("cnn", 0) == Path("R/cnn-seed0")
    assert layout.reproduce_tb("cnn", 0) != layout.reproduce_tb("cnn", 1)
