"""Hyperparameter search: Ray Tune trials of ``train.fit``, Optuna TPE + ASHA early stopping.

    python -m tune_pets.search cnn --data-dir data/oxford_pets
    python -m tune_pets.search vit --no-pretrained --num-samples 8 --max-epochs 5
    python -m tune_pets.search cnn --gpus-per-trial 0.25                               # 4 per GPU
    python -m tune_pets.search cnn --address auto --storage-path /shared/ray_results   # cluster
    python -m tune_pets.search cnn --resume                                            # continue

The command: ``search_plan`` settles what runs (spec, resources, first point, sampler),
``search_ray`` runs it on Ray Tune, ``search_results`` writes trials.csv, best_config.json,
optuna.db and the plots.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from tune_pets import cli
from tune_pets.layout import DEFAULT_ARTIFACTS_DIR, DEFAULT_DATA_DIR, DEFAULT_RUNS_DIR, Layout
from tune_pets.models import get_spec
from tune_pets.prepare import prepare_default_data_dir
from tune_pets.records import SearchSummary
from tune_pets.search_plan import (
    DEFAULT_GPU_FRACTION,
    base_config,
    check_resumed_run,
    resumed_base,
    resumed_spec,
    spec_from_args,
)
from tune_pets.search_ray import disconnect, is_disk_full, run_search, use_cluster_auth
from tune_pets.search_results import FINAL_MEAN_EPOCHS
from tune_pets.spaces import PICK_RULES, SearchSpec
from tune_pets.utils import UserError, cli_main, command_lock, read_json, stopped_by

PROG = "python -m tune_pets.search"


def build_parser() -> cli.ArgumentParser:
    p = cli.command_parser(__doc__, PROG)
    cli.add_model_arg(p, "which model to search")
    cli.add_data_args(p, split_default="the YAML's split_seed, else --seed")
    cli.add_weights_args(p)
    g = p.add_argument_group("search (each flag overrides the search-space YAML)")
    g.add_argument(
        "--search-space",
        help="search-space YAML, or smoke: the shipped tiny one (default: the shipped "
        "search_spaces/<model>.yaml)",
    )
    for key, text in (
        ("num_samples", "number of trials"),
        ("max_epochs", "epochs per trial, ASHA's max_t"),
        ("grace_period", "ASHA: epochs before a trial can be stopped, < --max-epochs to stop any"),
    ):
        default = f"default: the YAML's {key}, else {getattr(SearchSpec, key)}"
        g.add_argument(
            "--" + key.replace("_", "-"), type=cli.positive_int, help=f"{text} ({default})"
        )
    g.add_argument(
        "--pick",
        choices=PICK_RULES,
        help="how the trial handed to reproduce is chosen: best_epoch (its best epoch is the "
        f"best of all) or final_mean (the best mean of the last {FINAL_MEAN_EPOCHS} epochs among "
        "the trials that ran longest: less swayed by one lucky epoch); default: the YAML's "
        "pick, else best_epoch",
    )
    g.add_argument(
        "--time-budget-s",
        type=cli.positive_float,
        help="wall-clock budget, seconds (default: the YAML's time_budget_s, else none)",
    )
    g.add_argument(
        "--seed",
        type=cli.seed_int,
        help="seed of the TPE sampler and of every trial: weights, batch order, augmentation "
        f"(default: the YAML's seed, else {SearchSpec.seed})",
    )
    g.add_argument(
        "--max-steps-per-epoch",
        type=cli.nonneg_int,
        help="cap steps per epoch, for smoke runs (0: no cap; default: the YAML's fixed value, "
        "else 0)",
    )
    g.add_argument("--name", type=cli.plain_name, help="experiment name (default: the model)")
    again = g.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the experiment --name (finished trials are not rerun)",
    )
    again.add_argument(
        "--overwrite", action="store_true", help="replace an existing experiment of this name"
    )
    r = p.add_argument_group("Ray cluster and resources")
    r.add_argument(
        "--address",
        help="join a running Ray cluster: HOST:PORT, or auto (RAY_ADDRESS, else the cluster "
        "that ray start last started on this machine) (default: start a Ray of its own, "
        "whatever RAY_ADDRESS says)",
    )
    r.add_argument(
        "--storage-path",
        help="absolute folder for Ray's experiment state and trial checkpoints, writable by "
        "every node (default: <artifacts-dir>/ray_results)",
    )
    r.add_argument(
        "--num-cpus",
        type=cli.positive_int,
        help="CPUs of the local Ray (default: all that this process may run on)",
    )
    r.add_argument("--cpus-per-trial", type=cli.positive_float, help="CPUs per trial (default: 1)")
    r.add_argument(
        "--gpus-per-trial",
        type=cli.nonneg_float,
        help="GPUs per trial, may be fractional (0.25: four trials share a GPU); alone it also "
        "sets how many run at once (GPUs / share). Default with GPUs: "
        + ", ".join(f"{v:g} for {k} models" for k, v in DEFAULT_GPU_FRACTION.items()),
    )
    r.add_argument(
        "--max-concurrent",
        type=cli.positive_int,
        help="trials at once (default: fill the GPUs, else max_concurrent from the YAML)",
    )
    cli.add_output_args(p)
    return p


def ray_state_saved(experiment: Path) -> bool:
    """Whether Ray saved the state of the experiment folder ``experiment`` (--resume needs it)."""
    return any(Path(experiment).glob("experiment_state-*.json"))


def resume_command(argv: Sequence[str], name: str, named: bool) -> str:
    """The command that continues this search: the same arguments, with --resume."""
    # argparse takes a flag's unambiguous prefix too (--over for --overwrite)
    flags = ("--overwrite", "--resume")
    again = [a for a in argv if len(a) < 3 or not any(f.startswith(a) for f in flags)]
    if not named:
        again += ["--name", name]
    return shlex.join(["python", "-m", "tune_pets.search", *again, "--resume"])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    model = get_spec(args.model)
    spec = spec_from_args(args, model)
    layout = cli.layout_from_args(args)
    name, named = args.name or model.name, args.name is not None
    storage = layout.ray_results.resolve() if args.storage_path is None else Path(args.storage_path)
    if args.address and args.num_cpus:
        raise UserError("--num-cpus sizes a local Ray; with --address the cluster's CPUs are used")
    if not storage.is_absolute():
        raise UserError(f"--storage-path {storage}: must be an absolute path (all nodes use it)")
    if storage.exists() and not storage.is_dir():
        raise UserError(f"--storage-path {storage} is a file; point it at a folder")
    saved_spec = layout.search_spec(name)
    if args.resume and not saved_spec.is_file() and ray_state_saved(storage / name):
        raise UserError(  # its flags could not be checked against the ones it was started with
            f"--resume: {saved_spec} not found, but {storage / name} holds search {name!r}: it "
            "was started with another --artifacts-dir; resume with that one"
        )
    spec, val_fraction = resumed_spec(args, spec, saved_spec)  # checks the file's shape
    saved = read_json(saved_spec, "search spec") if args.resume and saved_spec.is_file() else {}
    base = cli.config_from_args(args, resumed_base(saved, base_config(spec, model), saved_spec))
    if args.data_dir == DEFAULT_DATA_DIR:
        # The data it was started on, unless --data-dir says otherwise (then checked): a search
        # of --data-dir sample, resumed without the flag, tried to download the dataset.
        args.data_dir = saved.get("data_dir", args.data_dir)
    prepare_default_data_dir(args.data_dir, progress=not args.no_progress)
    data_dir = cli.data_dir_from_args(args)
    if args.resume:  # the resources line then shows the limit Ray restores
        given = args.max_concurrent
        args.max_concurrent = check_resumed_run(args, base, data_dir, saved_spec)
        args.max_concurrent_why = "--max-concurrent" if given else "as the search was started"
    use_cluster_auth(args.address)
    try:
        # a second search of name refuses
        hint = "wait for it to finish, or pass --name NEW to run another search beside it"
        with command_lock(layout.search_lock(name), f"search {name!r}", hint):
            result = run_search(
                args, spec, base, data_dir, layout, name, model, storage, val_fraction
            )
    except OSError as e:
        if not is_disk_full(e):
            raise
        resume = resume_command(argv, name, named)
        raise UserError(disk_full_message(e, storage / name, layout.search(name), resume)) from None
    except KeyboardInterrupt as e:
        # A second Ctrl-C, or one while the results are written: "run the same command again"
        # was wrong, as the same command is refused once Ray holds the experiment.
        if str(e) or not ray_state_saved(storage / name):
            raise
        again = resume_command(argv, name, named)
        raise KeyboardInterrupt(f"search stopped; resume it with: {again}") from None
    finally:
        disconnect()
    if result is None:
        how, code = stopped_by()
        print(
            f"\n{PROG}: {how}: search stopped; the experiment state is saved. Resume "
            f"with: {resume_command(argv, name, named)}",
            file=sys.stderr,
        )
        return code
    # The same data and folders for the next command, where they are not its defaults.
    same = {
        "--data-dir": (args.data_dir, DEFAULT_DATA_DIR),
        "--artifacts-dir": (args.artifacts_dir, DEFAULT_ARTIFACTS_DIR),
        "--runs-dir": (args.runs_dir, DEFAULT_RUNS_DIR),
        "--cache-dir": (args.cache_dir, None),
    }
    extra = "".join(f" {k} {shlex.quote(v)}" for k, (v, d) in same.items() if v != d)
    _print_summary(result[1], layout, name, extra)
    return 0


def disk_full_message(error: OSError, experiment: Path, out_dir: Path, resume: str) -> str:
    """One line for a search stopped by a full disk: what could not be written, that the files
    written before are whole (every write is atomic), and the command that goes on."""
    if error.filename:
        what = f"writing {error.filename}"
    elif error.errno and error.strerror == os.strerror(error.errno):
        what = f"writing the results in {out_dir}"
    else:
        what = str(error.strerror)
    then = f"resume with: {resume}" if ray_state_saved(experiment) else "run the same command again"
    return (
        f"no space left on device ({what}); the search stopped and the files it wrote before "
        f"are intact; free space, then {then}"
    )


def _print_summary(s: SearchSummary, layout: Layout, name: str, extra: str) -> None:
    """The search's outcome as best_config.json has it, and the command that goes on."""
    run = s.search
    print(
        f"\nsearch {name!r}: {run['num_trials']} trials ({run['completed']} completed, "
        f"{run['stopped_early']} stopped early, {run['failed']} failed) in "
        f"{run['wall_time_s']:.0f}s"
        + (f" over {run['sessions']} sessions" if run["sessions"] > 1 else "")
    )
    f1 = "n/a" if s.val_macro_f1 is None else f"{s.val_macro_f1:.4f}"
    print(
        f"best trial {s.trial_id} (epoch {s.epoch}): {s.metric} {s.best_value:.4f}, "
        f"val_macro_f1 {f1}"
    )
    print("  params: " + ", ".join(f"{k}={s.config[k]!r}" for k in run["search_space"]))
    best = layout.best_config(name)
    print(
        f"wrote {layout.search(name)}/ (best_config.json, trials.csv, optuna.db, plots) and "
        f"TensorBoard logs in {layout.search_tb(name)}/; next: python -m tune_pets.reproduce "
        f"{s.model}"
        + (f" --best-config {shlex.quote(str(best))}" if name != s.model else "")
        + extra
    )


if __name__ == "__main__":
    cli_main(main, prog=PROG)
