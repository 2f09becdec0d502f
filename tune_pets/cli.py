"""Shared command-line pieces: the parser every command uses and the flag groups (data, backbone
weights, device, outputs, hyperparameters), each defined once with one help text. Argparse stays
at the edge: a command adds groups to ``command_parser(__doc__, prog)``, then turns its flags
into a spec, ``RunConfig``, data dir, device and ``Layout`` with ``resolve_run_args(args)``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_pets.config import CHOICES, DEFAULT_VAL_FRACTION, RunConfig, validate_config
from tune_pets.layout import DEFAULT_ARTIFACTS_DIR, DEFAULT_DATA_DIR, DEFAULT_RUNS_DIR, Layout
from tune_pets.utils import UserError, usable_cores


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds "(default: X)" to every option with a default other than None/False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        hidden = default is None or default is False or default == argparse.SUPPRESS  # 0 shows
        if action.option_strings and not hidden and "%(default)" not in text:
            shown = " ".join(map(str, default)) if isinstance(default, list) else "%(default)s"
            text += f" (default: {shown})"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is one ``--help`` away) and a ``--debug`` flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show full tracebacks on errors")

    def error(self, message: str) -> None:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def command_parser(module_doc: str | None, prog: str) -> ArgumentParser:
    """A command's parser, described by the first paragraph of its module docstring."""
    description = (module_doc or "").split("\n\n")[0].replace("``", "")  # plain text in --help
    return ArgumentParser(prog=prog, description=description)


# ---------------------------------------------------------------- value types
def _number(parse: Callable[[str], float], ok: Callable[[float], bool], what: str):
    """An argparse type: ``parse`` the text, then check ``ok``; errors say ``what`` was due."""

    def convert(text: str):
        try:
            v = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    convert.__name__ = what  # argparse names the type in "invalid <type> value" messages
    return convert


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
seed_int = _number(int, lambda v: 0 <= v < 2**32, "an integer in [0, 4294967295]")  # numpy's
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive finite number")
nonneg_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")
fraction = _number(float, lambda v: 0.0 < v < 1.0, "a number strictly between 0 and 1")
# More torch threads than CPUs only slows it; --threads 100000 started 32,444 threads and
# exhausted the machine's process limit before failing.
thread_count = _number(
    int, lambda v: 0 < v <= (os.cpu_count() or 1), f"between 1 and the {os.cpu_count()} CPUs here"
)

# The profiler's trace grows about 15 MB a profiled step (measured: 1.5 GB RSS at 50 steps, 6.7
# GB at 400): --profile-steps 100000000 was killed by the OOM killer, with no message.
MAX_PROFILE_STEPS = 200
profile_steps = _number(
    int, lambda v: 0 < v <= MAX_PROFILE_STEPS, f"an integer from 1 to {MAX_PROFILE_STEPS}"
)
profile_steps_or_0 = _number(
    int, lambda v: 0 <= v <= MAX_PROFILE_STEPS, f"an integer from 0 to {MAX_PROFILE_STEPS}"
)


def plain_name(text: str) -> str:
    """An argparse type for names that become folders: one plain path component, so a name can
    never reach outside its folder (``--name ..`` would have replaced the folder above)."""
    if text in ("", ".", "..") or "/" in text or os.sep in text or "\0" in text:
        raise argparse.ArgumentTypeError(
            f"must be a plain folder name (no '/', not '.' or '..'), got {text!r}"
        )
    if len(os.fsencode(text)) > 200:  # room for suffixes within a file system's 255 bytes
        raise argparse.ArgumentTypeError(f"must be at most 200 bytes long, got {len(text)} chars")
    return text


plain_name.__name__ = "a folder name"


# ---------------------------------------------------------------- flag groups
def add_model_arg(p: argparse.ArgumentParser, what: str = "which model") -> None:
    from tune_pets.models import get_spec, model_names

    helps = "; ".join(f"{n}: {get_spec(n).help}" for n in model_names())
    p.add_argument("model", choices=model_names(), help=f"{what} ({helps})")


def add_data_args(
    p: argparse.ArgumentParser,
    default: str = DEFAULT_DATA_DIR,
    val_split: bool = True,
    decode: bool = True,
    split_default: str = "the run's --seed",
    default_help: str = "",
) -> None:
    """--data-dir; with ``decode`` the decode-cache flags; with ``val_split`` the split's."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        default=default,
        help="ImageFolder root with train/<class>/ and test/<class>/; 'sample' is the small "
        "set of real photos shipped with the package" + default_help,
    )
    if decode:
        g.add_argument(
            "--cache-dir",
            help="decode and feature cache (default: $TUNE_PETS_CACHE or ~/.cache/tune_pets)",
        )
        g.add_argument(
            "--skip-bad-images",
            action="store_true",
            help="skip unreadable images (listed on stderr) instead of failing",
        )
    if val_split:
        g.add_argument(
            "--val-fraction",
            type=fraction,  # None when not given: --resume refuses only an explicit other value
            help="share of train held out as the validation split "
            f"(default: {DEFAULT_VAL_FRACTION})",
        )
        g.add_argument(
            "--split-seed",
            type=seed_int,
            help=f"seed of the train/val split (default: {split_default})",
        )


def add_weights_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone weights (features models such as vit)")
    g.add_argument(
        "--no-pretrained",
        action="store_true",
        help="random backbone weights, for offline tests only: results are meaningless",
    )
    g.add_argument(
        "--weights",
        help="local backbone weights file (model.safetensors or .pth) instead of the hub",
    )


def add_device_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--threads",
        type=thread_count,
        help="CPU threads for torch (default: the cores this process may use)",
    )


def add_output_args(p: argparse.ArgumentParser, runs: bool = True) -> None:
    g = p.add_argument_group("outputs")
    g.add_argument(
        "--artifacts-dir", default=DEFAULT_ARTIFACTS_DIR, help="where results are written"
    )
    if runs:
        g.add_argument(
            "--runs-dir", default=DEFAULT_RUNS_DIR, help="TensorBoard logs (tensorboard --logdir)"
        )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


HPARAMS = {  # flag -> (type, help)
    "epochs": (positive_int, "epochs to train"),
    "lr": (positive_float, "learning rate"),
    "batch_size": (positive_int, "batch size"),
    "img_size": (positive_int, "input size in pixels (models with their own size refuse it)"),
    "optimizer": (str, "adamw, adam or sgd"),
    "weight_decay": (float, "weight decay"),
    "label_smoothing": (float, "label smoothing of the cross-entropy loss"),
    "max_steps_per_epoch": (nonneg_int, "cap steps per epoch, for smoke runs (0: no cap)"),
    "seed": (seed_int, "seed of weights, batch order and augmentation"),
}


def add_hparam_args(
    p: argparse.ArgumentParser,
    names: tuple[str, ...] = tuple(HPARAMS),
    default: str = "",
    own: dict[str, str] | None = None,
) -> None:
    """The hyperparameter flags; each shows its homework default per model, or ``default``, or
    its own (``own``: flag name -> default shown)."""
    from tune_pets.models import get_spec, model_names

    g = p.add_argument_group(f"hyperparameters (default: {default or 'the homework settings'})")
    for name in names:
        typ, text = HPARAMS[name]
        by_model = {m: getattr(get_spec(m).defaults, name) for m in model_names()}
        values = set(by_model.values())  # one value: shown once, else per model
        per_model = ", ".join(f"{m} {v}" for m, v in by_model.items())
        shown = (own or {}).get(name) or default
        shown = shown or (str(values.pop()) if len(values) == 1 else per_model)
        flag = "--" + name.replace("_", "-")
        g.add_argument(flag, type=typ, choices=CHOICES.get(name), help=f"{text} (default: {shown})")


# ---------------------------------------------------------------- flags -> objects
def config_from_args(args: argparse.Namespace, base: RunConfig) -> RunConfig:
    """``base`` with the explicit hyperparameter, split-seed and weights flags applied."""
    from tune_pets.models import get_spec

    spec = get_spec(base.model)
    flags = (*HPARAMS, "split_seed")
    changes = {k: getattr(args, k) for k in flags if getattr(args, k, None) is not None}
    check_weights_flags(args, spec, base.backbone)
    if getattr(args, "no_pretrained", False):
        changes["pretrained"] = False
    if getattr(args, "weights", None):
        # Absolute: checkpoints and best_config.json are read from other working folders.
        changes["weights"] = str(Path(args.weights).resolve())
    if spec.fixed_input_size and "img_size" in changes:
        size = spec.data_config(base)["img_size"]
        if changes["img_size"] != size:
            raise UserError(f"--img-size: {spec.name} uses the backbone's own input size ({size})")
    return validate_config(base.replace(**changes), "command line")


def check_weights_flags(args: argparse.Namespace, spec: Any, backbone: str | None = None) -> None:
    """The backbone flags, checked now, not after the data is decoded (minutes on the full set);
    they mean nothing to a model trained from scratch: refused, not recorded. With
    ``backbone``, a --weights file must hold that backbone's tensors."""
    weights = getattr(args, "weights", None)
    if spec.build_backbone is None and (weights or getattr(args, "no_pretrained", False)):
        flag = "--weights" if weights else "--no-pretrained"
        raise UserError(f"{flag}: {spec.name} has no pretrained backbone; leave it out")
    if weights:
        from tune_pets.backbone import check_weights_file

        if not Path(weights).is_file():
            raise UserError(f"--weights {weights}: file not found")
        check_weights_file(Path(weights), backbone, f"--weights {weights}")


def check_distinct_seeds(seeds: list[int] | None) -> None:
    if seeds and len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: seeds must be distinct")


def data_dir_from_args(args: argparse.Namespace) -> Path:
    """The data dir, with 'sample' resolved to the shipped photos, checked."""
    from tune_pets.data import check_data_dir
    from tune_pets.sample import resolve_data_dir

    return check_data_dir(resolve_data_dir(args.data_dir))


@dataclass(frozen=True)
class RunArgs:
    args: argparse.Namespace
    spec: Any  # models.ModelSpec
    config: RunConfig  # the model's homework defaults with the flags applied
    data_dir: Path
    device: Any  # torch.device
    layout: Layout


def resolve_run_args(args: argparse.Namespace) -> RunArgs:
    from tune_pets.models import get_spec

    spec = get_spec(args.model)
    config = config_from_args(args, spec.defaults)
    device = device_from_args(args)  # the cheap checks first
    return RunArgs(args, spec, config, data_dir_from_args(args), device, layout_from_args(args))


def data_options(args: argparse.Namespace) -> dict:
    """The decode-cache keyword arguments of ``engine.load_fit_data`` from the data flags."""
    return dict(
        cache_dir=args.cache_dir, skip_bad=args.skip_bad_images, progress=not args.no_progress
    )


def layout_from_args(args: argparse.Namespace) -> Layout:
    return Layout(Path(args.artifacts_dir), Path(getattr(args, "runs_dir", DEFAULT_RUNS_DIR)))


def device_from_args(args: argparse.Namespace):
    """The torch device, with torch's CPU threads set (``--threads``, else the usable cores)."""
    import torch

    torch.set_num_threads(getattr(args, "threads", None) or usable_cores())
    name = getattr(args, "device", "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):  # torch parses mps, xpu, meta: they crash later
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)
