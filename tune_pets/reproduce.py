"""Reproduce the best config: deterministic retrain on all of train, one test evaluation, profile.

    python -m tune_pets.reproduce cnn             # reads artifacts/search/cnn/best_config.json
    python -m tune_pets.reproduce cnn --baseline  # the homework's config, same protocol
    python -m tune_pets.reproduce vit --seeds 0 1 2  # mean +- std over seeds

No Ray. The search's val split is folded back into train (the final model trains on the whole
official train split); the held-out test split is scored once per seed, never used to choose.
Outputs (``<tag>`` is the model, or ``<model>_baseline``): ``<artifacts>/<tag>/checkpoint_best.pt``,
``config.json``, ``metrics.json``, ``<artifacts>/metrics.csv``, ``<artifacts>/confusion_<tag>.*``,
``<artifacts>/profiler/<tag>/`` and TensorBoard logs under ``<runs-dir>/<tag>-seed<N>``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from tune_pets.config import RunConfig, cli_name, homework_defaults, validate_config
from tune_pets.utils import (
    ArgumentParser,
    UserError,
    atomic_torch_save,
    atomic_write_json,
    cli_main,
    env_info,
    nonneg_int,
    positive_int,
    read_json,
    resolve_device,
)


def resolve_config(
    model: str, best_config: Path | None, artifacts: Path, baseline: bool
) -> tuple[RunConfig, dict]:
    """The config to retrain and where it came from."""
    if baseline:
        return homework_defaults(model), {"source": "homework defaults (--baseline)"}
    path = best_config or artifacts / "search" / model / "best_config.json"
    if not path.is_file():
        raise UserError(
            f"no search result at {path}: run `python -m tune_pets.search {model}` "
            f"first, pass --best-config PATH, or use --baseline"
        )
    best = read_json(path, "--best-config")
    if not isinstance(best, dict) or "config" not in best:
        raise UserError(f"--best-config {path}: not a best_config.json written by tune_pets.search")
    config = RunConfig.from_dict(best["config"], str(path))
    if cli_name(config.model) != model:
        raise UserError(
            f"--best-config {path} is for model {cli_name(config.model)!r}, not {model!r}"
        )
    return config, {
        "source": str(path),
        "trial_id": best.get("trial_id"),
        "val_acc": best.get("val_acc"),
        "val_macro_f1": best.get("val_macro_f1"),
    }


def reproduce(
    config: RunConfig,
    data_dir: Path,
    artifacts: Path,
    runs_dir: Path,
    tag: str,
    seeds: Sequence[int],
    origin: dict,
    *,
    profile_steps: int = 50,
    cache_dir=None,
    skip_bad: bool = False,
    device=None,
    progress: bool = True,
) -> dict:
    import torch

    from tune_pets.data import cache_res, heldout_split_name, load_split
    from tune_pets.evaluate import evaluate_checkpoint
    from tune_pets.train import fit, load_fit_data

    device = device or torch.device("cpu")
    heldout = heldout_split_name(data_dir)
    out = artifacts / tag
    per_seed = []
    data = None
    for i, seed in enumerate(seeds):
        cfg = config.replace(seed=seed, deterministic=True)
        if data is None:
            data = load_fit_data(
                cfg,
                data_dir,
                full_train=True,
                cache_dir=cache_dir,
                skip_bad=skip_bad,
                device=device,
                progress=progress,
            )
            # Read (and cache) the test split now: a bad test image fails before training.
            pre = data.preprocess
            size = cfg.img_size if data.kind == "images" else pre["img_size"]
            load_split(
                data_dir,
                heldout,
                cache_res(size, pre["crop_pct"]),
                interpolation=pre["interpolation"],
                cache_dir=cache_dir,
                skip_bad=skip_bad,
                classes=data.classes,
                progress=progress,
            )
            print(
                f"{tag}: retraining on all {data.info['n_train']} train images, "
                f"{cfg.epochs} epochs, device {device}, deterministic",
                flush=True,
            )
        result = fit(
            cfg, data, device=device, tb_dir=runs_dir / f"{tag}-seed{seed}", progress=progress
        )
        ckpt = result.checkpoint
        ckpt_path = out / ("checkpoint_best.pt" if i == 0 else f"checkpoint_seed{seed}.pt")
        atomic_torch_save(ckpt, ckpt_path)
        # Every seed is scored once on the test split; the per-class CSV, confusion matrix and
        # metrics.csv row are written for the first seed (the row gets the mean below).
        ev = evaluate_checkpoint(
            ckpt,
            data_dir,
            heldout,
            artifacts,
            cache_dir=cache_dir,
            skip_bad=skip_bad,
            device=device,
            progress=progress,
            tag=tag,
            write=i == 0,
        )
        per_seed.append(
            {
                "seed": seed,
                "test_acc": ev[f"{heldout}_acc"],
                "test_macro_f1": ev[f"{heldout}_macro_f1"],
                "epochs": cfg.epochs,
                "train_loss": result.history[-1]["train_loss"],
                "train_time_s": round(sum(h["epoch_time_s"] for h in result.history), 2),
            }
        )
        print(
            f"{tag} seed {seed}: test_acc {ev[f'{heldout}_acc']:.4f}, test_macro_f1 "
            f"{ev[f'{heldout}_macro_f1']:.4f}",
            flush=True,
        )
        if i == 0:
            most_confused = ev["most_confused"]

    accs = [r["test_acc"] for r in per_seed]
    f1s = [r["test_macro_f1"] for r in per_seed]
    metrics = {
        "model": tag,
        "split": heldout,
        "test_acc": statistics.fmean(accs),
        "test_macro_f1": statistics.fmean(f1s),
        "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "test_macro_f1_std": statistics.stdev(f1s) if len(f1s) > 1 else 0.0,
        "n_seeds": len(seeds),
        "per_seed": per_seed,
        "most_confused": [list(t) for t in most_confused],
    }
    if len(seeds) > 1:
        from tune_pets.utils import upsert_csv_row

        upsert_csv_row(
            artifacts / "metrics.csv",
            {
                "model": tag,
                "split": heldout,
                "accuracy": round(metrics["test_acc"], 6),
                "macro_f1": round(metrics["test_macro_f1"], 6),
                "accuracy_std": round(metrics["test_acc_std"], 6),
                "macro_f1_std": round(metrics["test_macro_f1_std"], 6),
                "n_seeds": len(seeds),
            },
            key=("model", "split"),
        )
    prof = None
    if profile_steps:
        from tune_pets.profiling import run_profile

        cfg = config.replace(seed=seeds[0], deterministic=True)
        prof = run_profile(cfg, data, profile_steps, artifacts / "profiler" / tag, device)
        metrics["train_images_per_s"] = prof.get("images_per_s")
    atomic_write_json(
        out / "config.json",
        {
            "tag": tag,
            "config": config.replace(seed=seeds[0], deterministic=True).to_dict(),
            "seeds": list(seeds),
            "deterministic": True,
            "deterministic_note": (
                "torch.use_deterministic_algorithms(True), cuDNN deterministic"
                if device.type == "cuda"
                else "CPU: bitwise repeatable"
            ),
            "origin": origin,
            "data": data.info,
            "preprocess": data.preprocess,
            "device": str(device),
            "env": env_info(),
        },
    )
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    from tune_pets.data import check_data_dir

    p = ArgumentParser(prog="python -m tune_pets.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=["cnn", "vit"])
    p.add_argument("--data-dir", default="data/oxford_pets")
    p.add_argument(
        "--best-config",
        default=None,
        help="best_config.json (default <artifacts>/search/<model>/best_config.json)",
    )
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=nonneg_int, default=None)
    seeds.add_argument("--seeds", type=nonneg_int, nargs="+", default=None)
    p.add_argument("--baseline", action="store_true", help="retrain the homework's config instead")
    p.add_argument("--epochs", type=positive_int, help="override epochs (e.g. smoke runs)")
    p.add_argument("--img-size", type=positive_int, help="CNN: override the input size")
    p.add_argument("--max-steps-per-epoch", type=nonneg_int, help="cap steps per epoch (smoke)")
    p.add_argument("--profile-steps", type=nonneg_int, default=50, help="0 skips profiling")
    p.add_argument("--artifacts-dir", default="artifacts")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--skip-bad-images", action="store_true")
    p.add_argument("--no-pretrained", action="store_true", help="ViT: random backbone (tests)")
    p.add_argument("--weights", default=None, help="ViT: local backbone weights file")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    artifacts = Path(args.artifacts_dir)
    config, origin = resolve_config(
        args.model, Path(args.best_config) if args.best_config else None, artifacts, args.baseline
    )
    data_dir = check_data_dir(args.data_dir)
    # A search may cap steps per epoch to save budget (the smoke spaces do); that is not a
    # hyperparameter, so the retrain runs full epochs unless the flag asks otherwise.
    changes = {"max_steps_per_epoch": 0}
    for k in ("epochs", "img_size", "max_steps_per_epoch"):
        if getattr(args, k) is not None:
            changes[k] = getattr(args, k)
    if args.no_pretrained:
        changes["pretrained"] = False
    if args.weights:
        changes["weights"] = args.weights
    config = validate_config(config.replace(**changes), "command line")
    seeds = args.seeds or [args.seed if args.seed is not None else config.seed]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: seeds must be distinct")
    tag = args.model + ("_baseline" if args.baseline else "")
    m = reproduce(
        config,
        data_dir,
        artifacts,
        Path(args.runs_dir),
        tag,
        seeds,
        origin,
        profile_steps=args.profile_steps,
        cache_dir=args.cache_dir,
        skip_bad=args.skip_bad_images,
        device=resolve_device(args.device),
        progress=not args.no_progress,
    )
    std = f" +- {m['test_acc_std']:.4f}" if len(seeds) > 1 else ""
    print(
        f"{tag}: test_acc {m['test_acc']:.4f}{std}, test_macro_f1 {m['test_macro_f1']:.4f} "
        f"({len(seeds)} seed(s)); wrote {artifacts / tag}/"
    )
    return 0


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.reproduce")
