"""Write ``<artifacts>/REPORT.md`` from saved artifacts only (nothing is recomputed).

    python -m tune_pets.report --artifacts-dir artifacts

Sections: data summary, per model the search summary and plots, baseline vs tuned on the test
split (mean +- std over seeds when several), confusion matrices and most-confused pairs,
profiler summary, environment. A missing artifact is reported as missing, never invented.
Figures are relative links, so the report renders on GitHub next to its images.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from tune_pets.utils import ArgumentParser, UserError, atomic_write_text, cli_main

MODELS = ("cnn", "vit")
HOMEWORK = {"cnn": (0.2306, 0.2185), "vit": (0.7912, 0.7888)}  # the homework's (leaky) val numbers


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _csv(path: Path) -> list[dict] | None:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except OSError:
        return None


def _fmt(v, digits: int = 4) -> str:
    if v is None or v == "":
        return "n/a"
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return str(v)


def _img(root: Path, rel: str, alt: str) -> str:
    return f"![{alt}]({rel})" if (root / rel).is_file() else f"_missing: `{rel}`_"


def _missing(what: str, how: str) -> str:
    return f"_missing: {what} (run `{how}`)_"


def data_section(root: Path) -> list[str]:
    out = ["## Data", ""]
    s = _json(root / "data_sanity" / "summary.json")
    if s is None:
        return out + [
            _missing("data sanity summary", "python -m tune_pets.sanity --data-dir DIR"),
            "",
        ]
    counts = ", ".join(f"{n} {k}" for k, n in s.get("counts", {}).items())
    out += [
        f"`{s.get('data_dir')}`: {s.get('num_classes')} classes; {counts} images; "
        f"{s.get('n_odd_files', 0)} odd files (see `data_sanity/odd_files.csv`).",
        "",
    ]
    out += ["| split | images | min per class | max per class |", "|---|---|---|---|"]
    for split, b in s.get("per_class", {}).items():
        out.append(f"| {split} | {s['counts'].get(split)} | {b.get('min')} | {b.get('max')} |")
    sizes = s.get("sizes", {}).get("all", {})
    if sizes:
        out += [
            "",
            "Image sizes (all splits): "
            + ", ".join(f"{k} {v}" for k, v in sizes.items() if not isinstance(v, (dict, list))),
        ]
    out.append("")
    for split in s.get("splits", []):
        out.append(_img(root, f"data_sanity/grid_{split}.png", f"{split} grid"))
    return out + [""]


def search_section(root: Path, model: str) -> list[str]:
    d = root / "search" / model
    best = _json(d / "best_config.json")
    out = [f"### Search ({model})", ""]
    if best is None:
        return out + [
            _missing(f"search results in `search/{model}/`", f"python -m tune_pets.search {model}"),
            "",
        ]
    s = best.get("search", {})
    out += [
        f"{s.get('num_trials')} trials (of {s.get('num_samples')} planned): "
        f"{s.get('completed')} completed, {s.get('stopped_early')} stopped early by ASHA, "
        f"{s.get('failed')} failed; wall time {_fmt(s.get('wall_time_s'), 0)} s "
        f"(+ {_fmt(s.get('data_prep_s'), 0)} s data preparation); "
        f"max {s.get('max_epochs')} epochs, grace {s.get('grace_period')}, "
        f"reduction factor {s.get('reduction_factor')}; nodes used: {len(s.get('nodes', []))}.",
        "",
        f"Best trial `{best.get('trial_id')}` at epoch {best.get('epoch')}: val_acc "
        f"{_fmt(best.get('val_acc'))}, val_macro_f1 {_fmt(best.get('val_macro_f1'))} "
        f"(validation split carved from train; the test split was not used).",
        "",
        "| searched parameter | best value | space |",
        "|---|---|---|",
    ]
    cfg = best.get("config", {})
    for k, (sampler, args) in s.get("search_space", {}).items():
        out.append(
            f"| {k} | {_fmt(cfg.get(k), 6) if isinstance(cfg.get(k), float) else cfg.get(k)} "
            f"| {sampler} {args} |"
        )
    out.append("")
    for f, alt in (
        ("optimization_history.png", "optimization history"),
        ("param_importances.png", "parameter importances"),
        ("learning_curves.png", "learning curves"),
    ):
        out.append(_img(root, f"search/{model}/{f}", alt))
    return out + [""]


def results_section(root: Path) -> list[str]:
    out = [
        "## Baseline vs tuned (test split, scored once per seed)",
        "",
        "| model | config | seeds | test_acc | test_macro_f1 | homework (val, tuned on test) |",
        "|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        for tag, label in ((f"{model}_baseline", "baseline (homework config)"), (model, "tuned")):
            m = _json(root / tag / "metrics.json")
            if m is None:
                how = _reproduce_cmd(tag)
                out.append(f"| {model} | {label} | - | {_missing('metrics.json', how)} | | |")
                continue
            n = m.get("n_seeds", 1)

            def pm(key: str, m: dict = m, n: int = n) -> str:
                return f" +- {_fmt(m.get(key + '_std'))}" if n > 1 else ""

            hw = HOMEWORK[model]
            out.append(
                f"| {model} | {label} | {n} | {_fmt(m.get('test_acc'))}{pm('test_acc')} | "
                f"{_fmt(m.get('test_macro_f1'))}{pm('test_macro_f1')} | "
                f"{hw[0]:.4f} / {hw[1]:.4f} |"
            )
    return out + [
        "",
        "The homework's numbers were measured on the split it tuned on, so they "
        "are not comparable estimates; they are shown for orientation only.",
        "",
    ]


def confusion_section(root: Path, tag: str) -> list[str]:
    out = [
        f"### Confusion matrix ({tag})",
        "",
        _img(root, f"confusion_{tag}.png", f"confusion {tag}"),
    ]
    m = _json(root / tag / "metrics.json")
    pairs = (m or {}).get("most_confused")
    if pairs:
        out += ["", "Most confused pairs (true -> predicted, count):", ""]
        out += [f"- {a} -> {b}: {n}" for a, b, n in pairs[:8]]
    return out + [""]


def _reproduce_cmd(tag: str) -> str:
    """The command that (re)writes the artifacts of ``tag`` (``cnn``, ``vit_baseline``, ...)."""
    model = tag.removesuffix("_baseline")
    return f"python -m tune_pets.reproduce {model}" + (" --baseline" if model != tag else "")


def profiler_section(root: Path, tag: str) -> list[str]:
    s = _json(root / "profiler" / tag / "summary.json")
    out = [f"### Profile ({tag})", ""]
    if s is None:
        return out + [
            _missing(f"profiler/{tag}/summary.json", _reproduce_cmd(tag)),
            "",
        ]
    out.append(
        f"{s.get('step')}: {_fmt(s.get('images_per_s'), 1)} images/s, "
        f"{_fmt(s.get('step_time_ms'), 1)} ms/step (batch {s.get('batch_size')}, "
        f"img {s.get('img_size')}, {s.get('device')}, {s.get('steps')} profiled steps)."
    )
    if s.get("backbone_images_per_s") is not None:
        out.append(
            f"Frozen backbone forward (one-time feature extraction): "
            f"{_fmt(s.get('backbone_images_per_s'), 1)} images/s."
        )
    ops = _csv(root / "profiler" / tag / "top_ops.csv") or []
    if ops:
        out += ["", "| op | calls | self CPU % |", "|---|---|---|"]
        out += [
            f"| `{r['name']}` | {r['calls']} | {_fmt(r.get('self_cpu_pct'), 1)} |" for r in ops[:8]
        ]
    return out + [""]


def env_section(root: Path) -> list[str]:
    for tag in ("cnn", "vit", "cnn_baseline", "vit_baseline"):
        c = _json(root / tag / "config.json")
        if c and c.get("env"):
            e = c["env"]
            return [
                "## Environment",
                "",
                f"- device: {c.get('device')}; CPU {e.get('cpu')} "
                f"({e.get('cpu_count')} cores); GPU {e.get('gpu') or 'none'}",
                "- versions: "
                + ", ".join(
                    f"{k} {e.get(k)}"
                    for k in ("python", "torch", "torchvision", "timm", "ray", "optuna", "sklearn")
                ),
                f"- git commit: {e.get('git_commit')}",
                "",
            ]
    return [
        "## Environment",
        "",
        _missing("a reproduce config.json", "python -m tune_pets.reproduce cnn"),
        "",
    ]


def build_report(root: Path) -> str:
    lines = [
        "# tune_pets report",
        "",
        "Generated by `python -m tune_pets.report` from the artifacts in this folder.",
        "",
    ]
    lines += data_section(root)
    lines += results_section(root)
    for model in MODELS:
        lines += [f"## {model}", ""]
        lines += search_section(root, model)
        for tag in (model, f"{model}_baseline"):
            if (root / tag).is_dir():
                lines += confusion_section(root, tag)
                lines += profiler_section(root, tag)
    lines += env_section(root)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m tune_pets.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts-dir", default="artifacts")
    args = p.parse_args(argv)
    root = Path(args.artifacts_dir)
    if not root.is_dir():
        raise UserError(f"--artifacts-dir {root} does not exist; run the pipeline first")
    atomic_write_text(root / "REPORT.md", build_report(root))
    print(f"wrote {root / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.report")
