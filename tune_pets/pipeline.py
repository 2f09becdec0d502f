"""The whole study in one command: prepare -> sanity -> search -> reproduce -> report.

    python -m tune_pets.pipeline                                  # both models, full spaces
    python -m tune_pets.pipeline --smoke --data-dir DIR --no-pretrained   # minutes, any data

For each model: a search (Ray Tune, Optuna TPE + ASHA) on the train split, then the tuned config
and the homework baseline retrained deterministically on all of train and scored once on the
test split (same seeds, same epochs when --epochs is given), then ``REPORT.md``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from tune_pets.utils import ArgumentParser, UserError, cli_main, nonneg_int, positive_int

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
DEFAULT_DATA_DIR = "data/oxford_pets"


def main(argv: Sequence[str] | None = None) -> int:
    from tune_pets import report, reproduce, sanity, search

    p = ArgumentParser(prog="python -m tune_pets.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"ImageFolder root; the default {DEFAULT_DATA_DIR} is prepared if missing",
    )
    p.add_argument("--models", nargs="+", choices=["cnn", "vit"], default=["cnn", "vit"])
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny search spaces (search_spaces/smoke/), short retrains: minutes on CPU",
    )
    p.add_argument("--search-space-dir", default=None, help="folder with <model>.yaml files")
    p.add_argument("--num-samples", type=positive_int)
    p.add_argument("--max-epochs", type=positive_int, help="search: epochs per trial")
    p.add_argument(
        "--epochs", type=positive_int, help="reproduce: epochs for both baseline and tuned retrains"
    )
    p.add_argument(
        "--img-size",
        type=positive_int,
        help="CNN: input size for both retrains (the homework used 224)",
    )
    p.add_argument("--seeds", type=nonneg_int, nargs="+", default=[0])
    p.add_argument("--profile-steps", type=nonneg_int, default=None)
    p.add_argument("--artifacts-dir", default="artifacts")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-pretrained", action="store_true", help="ViT: random backbone (offline)")
    p.add_argument("--weights", default=None, help="ViT: local backbone weights file")
    p.add_argument("--num-cpus", type=positive_int, help="CPUs for the local Ray")
    p.add_argument("--skip-search", action="store_true", help="reuse existing search results")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    t0 = time.time()
    data_dir = Path(args.data_dir)
    art = ["--artifacts-dir", args.artifacts_dir]
    common = (["--cache-dir", args.cache_dir] if args.cache_dir else []) + (
        ["--no-progress"] if args.no_progress else []
    )
    vit_flags = (["--no-pretrained"] if args.no_pretrained else []) + (
        ["--weights", args.weights] if args.weights else []
    )

    def step(title: str, module, argv: list[str]) -> None:
        print(f"\n=== {title}: python -m {module.__name__} {' '.join(argv)}", flush=True)
        rc = module.main(argv)
        if rc:
            raise UserError(f"step '{title}' failed with exit code {rc}")

    if not data_dir.exists() and args.data_dir == DEFAULT_DATA_DIR:
        from tune_pets.prepare import prepare

        prepare(data_dir, progress=not args.no_progress)
    step(
        "sanity",
        sanity,
        ["--data-dir", str(data_dir), "--out", str(Path(args.artifacts_dir) / "data_sanity")]
        + (["--no-progress"] if args.no_progress else []),
    )
    space_dir = (
        Path(args.search_space_dir)
        if args.search_space_dir
        else (SPACES / "smoke" if args.smoke else SPACES)
    )
    epochs = args.epochs or (3 if args.smoke else None)
    img = args.img_size or (64 if args.smoke else None)
    profile = args.profile_steps if args.profile_steps is not None else (5 if args.smoke else 50)
    for model in args.models:
        extra = vit_flags if model == "vit" else []
        if not args.skip_search:
            s = [
                "--data-dir",
                str(data_dir),
                "--search-space",
                str(space_dir / f"{model}.yaml"),
                "--overwrite",
                *art,
                *common,
                *extra,
            ]
            s += ["--num-samples", str(args.num_samples)] if args.num_samples else []
            s += ["--max-epochs", str(args.max_epochs)] if args.max_epochs else []
            s += ["--num-cpus", str(args.num_cpus)] if args.num_cpus else []
            step(f"search {model}", search, [model, *s])
        r = [
            "--data-dir",
            str(data_dir),
            "--seeds",
            *map(str, args.seeds),
            "--runs-dir",
            args.runs_dir,
            "--profile-steps",
            str(profile),
            *art,
            *common,
            *extra,
        ]
        r += ["--epochs", str(epochs)] if epochs else []
        r += ["--img-size", str(img)] if img and model == "cnn" else []
        step(f"reproduce {model} (tuned)", reproduce, [model, *r])
        step(f"reproduce {model} (baseline)", reproduce, [model, "--baseline", *r])
    step("report", report, art)
    print(f"\npipeline done in {time.time() - t0:.0f}s; open {args.artifacts_dir}/REPORT.md")
    return 0


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.pipeline")
