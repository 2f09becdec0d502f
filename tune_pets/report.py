"""Write ``<artifacts>/REPORT.md`` from saved artifacts only (nothing is recomputed).

    python -m tune_pets.report --artifacts-dir artifacts

Data summary, baseline vs tuned on the test split (with what decides whether rows compare:
backbone, smoke or full, epochs, image size, seeds), per model the search, confusion matrices and
profiles, environment. A missing artifact is reported as missing, a misleading comparison is
flagged, and figures are relative links so the report renders on GitHub next to its images.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from tune_pets import cli
from tune_pets.layout import (
    BASELINE_SUFFIX,
    DEFAULT_ARTIFACTS_DIR,
    DEFAULT_DATA_DIR,
    PROFILE_SUMMARY,
    TOP_OPS_CSV,
    Layout,
    result_tag,
)
from tune_pets.models import get_spec, model_names
from tune_pets.records import ReproduceResult, RunInfo, SearchSummary
from tune_pets.utils import UserError, atomic_write_text, cli_main

SEARCH_PLOTS = (
    ("optimization_history", "optimization history"),
    ("param_importances", "parameter importances"),
    ("learning_curves", "learning curves"),
)
F1_GAP = 0.15  # accuracy - macro-F1 above this: say what the model predicts and the imbalance
VERSIONS = ("python", "torch", "torchvision", "timm", "ray", "optuna", "sklearn")


def _json(path: Path) -> dict | None:
    """The JSON object in ``path``; None when it is missing or damaged (not UTF-8, not JSON,
    not an object)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return obj if isinstance(obj, dict) else None


def _fmt(v, digits: int = 4) -> str:
    if v is None or v == "":
        return "n/a"
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return str(v)


def _img(layout: Layout, path: Path, alt: str) -> str:
    rel = path.relative_to(layout.artifacts).as_posix()
    return f"![{alt}]({rel})" if path.is_file() else f"_missing: `{rel}`_"


def _missing(what: str, how: str, path: Path | None = None) -> str:
    """A file the report needs: missing, or there but unreadable (``path``, where known)."""
    state = "damaged" if path is not None and path.exists() else "missing"
    return f"_{state}: {what} (run `{how}`)_"


def _reproduce_cmd(tag: str) -> str:
    model = tag.removesuffix(BASELINE_SUFFIX)
    return f"python -m tune_pets.reproduce {model}" + (" --baseline" if model != tag else "")


# ---------------------------------------------------------------- sections
def data_section(layout: Layout) -> list[str]:
    out = ["## Data", ""]
    s = _json(layout.sanity_summary)
    if s is None:
        how = "python -m tune_pets.sanity"
        return out + [_missing("data sanity summary", how, layout.sanity_summary), ""]
    counts = ", ".join(f"{n} {k}" for k, n in s.get("counts", {}).items())
    out += [
        f"`{s.get('data_dir')}`: {s.get('num_classes')} classes; {counts} images; "
        f"{s.get('n_odd_files', 0)} odd files (see `data_sanity/odd_files.csv`).",
        "",
        "| split | images | min per class | max per class |",
        "|---|---|---|---|",
    ]
    for split, b in s.get("per_class", {}).items():
        out.append(f"| {split} | {s['counts'].get(split)} | {b.get('min')} | {b.get('max')} |")
    sizes = s.get("sizes", {}).get("all", {})
    if sizes:
        shown = (f"{k} {v}" for k, v in sizes.items() if not isinstance(v, (dict, list)))
        out += ["", "Image sizes (all splits): " + ", ".join(shown)]
    out.append("")
    out += [_img(layout, layout.sanity_grid(sp), f"{sp} grid") for sp in s.get("splits", [])]
    return out + [""]


def _row(model: str, label: str, m: ReproduceResult, homework: str) -> str:
    """One row of the results table: everything that decides whether two rows compare."""
    backbone = {None: "-", "random": "**random (numbers meaningless)**"}.get(m.backbone, m.backbone)
    seeds = ", ".join(str(r.get("seed")) for r in m.per_seed) or m.n_seeds
    scores = [
        _fmt(getattr(m, key)) + (f" ± {_fmt(getattr(m, key + '_std'))}" if m.n_seeds > 1 else "")
        for key in ("test_acc", "test_macro_f1")
    ]
    cap = f" (<= {m.max_steps_per_epoch} steps)" if m.max_steps_per_epoch else ""
    return (
        f"| {model} | {label} | {backbone} | {'smoke' if m.smoke else 'full'} | {m.epochs}{cap} | "
        f"{m.img_size} | {seeds} | {scores[0]} | {scores[1]} | {homework} |"
    )


def _schedule(m: ReproduceResult) -> str:
    cap = f" of at most {m.max_steps_per_epoch} steps" if m.max_steps_per_epoch else ""
    return f"{m.epochs} epochs{cap} at {m.img_size} px"


def _homework_pick_note(model: str, configs: list[dict], best: SearchSummary | None) -> list[str]:
    """Say when the tuned row holds the homework's values (the search's first point): identical
    rows read as a bug. With the shipped spaces the rows still differ in the fixed settings
    (cnn.yaml: 30 epochs at 128 px), so comparing whole configs never said it there."""
    if len(configs) != 2 or not all(configs):
        return []
    if configs[0] == configs[1]:
        return [
            f"- {model}: the search picked the homework configuration itself (the first point "
            "it evaluates), so the tuned row retrains the baseline's config."
        ]
    searched = list(best.search.get("search_space") or {}) if best else []
    if not searched or any(configs[0].get(k) != configs[1].get(k) for k in searched):
        return []
    other = sorted(k for k in {*configs[0], *configs[1]} if configs[0].get(k) != configs[1].get(k))
    return [
        f"- {model}: the search picked the homework's value of every searched hyperparameter "
        f"(its first point); the rows differ only in settings it did not search: "
        f"{', '.join(other)}."
    ]


def results_section(layout: Layout) -> list[str]:
    rows: list[str] = []
    notes: list[str] = []
    splits = set()  # the held-out folder scored: test/, or val/ where a copy has no test/
    for model in model_names():
        hw = get_spec(model).homework
        hw_text = f"{hw[0]:.4f} / {hw[1]:.4f}" if hw else "-"
        pair = {}
        for baseline, label in ((True, "baseline (homework config)"), (False, "tuned")):
            tag = result_tag(model, baseline)
            m = ReproduceResult.read_or_none(layout.result_metrics(tag))
            if m is None:
                how = _missing("metrics.json", _reproduce_cmd(tag), layout.result_metrics(tag))
                rows.append(f"| {model} | {label} | | | | | | {how} | | |")
                continue
            pair[baseline], splits = m, splits | {m.split}
            rows.append(_row(model, label, m, hw_text))
            notes += _divergence_note(tag, m)
        base, tuned = pair.get(True), pair.get(False)
        if base and tuned and _schedule(base) != _schedule(tuned):
            notes.append(
                f"- **{model}: baseline and tuned were trained under different settings** "
                f"(baseline {_schedule(base)}, tuned {_schedule(tuned)}): not a fair "
                "comparison; rerun both with the same `--epochs`/`--img-size`/"
                "`--max-steps-per-epoch`."
            )
        infos = {b: RunInfo.read_or_none(layout.result_config(result_tag(model, b))) for b in pair}
        data = {b: getattr(info, "data", {}) for b, info in infos.items()}  # what each trained on
        configs = [getattr(info, "config", None) or {} for info in infos.values()]
        best = SearchSummary.read_or_none(layout.best_config(search_name(layout, model)))
        notes += _homework_pick_note(model, configs, best)
        prints = [d.get("train_fingerprint") for d in data.values()]
        if len(prints) == 2 and None not in prints and prints[0] != prints[1]:
            notes.append(
                f"- **{model}: baseline and tuned were trained on different data** (baseline "
                f"`{data[True].get('data_dir')}`, tuned `{data[False].get('data_dir')}`, or the "
                "same folder changed between them): not a fair comparison; rerun both on the same "
                "`--data-dir`."
            )
        if tuned and best and tuned.trial_id not in (None, best.trial_id):
            where = data.get(False, {}).get("data_dir")  # the command alone read data/oxford_pets
            where = f" --data-dir {where}" if where and where != DEFAULT_DATA_DIR else ""
            notes.append(
                f"- **{model}: the tuned row was retrained from trial `{tuned.trial_id}`, but the "
                f"current search's best is trial `{best.trial_id}`**: run "
                f"`python -m tune_pets.reproduce {model}{where}` again, with the `--epochs`/"
                "`--img-size`/`--seeds` flags of the first run, if it had any."
            )
    out = [
        f"## Baseline vs tuned ({' and '.join(sorted(splits)) or 'test'} split, scored once "
        "per seed)",
        "",
        "| model | config | backbone | size | epochs | img | seeds | test_acc | test_macro_f1 "
        "| homework (on the split it tuned on) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    out += ["", *notes] if notes else []
    return out + [
        "",
        "With several seeds, ± is the sample standard deviation over them (n - 1). "
        "The homework's numbers were measured on the split it tuned on, so they are not "
        "comparable estimates; they are shown for orientation only. A random backbone or a smoke "
        "run exercises the pipeline; its scores say nothing about the method.",
        "",
    ]


def _divergence_note(tag: str, m: ReproduceResult) -> list[str]:
    spread = m.prediction_spread
    if not spread or m.test_acc - m.test_macro_f1 <= F1_GAP:
        return []
    hi, lo = spread.get("max_min_support", [None, None])
    imbalanced = (
        f", and the test split is imbalanced (the 3 largest classes hold "
        f"{100 * spread.get('top3_class_share', 0):.0f} % of its images; {hi} vs {lo} images per "
        "class)"
        if isinstance(hi, int) and isinstance(lo, int) and hi > lo
        else ""
    )
    return [
        f"- {tag}: accuracy ({_fmt(m.test_acc, 3)}) is far above macro-F1 "
        f"({_fmt(m.test_macro_f1, 3)}): the model{_first_seed(m)} ever predicts "
        f"{spread.get('classes_predicted')} of {spread.get('num_classes')} classes{imbalanced}. "
        "Macro-F1 is the honest number here."
    ]


def _first_seed(m: ReproduceResult) -> str:
    """Which run the figures, per-class rows and confusions come from, when there are several."""
    if m.n_seeds < 2 or not m.per_seed:
        return ""
    return f" (seed {m.per_seed[0].get('seed')}, the first of {m.n_seeds})"


def search_name(layout: Layout, model: str) -> str:
    """The search the tuned result was retrained from (``search --name``) when its summary is
    in this artifacts folder, else the model's own."""
    info = RunInfo.read_or_none(layout.result_config(result_tag(model)))
    source = Path(str((info.origin if info else {}).get("source", "")))
    name = source.parent.name
    return name if name and layout.best_config(name).resolve() == source.resolve() else model


def search_section(layout: Layout, model: str) -> list[str]:
    name = search_name(layout, model)
    best = SearchSummary.read_or_none(layout.best_config(name))
    out = [f"### Search ({model}" + (f", --name {name})" if name != model else ")"), ""]
    if best is None:
        how = f"python -m tune_pets.search {model}"
        found = _missing(f"search results in `search/{name}/`", how, layout.best_config(name))
        return out + [found, ""]
    s = best.search
    if best.smoke:  # same paragraph as counts
        out.append(
            "**Smoke-size search** (tiny space and budget): its choice says nothing about the "
            "method."
        )
    out += [
        f"{s.get('num_trials')} trials (of {s.get('num_samples')} planned): "
        f"{s.get('completed')} completed, {s.get('stopped_early')} stopped early by ASHA"
        + (" or the time budget, " if s.get("time_budget_s") else ", ")
        + f"{s.get('failed')} failed; wall time {_fmt(s.get('wall_time_s'), 0)} s "
        f"(+ {_fmt(s.get('data_prep_s'), 0)} s data preparation"
        + (f"; {s['sessions']} sessions: resumed" if s.get("sessions", 1) > 1 else "")
        + "); "
        f"max {s.get('max_epochs')} epochs, grace {s.get('grace_period')}, "
        f"reduction factor {s.get('reduction_factor')}; nodes used: {len(s.get('nodes', []))}.",
        "",
        f"Best trial `{best.trial_id}` at epoch {best.epoch}: val_acc {_fmt(best.val_acc)}, "
        f"val_macro_f1 {_fmt(best.val_macro_f1)} (validation split carved from train; the test "
        f"split was not used).",
        "",
        "| searched parameter | best value | space |",
        "|---|---|---|",
    ]
    for k, (sampler, args) in s.get("search_space", {}).items():
        v = best.config.get(k)
        v = format(v, ".6g") if isinstance(v, float) else v  # 6 decimals made 1.4e-06 0.000001
        out.append(f"| {k} | {v} | {sampler} {args} |")
    out.append("")
    for plot, alt in SEARCH_PLOTS:
        path = layout.search_plot(name, plot)
        if path.is_file() or plot != "param_importances":
            out.append(_img(layout, path, alt))
        else:
            out.append(
                "_parameter importances: not drawn (too few scored trials, or Optuna could not "
                "estimate them; see the search log)_"
            )
    return out + [""]


def confusion_section(layout: Layout, tag: str) -> list[str]:
    out = [
        f"### Confusion matrix ({tag})",
        "",
        _img(layout, layout.confusion(tag, "png"), f"confusion {tag}"),
        "",
        f"Colours are row-normalised (each row sums to 1: the recall of its class); "
        f"`confusion_{tag}.csv` holds the counts.",
    ]
    m = ReproduceResult.read_or_none(layout.result_metrics(tag))
    if m is not None and _first_seed(m):
        out += ["", f"The matrix and the pairs below are of one run{_first_seed(m)}."]
    if m is not None and m.most_confused:
        out += ["", "Most confused pairs (true -> predicted, count):", ""]
        out += [f"- {a} -> {b}: {n}" for a, b, n in m.most_confused[:8]]
    return out + [""]


def profiler_section(layout: Layout, tag: str) -> list[str]:
    path = layout.profile(tag) / PROFILE_SUMMARY
    s, out = _json(path), [f"### Profile ({tag})", ""]
    if s is None:
        return out + [_missing(f"profiler/{tag}/{PROFILE_SUMMARY}", _reproduce_cmd(tag), path), ""]
    steps = s.get("steps")
    short = (
        ": a short sample, easily moved by other load on the machine; use "
        "`--profile-steps 50` or more for numbers to quote."
    )
    out.append(
        f"{s.get('step')}: {_fmt(s.get('images_per_s'), 1)} images/s, "
        f"{_fmt(s.get('step_time_ms'), 1)} ms/step (batch {s.get('batch_size')}, "
        f"img {s.get('img_size')}, {s.get('device')}, {s.get('precision', 'fp32')}). "
        f"Timed over {steps} steps after {steps} profiled ones"
        + (short if (steps or 0) < 50 else ".")
    )
    if s.get("backbone_images_per_s") is not None:
        out.append(
            f"Frozen backbone forward (one-time feature extraction): "
            f"{_fmt(s.get('backbone_images_per_s'), 1)} images/s."
        )
    try:
        with (layout.profile(tag) / TOP_OPS_CSV).open(newline="", encoding="utf-8") as f:
            # a damaged row (other columns, cut short) is left out, as is a damaged file
            ops = [r for r in csv.DictReader(f) if r.get("name") and r.get("calls")][:8]
    except (OSError, ValueError, csv.Error):
        ops = []
    if ops:
        out += ["", "| op | calls | self CPU % |", "|---|---|---|"]
        out += [f"| `{r['name']}` | {r['calls']} | {_fmt(r.get('self_cpu_pct'), 1)} |" for r in ops]
    return out + [""]


def env_section(layout: Layout) -> list[str]:
    tags = [result_tag(model, baseline) for model in model_names() for baseline in (False, True)]
    infos = (RunInfo.read_or_none(layout.result_config(tag)) for tag in tags)
    info = next((i for i in infos if i and i.env), None)
    out = ["## Environment", ""]
    if info is None:
        return out + [_missing("a reproduce config.json", _reproduce_cmd("cnn")), ""]
    e = info.env
    return out + [
        f"- device: {info.device} ({info.precision}); CPU {e.get('cpu')} "
        f"({e.get('cpu_count')} cores); GPU {e.get('gpu') or 'none'}",
        "- versions: " + ", ".join(f"{k} {e.get(k)}" for k in VERSIONS),
        f"- git commit: {e.get('git_commit')}",
        "",
    ]


def _or_damaged(section: Callable[..., list[str]], *args, damaged: tuple[str, str, str]):
    """``section(*args)``, or its title and one "damaged" line (``damaged``: title, file, the
    command that rewrites it) where a file of the right JSON type holds a field of the wrong
    one: a hand-edited ``"counts": "abc"`` crashed the whole report."""
    try:
        return section(*args)
    except (AttributeError, KeyError, TypeError, ValueError):
        title, what, how = damaged
        return [title, "", f"_damaged: {what} (run `{how}`)_", ""]


def build_report(layout: Layout) -> str:
    lines = ["# tune_pets report", ""]
    lines += ["Generated by `python -m tune_pets.report` from the artifacts in this folder.", ""]
    sanity = ("## Data", "data sanity summary", "python -m tune_pets.sanity")
    lines += _or_damaged(data_section, layout, damaged=sanity) + results_section(layout)
    for model in model_names():
        how, name = f"python -m tune_pets.search {model}", search_name(layout, model)
        search = (f"### Search ({model})", f"search/{name}/{layout.best_config(name).name}", how)
        lines += [f"## {model}", "", *_or_damaged(search_section, layout, model, damaged=search)]
        for tag in (result_tag(model), result_tag(model, True)):
            if layout.result(tag).is_dir():
                how, what = _reproduce_cmd(tag), f"profiler/{tag}/{PROFILE_SUMMARY}"
                profile = (f"### Profile ({tag})", what, how)
                metrics = (f"### Confusion matrix ({tag})", f"{tag}/metrics.json", how)
                lines += _or_damaged(confusion_section, layout, tag, damaged=metrics)
                lines += _or_damaged(profiler_section, layout, tag, damaged=profile)
    return "\n".join(lines + env_section(layout))


# ---------------------------------------------------------------- CLI
def build_parser() -> cli.ArgumentParser:
    p = cli.command_parser(__doc__, "python -m tune_pets.report")
    p.add_argument(
        "--artifacts-dir", default=DEFAULT_ARTIFACTS_DIR, help="where results are written"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = Layout(Path(args.artifacts_dir))
    if not layout.artifacts.is_dir():
        what = (
            "is a file; point it at the artifacts folder"
            if layout.artifacts.exists()
            else "does not exist; run the pipeline first"
        )
        raise UserError(f"--artifacts-dir {layout.artifacts} {what}")
    atomic_write_text(layout.report, build_report(layout))
    print(f"wrote {layout.report}")
    return 0


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.report")
