"""Train one model once, for exploratory runs: plain PyTorch, no Ray; every search trial runs
the same ``fit(config, data, on_epoch_end)``.

    python -m tune_pets.train cnn --data-dir sample --epochs 5 --img-size 64
    python -m tune_pets.train vit --data-dir data/oxford_pets --no-pretrained
    python -m tune_pets.train cnn --data-dir sample --overfit-batches 1

Trains on the train split minus a seeded, stratified val split (saved as a file list), keeps the
best checkpoint by ``config.metric``, and writes to ``<artifacts>/train/<run-name>/`` (TensorBoard:
``<runs-dir>/train/<run-name>/``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from tune_pets import cli
from tune_pets.checkpoint import make_checkpoint
from tune_pets.config import LOWER_IS_BETTER, RunConfig
from tune_pets.engine import Engine, FitData, load_fit_data, predict
from tune_pets.models import ModelSpec
from tune_pets.records import RunInfo
from tune_pets.utils import atomic_torch_save, atomic_write_json, atomic_write_text, cli_main
from tune_pets.utils import command_lock, env_info


@dataclass
class FitResult:
    history: list[dict]
    best_epoch: int
    best_metrics: dict
    checkpoint: dict  # the best epoch's checkpoint (tune_pets.checkpoint format)
    precision: str  # fp32 | bf16
    determinism: dict  # what seed_everything set


def fit(
    config: RunConfig,
    data: FitData,
    on_epoch_end: Callable[[dict, dict | None], None] | None = None,
    *,
    device: torch.device | None = None,
    tb_dir: str | Path | None = None,
    hparams: dict | None = None,
    progress: bool = False,
    spec: ModelSpec | None = None,
    resume: dict | None = None,
    on_state: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train ``config`` on ``data``, validating each epoch (without a val split the last epoch is
    the best). ``on_epoch_end(metrics, checkpoint)``: ``checkpoint`` only when the epoch is the
    best so far. ``on_state(state)`` gets the run's whole state after every epoch;
    ``fit(..., resume=state)`` continues from there exactly (a trial restarted on another node)."""
    engine = Engine(config, data, device, spec)
    lower = config.metric in LOWER_IS_BETTER
    # The checkpoint fields that stay the same all run. The preprocessing is the run's own: a
    # search's shared data was made for its base config (a trial at 96 px read 224).
    preprocess = engine.spec.data_config(config)
    checkpoint = partial(make_checkpoint, config, engine.spec, data.classes, preprocess)
    history: list[dict] = []
    best, best_epoch, best_ckpt = None, 0, None
    if resume is not None:
        engine.load_train_state(resume["engine"])
        history = [dict(h) for h in resume["history"]]
        best, best_epoch, best_ckpt = resume["best"], resume["best_epoch"], resume["best_ckpt"]
    # TensorBoard hides earlier events of the epochs this run logs again: a search trial killed
    # after logging an epoch but before saving its state repeats that epoch, or all of them.
    purge = len(history) + 1
    tb = _TensorBoard(tb_dir, hparams, config.metric, purge) if tb_dir is not None else None
    try:
        for epoch in range(len(history) + 1, config.epochs + 1):
            t0 = time.perf_counter()
            metrics = {"epoch": epoch, **engine.run_epoch(epoch, progress)}
            if data.has_val:
                metrics.update(engine.validate())
            metrics["epoch_time_s"] = time.perf_counter() - t0
            score = metrics.get(config.metric) if data.has_val else None
            ckpt = None
            if score is None or best is None or (score < best if lower else score > best):
                best, best_epoch = score, epoch
                ckpt = best_ckpt = checkpoint(engine.state_dict(), epoch, metrics, data.feature_dim)
            history.append(metrics)
            if tb is not None:
                tb.epoch(metrics)
            if on_state is not None:
                on_state(
                    {
                        "engine": engine.train_state(),
                        "history": [dict(h) for h in history],
                        "best": best,
                        "best_epoch": best_epoch,
                        "best_ckpt": best_ckpt,
                    }
                )
            if on_epoch_end is not None:
                on_epoch_end(dict(metrics), ckpt)
    finally:
        if tb is not None:
            tb.close()
    best_metrics = history[best_epoch - 1]
    return FitResult(
        history, best_epoch, best_metrics, best_ckpt, engine.precision, engine.determinism
    )


class _TensorBoard:
    """Per-epoch scalars; the hyperparameters for the HParams tab are written at the start, so a
    running search is comparable live."""

    def __init__(self, log_dir: str | Path, hparams: dict | None, metric: str, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.session_end = None
        if hparams:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            values = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in hparams.items()
            }
            keys = dict.fromkeys([metric, "val_acc", "val_macro_f1", "val_loss"], 0.0)
            exp, start, self.session_end = hparams_summary(values, keys)
            for s in (exp, start):
                self.writer.file_writer.add_summary(s)

    def epoch(self, metrics: dict) -> None:
        for k, v in metrics.items():
            if k != "epoch":
                self.writer.add_scalar(k, v, metrics["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.session_end is not None:
            self.writer.file_writer.add_summary(self.session_end)
        self.writer.close()


def overfit_check(
    config: RunConfig, data: FitData, n_batches: int = 1, device: torch.device | None = None
) -> tuple[bool, int, float]:
    """Can the model memorize ``n_batches`` fixed batches (no augmentation, weight decay, schedule
    or label smoothing)? Returns (passed, optimizer steps taken, final accuracy on them)."""
    max_passes = 300  # passes over the fixed batches before it fails
    config = config.replace(
        weight_decay=0.0, scheduler="none", warmup_epochs=0, label_smoothing=0.0, deterministic=True
    )
    engine = Engine(config, data, device)
    n = min(len(data.train_y), n_batches * config.batch_size)
    x_all = data.train_x[:n] if data.kind == "images" else data.train_x[0][:n]
    fixed = list(engine.batches.eval(x_all, data.train_y[:n], config.batch_size))
    acc = 0.0
    for passes in range(1, max_passes + 1):
        for x, y in fixed:
            engine.step(x, y)
        if passes % 5 == 0 or passes == max_passes:
            preds, labels, _ = predict(engine.model, fixed, engine.precision)
            acc = float((preds == labels).mean())
            if acc == 1.0:
                return True, passes * len(fixed), acc
    return False, max_passes * len(fixed), acc


def build_parser() -> cli.ArgumentParser:
    p = cli.command_parser(__doc__, "python -m tune_pets.train")
    cli.add_model_arg(p, "which model to train")
    cli.add_data_args(p)
    cli.add_weights_args(p)
    cli.add_device_args(p)
    cli.add_hparam_args(p)
    cli.add_output_args(p)
    p.add_argument(
        "--run-name", type=cli.plain_name, help="name of this run's folders (default: the model)"
    )
    p.add_argument(
        "--overfit-batches",
        type=cli.positive_int,
        help="overfit check: memorize N batches, print PASS/FAIL, exit 1 on FAIL",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    run = cli.resolve_run_args(build_parser().parse_args(argv))
    run_name = run.args.run_name or run.spec.name
    if run.args.overfit_batches:  # writes nothing
        return _train(run, run_name)
    lock = run.layout.train_run(run_name) / ".lock"
    hint = "wait for it to finish, or pass --run-name NEW to train beside it"
    with command_lock(lock, f"train run {run_name!r}", hint):  # a second one refuses
        return _train(run, run_name)


def _train(run: cli.RunArgs, run_name: str) -> int:
    args, spec, config, device, layout = run.args, run.spec, run.config, run.device, run.layout
    out = layout.train_run(run_name)
    val_fraction = args.val_fraction or cli.DEFAULT_VAL_FRACTION
    options = {"val_fraction": val_fraction, "device": device, **cli.data_options(args)}
    if args.overfit_batches:  # memorizes train batches: no val split, nothing written
        data = load_fit_data(config, run.data_dir, full_train=True, **options)
        _data_line(spec, data, device)
        ok, steps, acc = overfit_check(config, data, args.overfit_batches, device=device)
        print(
            f"overfit check ({args.overfit_batches} batch(es)): {'PASS' if ok else 'FAIL'} "
            f"- accuracy {acc:.3f} after {steps} steps"
        )
        return 0 if ok else 1

    # An earlier run's files go with this run's first epoch, not before: a start that fails or
    # is interrupted leaves them whole (its val split put back); one that trains never mixes
    # the two.
    split_file, ckpt_path = out / "val_split.json", out / "checkpoint_best.pt"
    split_before = split_file.read_text(encoding="utf-8") if split_file.is_file() else None
    tb_dir = layout.train_tb(run_name)
    trained = False  # an epoch finished

    def log(metrics: dict, ckpt: dict | None) -> None:
        nonlocal trained
        if not trained:
            for stale in ("checkpoint_best.pt", "config.json", "metrics.json"):
                (out / stale).unlink(missing_ok=True)
            for f in old_events:  # this run's own event file is open beside them
                f.unlink(missing_ok=True)
            trained = True
        if ckpt is not None:
            atomic_torch_save(ckpt, ckpt_path)
        print(format_epoch(metrics, config.epochs) + (" *" if ckpt else ""), flush=True)

    try:
        data = load_fit_data(config, run.data_dir, split_file=split_file, **options)
        _data_line(spec, data, device)
        tb_dir.mkdir(parents=True, exist_ok=True)  # a bad --runs-dir fails before training
        old_events = list(tb_dir.glob("events.out.tfevents.*"))
        result = fit(config, data, log, device=device, tb_dir=tb_dir, progress=not args.no_progress)
    except BaseException as e:
        if not trained and split_before is None:
            split_file.unlink(missing_ok=True)
        elif not trained:
            atomic_write_text(split_file, split_before)
        if not isinstance(e, KeyboardInterrupt):
            raise
        if not trained:
            raise KeyboardInterrupt(f"no epoch finished; {out} is as it was") from None
        raise KeyboardInterrupt(
            (f"the best checkpoint so far is {ckpt_path}; " if ckpt_path.is_file() else "")
            + "config.json and metrics.json were not written; run the same command again to "
            "train from the start"
        ) from None
    RunInfo(
        name=run_name,
        config=config.to_dict(),
        seeds=[config.seed],
        deterministic=config.deterministic,
        precision=result.precision,
        data=data.info,
        preprocess=data.preprocess,
        device=str(device),
        env=env_info(),
    ).write(out / "config.json")
    atomic_write_json(
        out / "metrics.json",
        {"best_epoch": result.best_epoch, "best": result.best_metrics, "history": result.history},
    )
    print(
        f"best epoch {result.best_epoch}: {config.metric} "
        f"{result.best_metrics.get(config.metric, float('nan')):.4f}; wrote {out}/ and {tb_dir}/"
    )
    return 0


def _data_line(spec: ModelSpec, data: FitData, device: torch.device) -> None:
    print(
        f"{spec.name}: {data.info['n_train']} train / {data.info.get('n_val', 0)} val images, "
        f"{data.num_classes} classes, device {device}",
        flush=True,
    )


def clear_tb_events(tb_dir: Path) -> None:
    """Delete an earlier run's TensorBoard event files, so a rerun's curves are not drawn over
    the old ones (a search trial keeps its own: a restarted trial goes on with them)."""
    for f in Path(tb_dir).glob("events.out.tfevents.*"):
        f.unlink(missing_ok=True)


def format_epoch(metrics: dict, epochs: int) -> str:
    # val_*: only with a val split
    keys = ("train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1")
    scores = "".join(f" {k} {metrics[k]:.4f}" for k in keys if k in metrics)
    return f"epoch {metrics['epoch']:3d}/{epochs}{scores} ({metrics['epoch_time_s']:.1f}s)"


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.train")
