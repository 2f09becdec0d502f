"""What a search will run, settled before Ray starts: the search spec (the YAML with the flags
over it; on --resume, the spec it was started with), each trial's resources on the cluster, the
trials' base config, the homework's point evaluated first, and the sampler. No Ray here:
``search_ray`` runs the plan, ``search`` is the command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_pets import cli
from tune_pets.config import RunConfig, validate_config
from tune_pets.models import ModelSpec
from tune_pets.search_results import optuna_distributions
from tune_pets.spaces import SearchSpec, default_space, load_search_spec
from tune_pets.utils import UserError, atomic_write_json, read_json

# GPU share of one trial with ``resources: auto``: four CNN trials per GPU; a ViT-probe head
# trains in seconds, so packing more would only leave TPE fewer finished trials to learn from.
DEFAULT_GPU_FRACTION = {"images": 0.25, "features": 0.5}


# ---------------------------------------------------------------- resources
@dataclass(frozen=True)
class TrialResources:
    cpu: float
    gpu: float
    max_concurrent: int
    why: str  # where max_concurrent came from

    def line(self, cluster: Mapping[str, float]) -> str:
        per_trial = f"{self.cpu:g} CPU" + (f" + {self.gpu:g} GPU" if self.gpu else "")
        return (
            f"resources: {per_trial} per trial, up to {self.max_concurrent} trial(s) at once "
            f"({self.why}; cluster: {cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU)"
        )


def choose_resources(
    spec: SearchSpec,
    cluster: Mapping[str, float],
    kind: str,
    flags: Any = None,
    largest_node: Mapping[str, float] | None = None,
) -> TrialResources:
    """Per-trial CPUs/GPUs and concurrency on ``cluster`` (``ray.cluster_resources()``): the
    YAML's ``resources`` (``auto`` or ``{cpu, gpu}``) with the parsed resource ``flags`` over it.
    Trials at once: ``--max-concurrent``, else a GPU share from auto or a flag fills the GPUs,
    else the YAML's max_concurrent; the last two capped by what fits. Asking for more than the
    cluster has, or than its largest node has (default: one node, the cluster), is an error,
    not a search that waits forever."""
    yaml = spec.resources if isinstance(spec.resources, Mapping) else {}

    def asked(key: str, flag: str, value: float | None) -> tuple[float | None, str]:
        """The flag's value, else the YAML's (None: neither), and where it came from."""
        if value is None and key in yaml:
            return float(yaml[key]), f"{spec.source}: resources.{key}"
        return value, flag

    have_cpu, have_gpu = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    cpu, cpu_option = asked("cpu", "--cpus-per-trial", getattr(flags, "cpus_per_trial", None))
    cpu = 1.0 if cpu is None else cpu
    if cpu > have_cpu:
        raise UserError(
            f"{cpu_option} {cpu:g}: the Ray cluster has only {have_cpu:g} CPU(s); "
            f"lower --cpus-per-trial"
        )
    gpu, gpu_option = asked("gpu", "--gpus-per-trial", getattr(flags, "gpus_per_trial", None))
    share = gpu_option if gpu is not None else f"{kind} default"
    if gpu is None:
        gpu = DEFAULT_GPU_FRACTION.get(kind, 0.5) if have_gpu > 0 else 0.0
    if gpu > have_gpu:
        raise UserError(
            f"{gpu_option} {gpu:g}: the Ray cluster has {have_gpu:g} GPU(s); use "
            f"--gpus-per-trial 0 or add GPU nodes"
        )
    node = largest_node or cluster
    for want, option, key in ((cpu, cpu_option, "CPU"), (gpu, gpu_option, "GPU")):
        if want > node.get(key, 0):  # Ray would keep the trials pending forever
            raise UserError(
                f"{option} {want:g}: no node of the Ray cluster has more than "
                f"{node.get(key, 0):g} {key}(s), and a trial runs on one node; ask for less"
            )
    if getattr(flags, "max_concurrent", None) is not None:
        why = getattr(flags, "max_concurrent_why", "--max-concurrent")  # resumed: as started
        return TrialResources(cpu, gpu, flags.max_concurrent, why)
    # The trials the cluster can run at once; the epsilon keeps 33 / 1.1 = 29.999... from
    # losing a trial to rounding.
    fit_cpu = math.floor(have_cpu / cpu + 1e-9)
    fit_gpu = math.floor(have_gpu / gpu + 1e-9) if gpu > 0 else math.inf
    # A GPU share from auto or a flag fills the GPUs; one fixed in the YAML keeps its
    # max_concurrent. Either is capped by what fits: more would wait, TPE suggesting blind.
    if gpu > 0 and gpu_option == "--gpus-per-trial":
        most, why = fit_gpu, f"GPUs / {gpu:g} ({share})"
    else:
        most, why = spec.max_concurrent, "max_concurrent in the YAML"
    if min(fit_cpu, fit_gpu) < most:
        why += ", capped by CPUs" if fit_cpu < fit_gpu else ", capped by GPUs"
    return TrialResources(cpu, gpu, max(1, min(most, fit_cpu, fit_gpu)), why)


def asha_warning(spec: SearchSpec) -> str | None:
    """ASHA's first rung is at ``grace_period``: at or past ``max_epochs`` it never stops one."""
    if spec.grace_period < spec.max_epochs:
        return None
    return (
        f"warning: grace_period {spec.grace_period} >= max_epochs {spec.max_epochs}: ASHA can "
        f"never stop a trial early; lower --grace-period or raise --max-epochs"
    )


# ---------------------------------------------------------------- spec -> trial configs
def base_config(spec: SearchSpec, model: ModelSpec) -> RunConfig:
    """The model's homework settings, then the YAML's ``fixed`` values, then the search's own."""
    own = {
        "model": model.name,
        "epochs": spec.max_epochs,
        "seed": spec.seed,
        "split_seed": spec.split_seed,
        "metric": spec.metric,
    }
    return validate_config(model.defaults.replace(**{**spec.fixed, **own}), spec.source)


def first_point(spec: SearchSpec, model: ModelSpec) -> dict:
    """The homework's hyperparameters snapped into the space: evaluated first, so the search
    can only match or beat the baseline."""
    import optuna.distributions as od

    point = {}
    for name, dist in optuna_distributions(spec).items():
        v = getattr(model.defaults, name)
        if isinstance(dist, od.CategoricalDistribution):
            numeric = [c for c in dist.choices if isinstance(c, (int, float))]
            if v not in dist.choices:
                near = numeric and isinstance(v, (int, float))
                v = min(numeric, key=lambda c: abs(c - v)) if near else dist.choices[0]
        else:
            v = min(max(v, dist.low), dist.high)
            if isinstance(dist, od.IntDistribution):
                v = int(dist.low + round((v - dist.low) / dist.step) * dist.step)
            elif dist.step:
                v = dist.low + round((v - dist.low) / dist.step) * dist.step
        point[name] = v
    return point


def img_sizes(spec: SearchSpec, base: RunConfig) -> list[int]:
    """Every img_size a trial may use (the shared image cache is built for the largest)."""
    if "img_size" not in spec.space:
        return [base.img_size]
    sampler, args = spec.space["img_size"]
    return [int(a) for a in (args if sampler == "choice" else args[:2])]


# ---------------------------------------------------------------- the sampler
SEARCHERS = ("tpe", "random")  # make_sampler's kinds


def startup_trials(num_samples: int) -> int:
    """Random trials before TPE takes over: a fifth of the search, at least 4, at most 10
    (Optuna's 10 would be 40 % of a 24-trial search). The homework point counts as one. Optuna
    counts finished trials, so with K trials at once up to K - 1 more start before TPE."""
    return max(4, min(10, math.ceil(num_samples / 5)))


def make_sampler(spec: SearchSpec, kind: str = "tpe"):
    """Seeded TPE, multivariate (lr and batch size learned together) with a constant liar
    (parallel trials do not all sample one point), set explicitly; or seeded ``random``."""
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if kind != "tpe":
        raise ValueError(f"searcher must be one of {SEARCHERS}, got {kind!r}")
    with warnings.catch_warnings():
        # Optuna < 5 calls both options experimental, in two lines on every search's stderr
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=spec.seed,
            multivariate=True,
            constant_liar=True,
            n_startup_trials=startup_trials(spec.num_samples),
        )


# ---------------------------------------------------------------- the spec: flags, saved
SPEC_FLAGS = "num_samples max_epochs grace_period seed split_seed time_budget_s pick".split()


def spec_from_args(args: Any, model: ModelSpec) -> SearchSpec:
    """The search-space YAML with the search flags applied."""
    if args.search_space in (None, "smoke"):  # shipped: found in an installed package too
        path = default_space(model.name, smoke=args.search_space == "smoke")
    else:
        path = Path(args.search_space)
    spec = load_search_spec(path)
    if spec.model != model.name:
        raise UserError(f"--search-space {path} is for model {spec.model!r}, not {model.name!r}")
    return spec.replace(**{k: getattr(args, k) for k in SPEC_FLAGS if getattr(args, k) is not None})


def save_spec(
    spec: SearchSpec,
    val_fraction: float,
    base: RunConfig,
    data_dir: Path,
    max_concurrent: int,
    path: Path,
) -> None:
    """For --resume: the search as asked (before resources are fitted to the cluster), the
    trials' base config, the data dir and the trials-at-once limit it was started with."""
    atomic_write_json(
        path,
        {
            "spec": dataclasses.asdict(spec),
            "val_fraction": val_fraction,
            "base": base.to_dict(),  # every trial's config but the searched keys
            "data_dir": str(Path(data_dir).resolve()),
            "max_concurrent": max_concurrent,  # Ray restores its limiter with this limit
        },
    )


def check_resumed_run(args: Any, base: RunConfig, data_dir: Path, path: Path) -> int | None:
    """--resume trains the remaining trials as the first ones were trained: a flag that changes
    their config (weights, step cap, ...), their data or the trials at once is refused. Returns
    the trials-at-once limit the search was started with (a search_spec.json from before
    tune_pets saved it, the config and the data: --max-concurrent; nothing is checked)."""
    saved = read_json(path, "search spec") if path.is_file() else {}
    started = saved.get("max_concurrent", args.max_concurrent)
    if args.max_concurrent not in (None, started):  # Ray restores the limit it started with
        raise UserError(
            f"--max-concurrent {args.max_concurrent}: search {path.parent.name!r} runs "
            f"{started} trial(s) at once, as it was started; resume without --max-concurrent, "
            "or start it anew with --overwrite"
        )
    now = base.to_dict()
    was = saved.get("base") if isinstance(saved.get("base"), dict) else now
    # No split_seed is the seed: --split-seed 0 on a search started with seed 0 is no change.
    now["split_seed"], was = base.val_split_seed, dict(was)
    was["split_seed"] = was.get("seed") if was.get("split_seed") is None else was["split_seed"]
    if diff := [k for k in now if now[k] != was.get(k)]:
        raise UserError(
            f"--resume: {diff[0]} would be {now[diff[0]]!r}, but search {path.parent.name!r} "
            f"was started with {was.get(diff[0])!r}; resume with the flags it was started "
            "with, or start it anew with --overwrite"
        )
    if saved.get("data_dir", str(data_dir.resolve())) != str(data_dir.resolve()):
        raise UserError(
            f"--data-dir {args.data_dir}: search {path.parent.name!r} was started on "
            f"{saved['data_dir']}; resume with that data, or start it anew with --overwrite"
        )
    return started


def resumed_base(saved: dict, start: RunConfig, path: Path) -> RunConfig:
    """The config a resumed search was started with (its flags included; ``saved``: its
    search_spec.json at ``path``), for the resume's own flags to override: a search started with
    --max-steps-per-epoch 1 and resumed with no flags was refused as a change to the YAML's
    value ("needs none of the flags"). ``start`` where none was saved (a new search)."""
    if not isinstance(saved.get("base"), dict):  # new, or from before the base was saved
        return start
    return RunConfig.from_dict(saved["base"], f"{path}: base")


def resumed_spec(args: Any, spec: SearchSpec, path: Path) -> tuple[SearchSpec, float]:
    """With --resume, the search as it was started, and its val fraction: it goes on with what
    Ray restores; a search flag that asks for something else is refused, not half-applied."""
    if not args.resume or not path.is_file():  # new, or from before search_spec.json: the flags
        return spec, args.val_fraction or cli.DEFAULT_VAL_FRACTION
    saved = read_json(path, "search spec")
    try:
        space = {k: tuple(v) for k, v in saved["spec"]["space"].items()}
        was = SearchSpec(**{**saved["spec"], "space": space})
        val_fraction = float(saved["val_fraction"])
    except (KeyError, TypeError, AttributeError, ValueError):
        raise UserError(f"{path}: not a search spec written by tune_pets; delete it") from None
    for key in (*SPEC_FLAGS, "val_fraction"):
        value = getattr(args, key)
        old = val_fraction if key == "val_fraction" else _used(was, key)
        if value is not None and value != old:
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"{flag} {value}: search {path.parent.name!r} was started with {old}; resume "
                f"without {flag}, or start it anew with --overwrite"
            )
    # Every field, the flags' too: a YAML that raised num_samples was resumed with the old one.
    shape = [f.name for f in dataclasses.fields(SearchSpec) if f.name != "source"]
    if args.search_space and (diff := [k for k in shape if _used(spec, k) != _used(was, k)]):
        raise UserError(
            f"--search-space {args.search_space}: {diff[0]} differs from the search "
            f"{path.parent.name!r} was started with ({_used(spec, diff[0])!r}, not "
            f"{_used(was, diff[0])!r}); resume without it, or start anew with --overwrite"
        )
    return was, val_fraction


def _used(spec: SearchSpec, key: str) -> Any:
    """``spec``'s value of ``key`` as the search uses it: no split_seed is the seed."""
    value = getattr(spec, key)
    return spec.seed if key == "split_seed" and value is None else value


def add_session(spec_file: Path, search_s: float, prep_s: float) -> tuple[float, float, int]:
    """Add this session's search and data times to the search's totals in ``spec_file``
    (search_spec.json); the totals and the number of sessions."""
    saved = read_json(spec_file, "search spec") if spec_file.is_file() else {}
    was = saved.get("sessions", {"search_s": 0.0, "prep_s": 0.0, "n": 0})
    now = {"search_s": was["search_s"] + search_s, "prep_s": was["prep_s"] + prep_s}
    now["n"] = was["n"] + 1
    if saved:
        with contextlib.suppress(OSError):  # a full disk: the totals lack this session
            atomic_write_json(spec_file, {**saved, "sessions": now})
    return now["search_s"], now["prep_s"], now["n"]
