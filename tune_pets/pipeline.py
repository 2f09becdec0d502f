"""The whole study in one command: prepare -> sanity -> search -> reproduce -> report.

    python -m tune_pets.pipeline --smoke          # minutes on a laptop CPU, offline
    python -m tune_pets.pipeline                  # both models, the shipped search spaces

For each model: a search (Ray Tune, Optuna TPE + ASHA) on the train split, then the tuned config
and the homework baseline retrained deterministically on all of train and scored once on the
test split (same seeds for both; each at its own config's epochs and image size unless
``--epochs``/``--img-size`` set both; the report notes when the two differ), then ``REPORT.md``.

``--smoke`` runs the tiny search spaces on the photos shipped with the package (``--data-dir
sample``) with short retrains; it needs no network: unless ``--weights`` is given, the ViT
backbone is random-init and the report marks its rows as meaningless.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from tune_pets import cli, reproduce, search
from tune_pets.config import RunConfig, validate_config
from tune_pets.layout import DEFAULT_DATA_DIR, Layout
from tune_pets.models import get_spec, model_names
from tune_pets.prepare import prepare_default_data_dir
from tune_pets.spaces import default_space
from tune_pets.utils import UserError, cli_main, command_lock

SMOKE = {"epochs": 3, "img_size": 64, "profile_steps": 5}  # the retrains of a smoke run
SEARCH_FLAGS = (
    "num_samples", "max_epochs", "max_concurrent", "cpus_per_trial", "gpus_per_trial", "num_cpus",
    "pick",
)  # fmt: skip


def _forward_flags(p, command, dests: tuple[str, ...], note: str = ""):
    """Options the pipeline passes on to ``command``: that command's own flags, type and help
    (so the two cannot drift apart), defaulting to None (not passed)."""
    title = f"passed to python -m {command.__name__}" + (f", {note}" if note else "")
    g = p.add_argument_group(title)
    actions = {a.dest: a for a in command.build_parser()._actions}
    for dest in dests:
        a = actions[dest]
        g.add_argument(
            *a.option_strings, type=a.type, choices=a.choices, nargs=a.nargs, default=None,
            help=a.help,
        )  # fmt: skip
    return g


def build_parser() -> cli.ArgumentParser:
    p = cli.command_parser(__doc__, "python -m tune_pets.pipeline")
    p.add_argument(
        "--models", nargs="+", choices=model_names(), default=model_names(), help="models to run"
    )
    smoke_help = "tiny search spaces on the shipped sample, short retrains: minutes on CPU"
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument(
        "--search-space-dir",
        help="folder with <model>.yaml files (default: the shipped search_spaces/, or its smoke/)",
    )
    again = p.add_mutually_exclusive_group()
    again.add_argument("--skip-search", action="store_true", help="reuse existing search results")
    again.add_argument(
        "--overwrite", action="store_true", help="replace a model's earlier search (else refused)"
    )
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue each model's stopped search (a model without one starts it)",
    )
    _forward_flags(p, search, SEARCH_FLAGS, "each over the search-space YAML's value")
    g = _forward_flags(
        p, reproduce, ("seeds", "profile_steps"),
        f"for baseline and tuned alike (defaults: seed 0, each config's own epochs and size, "
        f"{reproduce.DEFAULT_PROFILE_STEPS} profile steps; --smoke: {SMOKE['epochs']} epochs, "
        f"{SMOKE['img_size']} px, {SMOKE['profile_steps']} steps)",
    )  # fmt: skip
    epochs_help = "epochs of the retrains (the search's: --max-epochs)"
    g.add_argument("--epochs", type=cli.positive_int, default=None, help=epochs_help)
    size_help = "input size in pixels (models with their own size ignore it)"
    g.add_argument("--img-size", type=cli.positive_int, default=None, help=size_help)
    smoke_data = f" (default: sample with --smoke, else {DEFAULT_DATA_DIR})"
    cli.add_data_args(p, default=None, val_split=False, default_help=smoke_data)
    cli.add_weights_args(p)
    cli.add_output_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layout = cli.layout_from_args(args)
    # A second pipeline here passed the checks while the first had written nothing yet, then
    # rewrote its sanity files and was refused only at its search, with advice (--name) that
    # pipeline does not take.
    hint = "wait for it to finish, or pass another --artifacts-dir"
    with command_lock(layout.pipeline_lock, f"a pipeline in {args.artifacts_dir}", hint):
        return _pipeline(args, layout)


def _pipeline(args: argparse.Namespace, layout: Layout) -> int:
    from tune_pets import report, sanity

    t0 = time.time()
    data_dir = args.data_dir or ("sample" if args.smoke else DEFAULT_DATA_DIR)
    no_pretrained = args.no_pretrained or (args.smoke and not args.weights)
    art = ["--artifacts-dir", args.artifacts_dir]
    common = ["--data-dir", str(data_dir)]
    common += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    common += ["--skip-bad-images"] if args.skip_bad_images else []
    quiet = ["--no-progress"] if args.no_progress else []
    common += quiet
    backbone = ["--no-pretrained"] if no_pretrained else []
    backbone += ["--weights", args.weights] if args.weights else []

    searched = []  # a search step has started: from then on, --resume goes on

    def step(title: str, module, argv: list[str]) -> None:
        print(f"\n=== {title}: python -m {module.__name__} {' '.join(argv)}", flush=True)
        if module is search:
            searched.append(title)
        try:
            rc = module.main(argv)
        except KeyboardInterrupt:
            if not searched:  # before any search: the same command starts over
                raise
            rc = 130
        if rc in (130, 143):  # stopped by Ctrl-C or SIGTERM: a search's state is saved, or done
            flag = "--resume instead of --overwrite" if args.overwrite else "--resume"
            raise KeyboardInterrupt(
                f"step '{title}' stopped; run the same pipeline command with {flag} to go on"
            )
        if rc:
            raise UserError(f"step '{title}' failed with exit code {rc}")

    # Every check before any step runs: a bad retrain flag must not wait for hours of search.
    cli.check_distinct_seeds(args.seeds)
    retrain = {"epochs": args.epochs, "img_size": args.img_size}
    validate_config(RunConfig().replace(**{k: v for k, v in retrain.items() if v}), "command line")
    for model in args.models if args.skip_search else ():
        if not layout.best_config(model).is_file():
            raise UserError(
                f"--skip-search: no search results for {model} in {layout.search(model)}; run "
                "without --skip-search"
            )
    for model in args.models if args.search_space_dir else ():
        if not (Path(args.search_space_dir) / f"{model}.yaml").is_file():
            raise UserError(f"--search-space-dir {args.search_space_dir}: no {model}.yaml there")
    for model in args.models if args.resume else ():  # a search with nothing to continue
        if layout.best_config(model).is_file() and not _ray_state(layout, model):
            raise UserError(
                f"--resume: search {model!r} in {args.artifacts_dir} has results but no Ray "
                "state to continue; pass --skip-search to reuse them or --overwrite to run it anew"
            )
    if not (args.skip_search or args.overwrite or args.resume):
        for model in args.models:
            if layout.best_config(model).is_file() or _ray_state(layout, model):
                raise UserError(
                    f"search {model!r} already has results in {args.artifacts_dir}; pass "
                    f"--overwrite to run it anew, --resume to continue it, --skip-search to "
                    f"reuse it, or another --artifacts-dir"
                )
    prepare_default_data_dir(str(data_dir), progress=not args.no_progress)
    step("sanity", sanity, ["--data-dir", str(data_dir), *art, *quiet])
    smoke = SMOKE if args.smoke else {}
    epochs = args.epochs or smoke.get("epochs")
    img = args.img_size or smoke.get("img_size")
    profile = smoke.get("profile_steps") if args.profile_steps is None else args.profile_steps
    for model in args.models:
        spec = get_spec(model)
        extra = backbone if spec.kind == "features" else []
        if not args.skip_search:
            space = (
                Path(args.search_space_dir) / f"{model}.yaml"
                if args.search_space_dir
                else default_space(model, smoke=args.smoke)
            )
            again = ["--overwrite"] if args.overwrite else []
            again += ["--resume"] if args.resume and _ray_state(layout, model) else []  # or new
            s = [model, "--search-space", str(space), *again, *common, *art, *extra]
            s += ["--runs-dir", args.runs_dir]
            for flag in SEARCH_FLAGS:
                if getattr(args, flag) is not None:
                    s += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
            step(f"search {model}", search, s)
        r = [*common, *art, *extra, "--runs-dir", args.runs_dir]
        r += ["--seeds", *map(str, args.seeds or [0])]  # one seed list for both retrains
        r += ["--epochs", str(epochs)] if epochs else []
        r += ["--img-size", str(img)] if img and not spec.fixed_input_size else []
        r += ["--profile-steps", str(profile)] if profile is not None else []
        r += ["--smoke"] if args.smoke else []
        step(f"reproduce {model} (tuned)", reproduce, [model, *r])
        step(f"reproduce {model} (baseline)", reproduce, [model, "--baseline", *r])
    step("report", report, art)
    print(f"\npipeline done in {time.time() - t0:.0f}s; open {args.artifacts_dir}/REPORT.md")
    return 0


def _ray_state(layout, model: str) -> bool:
    """Whether Ray holds a search of ``model`` that --resume can go on with."""
    return search.ray_state_saved(layout.ray_results / model)


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.pipeline")
