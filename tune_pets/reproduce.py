"""Reproduce the best config: deterministic retrain on all of train, one test evaluation, profile.

    python -m tune_pets.reproduce cnn             # reads artifacts/search/cnn/best_config.json
    python -m tune_pets.reproduce cnn --baseline  # the homework's config, same protocol
    python -m tune_pets.reproduce vit --seeds 0 1 2  # mean +- std over seeds

No Ray. The search's val split is folded back into train; the held-out test split is scored
once per seed, never used to choose. Outputs (``<tag>``: the model or ``<model>_baseline``;
``<heldout>``: test or val): ``<artifacts>/<tag>/{checkpoint_best.pt,config.json,metrics.json,
per_class_<heldout>.csv}`` (the checkpoint and per-class scores of the first seed; each further
seed's checkpoint is ``checkpoint_seed<N>.pt``), ``<artifacts>/confusion_<tag>.*``,
``<artifacts>/profiler/<tag>/``, a row in ``<artifacts>/metrics.csv``, TensorBoard logs under
``<runs-dir>/<tag>-seed<N>``.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from tune_pets import cli
from tune_pets.config import RunConfig
from tune_pets.data import heldout_split_name, load_split
from tune_pets.engine import load_fit_data
from tune_pets.evaluate import evaluate_checkpoint
from tune_pets.layout import Layout, result_tag
from tune_pets.models import ModelSpec, get_spec
from tune_pets.records import ReproduceResult, RunInfo, SearchSummary, drop_metrics_rows
from tune_pets.records import write_metrics_row
from tune_pets.sample import SAMPLE_NAME
from tune_pets.train import clear_tb_events, fit, format_epoch
from tune_pets.utils import UserError, atomic_torch_save, cli_main
from tune_pets.utils import enable_cuda_determinism, env_info

DEFAULT_PROFILE_STEPS = 10  # light by default (seconds, a few MB of trace); more with the flag


def resolve_config(
    spec: ModelSpec, best_config: str | Path | None, layout: Layout, baseline: bool
) -> tuple[RunConfig, dict]:
    """The config to retrain and where it came from."""
    if baseline:
        return spec.defaults, {"source": "homework defaults (--baseline)"}
    path = Path(best_config) if best_config else layout.best_config(spec.name)
    if path.is_dir():
        raise UserError(f"--best-config {path} is a folder; pass the best_config.json in it")
    if not path.is_file():
        raise UserError(
            f"no search result at {path}: run `python -m tune_pets.search {spec.name}` "
            f"first, pass --best-config PATH, or use --baseline"
        )
    best = SearchSummary.read(path, "--best-config")
    config = RunConfig.from_dict(best.config, str(path))
    if config.model != spec.name:
        raise UserError(f"--best-config {path} is for model {config.model!r}, not {spec.name!r}")
    # The searched values are the point of a tuned config: one missing would be trained at its
    # default and still be called tuned.
    if missing := [k for k in best.search.get("search_space", {}) if k not in best.config]:
        raise UserError(f"--best-config {path}: config lacks the searched {', '.join(missing)}")
    return config, {
        "source": str(path.resolve()),  # the report finds the search by it
        "trial_id": best.trial_id,
        "val_acc": best.val_acc,
        "val_macro_f1": best.val_macro_f1,
        "smoke": best.smoke,
    }


def reproduce(
    config: RunConfig,
    data_dir: Path,
    layout: Layout,
    tag: str,
    seeds: Sequence[int],
    origin: dict,
    *,
    profile_steps: int = DEFAULT_PROFILE_STEPS,
    smoke: bool = False,
    device: torch.device,
    **io,  # the decode-cache options of engine.load_fit_data: cli.data_options
) -> ReproduceResult:
    spec = get_spec(config.model)
    heldout = heldout_split_name(data_dir)
    first = config.replace(seed=seeds[0], deterministic=True)
    data = load_fit_data(first, data_dir, full_train=True, device=device, **io)
    # Read (and cache) the test split now: a bad test image fails before training.
    res, interpolation = spec.cache_res(first), data.preprocess["interpolation"]
    load_split(data_dir, heldout, res, interpolation=interpolation, classes=data.classes, **io)
    print(
        f"{tag}: retraining on all {data.info['n_train']} train images, {config.epochs} epochs, "
        f"seeds {' '.join(map(str, seeds))}, device {device}, deterministic",
        flush=True,
    )
    per_seed, evals, checkpoints = [], [], []
    for seed in seeds:
        cfg = config.replace(seed=seed, deterministic=True)

        def log(metrics: dict, _ckpt, seed: int = seed) -> None:
            print(f"{tag} seed {seed} " + format_epoch(metrics, config.epochs), flush=True)

        tb_dir = layout.reproduce_tb(tag, seed)
        clear_tb_events(tb_dir)
        result = fit(cfg, data, log, device=device, tb_dir=tb_dir)
        checkpoints.append(result.checkpoint)
        ev = evaluate_checkpoint(result.checkpoint, data_dir, heldout, device=device, **io)
        evals.append(ev)
        acc, f1 = ev.scores["accuracy"], ev.scores["macro_f1"]
        per_seed.append(
            {
                "seed": seed,
                "test_acc": acc,
                "test_macro_f1": f1,
                "train_loss": result.history[-1]["train_loss"],
                "train_time_s": round(sum(h["epoch_time_s"] for h in result.history), 2),
            }
        )
        print(f"{tag} seed {seed}: test_acc {acc:.4f}, test_macro_f1 {f1:.4f}", flush=True)

    stats = {}  # metrics.csv's names
    for key, name in (("accuracy", "test_acc"), ("macro_f1", "test_macro_f1")):
        values = [r[name] for r in per_seed]
        stats[key] = statistics.fmean(values)
        stats[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    kind = "file" if config.weights else ("pretrained" if config.pretrained else "random")
    out = ReproduceResult(
        tag=tag,
        split=heldout,
        test_acc=stats["accuracy"],
        test_macro_f1=stats["macro_f1"],
        test_acc_std=stats["accuracy_std"],
        test_macro_f1_std=stats["macro_f1_std"],
        n_seeds=len(seeds),
        per_seed=per_seed,
        most_confused=[list(t) for t in evals[0].most_confused()],
        prediction_spread=evals[0].spread(),
        epochs=config.epochs,
        max_steps_per_epoch=config.max_steps_per_epoch,
        img_size=int(data.preprocess["img_size"]),
        backbone=kind if spec.kind == "features" else None,  # the report flags random ones
        smoke=smoke,
        trial_id=origin.get("trial_id"),
        profile_steps=profile_steps,
    )
    # Every seed trained: only now replace the previous result, whole. Its record goes first,
    # so an interruption from here on leaves a result without metrics.json (the report says it
    # is missing), never new files beside the old run's numbers.
    layout.result_metrics(tag).unlink(missing_ok=True)
    drop_metrics_rows(layout.metrics_csv, tag)  # metrics.csv's row showed the old scores
    layout.result_config(tag).unlink(missing_ok=True)
    for old in layout.result(tag).glob("checkpoint_seed*.pt"):
        old.unlink()
    shutil.rmtree(layout.profile(tag), ignore_errors=True)  # no stale profile beside new numbers
    for i, (seed, ckpt) in enumerate(zip(seeds, checkpoints, strict=True)):
        atomic_torch_save(ckpt, layout.checkpoint(tag, seed if i else None))
    csv, png = layout.confusion(tag, "csv"), layout.confusion(tag, "png")
    # The figures and per-class rows are the first seed's; the others' scores: metrics.json.
    title = tag if len(seeds) == 1 else f"{tag} (seed {seeds[0]})"
    evals[0].write(layout.per_class(tag, heldout), csv, png, title)
    if profile_steps:
        from tune_pets.profiling import run_profile

        print(f"{tag}: profiling {profile_steps} train steps", flush=True)
        prof = run_profile(first, data, profile_steps, layout.profile(tag), device)
        out.train_images_per_s = prof.get("images_per_s")
    RunInfo(
        name=tag,
        config=first.to_dict(),
        seeds=list(seeds),
        deterministic=True,
        determinism=(
            "torch.use_deterministic_algorithms(True), cuDNN deterministic, "
            "CUBLAS_WORKSPACE_CONFIG set before any CUDA work"
            if device.type == "cuda"
            # CPU kernels split work by thread: another thread count gives other roundings.
            else f"CPU: bitwise repeatable at the same thread count (--threads "
            f"{torch.get_num_threads()}); torch.use_deterministic_algorithms(True)"
        ),
        precision=result.precision,
        origin=origin,
        data=data.info,
        preprocess=data.preprocess,
        device=str(device),
        smoke=smoke,
        env=env_info(),
    ).write(layout.result_config(tag))
    out.write(layout.result_metrics(tag))
    row = {**stats, "n_seeds": out.n_seeds, "n_images": evals[0].n_images}
    write_metrics_row(layout.metrics_csv, tag, heldout, row)
    return out


# ---------------------------------------------------------------- CLI
def build_parser() -> cli.ArgumentParser:
    p = cli.command_parser(__doc__, "python -m tune_pets.reproduce")
    cli.add_model_arg(p, "which model to retrain")
    default = "<artifacts>/search/<model>/best_config.json"
    which = p.add_mutually_exclusive_group()
    which.add_argument("--best-config", help=f"best_config.json (default: {default})")
    which.add_argument(
        "--baseline", action="store_true", help="retrain the homework's config, not a searched one"
    )
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=cli.seed_int, help="one seed (default: the config's)")
    seeds.add_argument(
        "--seeds",
        type=cli.seed_int,
        nargs="+",
        help="several seeds: mean +- std (default: one seed)",
    )
    smoke_help = "mark the results as a smoke-size run in the report"
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument(
        "--profile-steps",
        type=cli.profile_steps_or_0,
        default=DEFAULT_PROFILE_STEPS,
        help="train steps to profile after the retrain (0: no profile)",
    )
    cli.add_data_args(p, val_split=False)
    cli.add_weights_args(p)
    cli.add_device_args(p)
    names, full = ("epochs", "img_size", "max_steps_per_epoch"), {"max_steps_per_epoch": "0"}
    cli.add_hparam_args(p, names, "the retrained config's", own=full)  # full epochs: see main
    cli.add_output_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    enable_cuda_determinism()  # before any CUDA work (feature extraction may come first)
    args = build_parser().parse_args(argv)
    spec = get_spec(args.model)
    cli.check_weights_flags(args, spec)
    layout = cli.layout_from_args(args)
    config, origin = resolve_config(spec, args.best_config, layout, args.baseline)
    data_dir = cli.data_dir_from_args(args)
    # A search may cap steps per epoch to save budget (the smoke spaces do); that is not a
    # hyperparameter, so the retrain runs full epochs unless the flag asks otherwise.
    if config.max_steps_per_epoch and args.max_steps_per_epoch is None:
        print(
            f"note: the search ran epochs of at most {config.max_steps_per_epoch} steps; the "
            f"retrain runs full epochs (--max-steps-per-epoch {config.max_steps_per_epoch} keeps "
            "the cap)",
            flush=True,
        )
    config = cli.config_from_args(args, config.replace(max_steps_per_epoch=0))  # with --seed
    seeds = args.seeds or [config.seed]
    cli.check_distinct_seeds(seeds)
    tag = result_tag(spec.name, args.baseline)
    m = reproduce(
        config,
        data_dir,
        layout,
        tag,
        seeds,
        origin,
        profile_steps=args.profile_steps,
        # a smoke search's retrain is one too, as is any run on the shipped sample
        smoke=args.smoke or origin.get("smoke", False) or args.data_dir == SAMPLE_NAME,
        device=cli.device_from_args(args),
        **cli.data_options(args),
    )
    std = f" +- {m.test_acc_std:.4f}" if len(seeds) > 1 else ""
    print(
        f"{tag}: test_acc {m.test_acc:.4f}{std}, test_macro_f1 {m.test_macro_f1:.4f} "
        f"({len(seeds)} seed(s)); wrote {layout.result(tag)}/"
    )
    return 0


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.reproduce")
