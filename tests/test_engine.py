"""The training engine (tune_pets.engine): the data a run trains on, the optimizer and LR
schedule, divergence detection, and the promise that ``fit``, the overfit check and
``profiling`` all run the same step. Also the package's import graph: no cycles.

    python -m pytest tests/test_engine.py -q      # about 15-20 s on 2 shared cores
"""

from __future__ import annotations

import ast
import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

import tune_pets
from tune_pets import profiling, train
from tune_pets.engine import (
    Engine,
    FitData,
    NonFiniteLossError,
    load_fit_data,
    lr_factor,
    make_optimizer,
    steps_per_epoch,
)
from tune_pets.models import get_spec

CNN = get_spec("cnn").defaults.replace(img_size=32, epochs=2, batch_size=8, width=16)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.fixture(scope="module")
def cnn_data(tiny_data, tmp_path_factory) -> FitData:
    work = tmp_path_factory.mktemp("engine_cnn_data")
    return load_fit_data(
        CNN, tiny_data, split_file=work / "val_split.json", cache_dir=work / "cache", progress=False
    )


# ---------------------------------------------------------------- what a run trains on
def test_load_fit_data_cnn(cnn_data):
    assert cnn_data.kind == "images" and cnn_data.num_classes == 4 and cnn_data.feature_dim == 0
    assert cnn_data.train_x.shape == (32, 36, 36, 3) and cnn_data.val_x.shape == (8, 36, 36, 3)
    assert cnn_data.info["n_train"] == 32 and cnn_data.info["n_val"] == 8
    assert cnn_data.preprocess["crop_pct"] == 0.875 and cnn_data.has_val


def test_split_seed_fixes_the_val_split_while_the_seed_varies(tiny_data, tmp_path):
    def val_files(config, name: str) -> list[str]:
        data = load_fit_data(
            config,
            tiny_data,
            split_file=tmp_path / name,
            cache_dir=tmp_path / "cache",
            progress=False,
        )
        assert data.info["split_seed"] == config.val_split_seed
        return json.loads((tmp_path / name).read_text(encoding="utf-8"))["val"]

    base = val_files(CNN.replace(seed=0), "seed0.json")
    assert val_files(CNN.replace(seed=5, split_seed=0), "seed5_split0.json") == base
    assert val_files(CNN.replace(seed=5), "seed5.json") != base  # unset: follows the seed


def test_full_train_has_no_val_split(tiny_data, tmp_path):
    data = load_fit_data(CNN, tiny_data, full_train=True, cache_dir=tmp_path, progress=False)
    assert len(data.train_y) == 40 and not data.has_val and "split_file" not in data.info
    with pytest.raises(ValueError, match="split_file"):
        load_fit_data(CNN, tiny_data, cache_dir=tmp_path, progress=False)


# ---------------------------------------------------------------- optimizer and schedule
@pytest.mark.parametrize(
    "n, batch, cap, steps",
    [(32, 8, 0, 4), (35, 8, 0, 4), (5, 8, 0, 1), (32, 8, 3, 3), (32, 8, 9, 4)],
)
def test_steps_per_epoch(n, batch, cap, steps):
    """Full batches only (the homework's drop_last), one short batch for tiny data, capped by
    max_steps_per_epoch."""
    assert steps_per_epoch(CNN.replace(batch_size=batch, max_steps_per_epoch=cap), n) == steps


def test_a_features_model_trains_on_one_view_per_epoch_in_turn():
    """The probe's feature cache holds V augmented views: epoch e trains on view (e-1) mod V."""
    from tune_pets.engine import Batches

    views = np.stack([np.full((4, 2, 5), v, np.float32) for v in range(3)])  # [V, N, 2, D]
    data = FitData("features", ["a", "b"], views, np.array([0, 1, 0, 1]))
    batches = Batches(get_spec("vit").defaults.replace(batch_size=4), data, torch.device("cpu"))
    seen = [float(next(batches.train(epoch))[0].mean()) for epoch in (1, 2, 3, 4)]
    assert seen == [0.0, 1.0, 2.0, 0.0]


def test_make_optimizer_uses_the_config_and_skips_frozen_params():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[0].requires_grad_(False)
    cfg = CNN.replace(lr=0.05, weight_decay=0.1, momentum=0.8)
    adamw = make_optimizer(cfg.replace(optimizer="adamw"), net.parameters())
    assert type(adamw) is torch.optim.AdamW
    (group,) = adamw.param_groups
    assert (group["lr"], group["weight_decay"]) == (0.05, 0.1)
    assert [p.shape for p in group["params"]] == [(2, 4), (2,)]
    assert type(make_optimizer(cfg.replace(optimizer="adam"), net.parameters())) is torch.optim.Adam
    sgd = make_optimizer(cfg.replace(optimizer="sgd"), net.parameters())
    assert type(sgd) is torch.optim.SGD
    assert (sgd.param_groups[0]["momentum"], sgd.param_groups[0]["nesterov"]) == (0.8, True)
    plain = make_optimizer(cfg.replace(optimizer="sgd", momentum=0.0), net.parameters())
    assert plain.param_groups[0]["nesterov"] is False  # nesterov needs momentum


def test_lr_factor_warmup_then_cosine():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, "cosine") for s in range(total + 1)]
    assert f[0] == pytest.approx(0.1)
    assert f[:warm] == pytest.approx([(s + 1) / warm for s in range(warm)])
    assert f[warm] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5)
    assert f[total] == pytest.approx(0.0, abs=1e-12)
    # After the warmup it decays monotonically.
    assert all(a >= b for a, b in zip(f[warm:-1], f[warm + 1 :], strict=True))
    assert all(0 <= v <= 1 for v in f)
    assert [lr_factor(s, total, 0, "none") for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert lr_factor(3, total, warm, "none") == pytest.approx(0.4)
    assert lr_factor(0, total, 0, "cosine") == 1.0


def test_an_epochs_lr_is_the_mean_rate_of_its_steps(cnn_data):
    """It was the rate after the epoch's last step: warmup did not show, the last epoch read 0."""
    config = CNN.replace(epochs=3, warmup_epochs=1, scheduler="cosine", lr=0.003)
    engine = Engine(config, cnn_data)
    n, total = engine.steps_per_epoch, engine.steps_per_epoch * 3
    for epoch in range(1, 4):
        rates = [
            config.lr * lr_factor(s, total, n, "cosine") for s in range((epoch - 1) * n, epoch * n)
        ]
        assert engine.run_epoch(epoch)["lr"] == pytest.approx(sum(rates) / n)
    assert rates[-1] > 0


def test_val_loss_is_the_plain_cross_entropy_whatever_the_smoothing(cnn_data):
    """With label smoothing the training loss has a floor (0.67 at 0.1 for 37 classes): val_loss
    stays the plain cross-entropy, so a search on val_loss does not rank trials by smoothing."""
    engine = Engine(CNN.replace(label_smoothing=0.2), cnn_data)
    engine.run_epoch(1)
    engine.model.eval()
    with torch.no_grad():
        x, y = next(iter(engine.batches.eval(cnn_data.val_x, cnn_data.val_y)))
        logits = engine.model(x)
    plain = torch.nn.functional.cross_entropy(logits, y).item()
    smoothed = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.2).item()
    assert abs(plain - smoothed) > 1e-3  # the two differ on these logits
    assert engine.validate()["val_loss"] == pytest.approx(plain, rel=1e-5)


def test_a_checkpoint_records_the_input_size_its_run_trained_at(cnn_data):
    """A search trial's data is made for the base config: the checkpoint must still say the
    trial's own img_size (it said the base's)."""
    assert cnn_data.preprocess["img_size"] == 32
    result = train.fit(CNN.replace(img_size=24, epochs=1, max_steps_per_epoch=1), cnn_data)
    assert result.checkpoint["preprocess"]["img_size"] == 24


# ---------------------------------------------------------------- one step for every caller
def _conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def _hyperparameters(opt: torch.optim.Optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


@pytest.mark.parametrize("device", DEVICES)
def test_profiling_times_the_step_fit_runs(cnn_data, monkeypatch, tmp_path, device):
    """``run_profile`` and ``fit`` must train the same way: same optimizer and hyperparameters,
    same LR after k steps, same memory format, same loss, and from the same seed the same
    weights after k steps (so profiled numbers describe a real trial)."""
    device = torch.device(device)
    # run_profile(steps=1): the profiler's wait + warmup + 1 recorded, then warmup + 1 timed
    k = profiling.PROFILE_WAIT + profiling.PROFILE_WARMUP + 1 + profiling.TIMED_WARMUP + 1
    # 3 epochs of k steps (32 images: batch 4 has enough), cosine: after k steps the LR is
    # lr * (1 + cos(pi/3)) / 2 = 0.75 lr.
    cfg = CNN.replace(batch_size=4, epochs=3, max_steps_per_epoch=k, label_smoothing=0.1)
    cfg = cfg.replace(deterministic=True)

    built: list[Engine] = []

    class RecordingEngine(Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    class StopAfterFirstEpoch(Exception):
        pass

    def stop(metrics: dict, ckpt: dict | None) -> None:
        raise StopAfterFirstEpoch

    monkeypatch.setattr(train, "Engine", RecordingEngine)
    monkeypatch.setattr(profiling, "Engine", RecordingEngine)
    with pytest.raises(StopAfterFirstEpoch):
        train.fit(cfg, cnn_data, stop, device=device)
    (fitted,) = built
    assert fitted.scheduler.last_epoch == k, "fit's first epoch should be k steps"

    profiling.run_profile(cfg, cnn_data, 1, tmp_path, device)  # after fit: seeds are its own
    fitted, profiled = built
    assert profiled.scheduler.last_epoch == k

    assert type(profiled.optimizer) is type(fitted.optimizer) is torch.optim.AdamW
    assert _hyperparameters(profiled.optimizer) == _hyperparameters(fitted.optimizer)
    assert profiled.lr == fitted.lr == pytest.approx(0.75 * cfg.lr)
    assert type(profiled.loss_fn) is type(fitted.loss_fn) is torch.nn.CrossEntropyLoss
    assert profiled.loss_fn.label_smoothing == fitted.loss_fn.label_smoothing == 0.1
    assert profiled.precision == fitted.precision
    convs_p, convs_f = _conv_weights(profiled.model), _conv_weights(fitted.model)
    assert convs_p and [w.stride() for w in convs_p] == [w.stride() for w in convs_f]
    channels_last = [w.is_contiguous(memory_format=torch.channels_last) for w in convs_f]
    assert all(channels_last) == (device.type == "cuda") and len(set(channels_last)) == 1
    a, b = profiled.model.state_dict(), fitted.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_overfit_check_cnn(cnn_data):
    passed, steps, acc = train.overfit_check(CNN, cnn_data, n_batches=1)
    assert passed and acc == 1.0 and steps < 300


# ---------------------------------------------------------------- divergence
# SGD with lr 10 and weight decay 10 (tests/test_search.py's DIVERGING_SPACE): the loss grows
# ~1e4x per step and is NaN after about 8 steps.
DIVERGING = CNN.replace(
    width=8, depth=2, optimizer="sgd", lr=10.0, weight_decay=10.0, scheduler="none", epochs=5
)


@pytest.mark.parametrize("batch_size", [2, 8])
def test_run_epoch_detects_divergence_once_at_the_end_of_the_epoch(cnn_data, batch_size):
    """The loss stays on the device during an epoch (no per-step ``.item()``): a loss that
    turns NaN mid-epoch is noticed when the epoch ends, and the error names that epoch."""
    engine = Engine(DIVERGING.replace(batch_size=batch_size), cnn_data)
    losses: list[float] = []
    step = engine.step

    def recording_step(x, y):
        loss, logits = step(x, y)
        losses.append(float(loss))  # the test's own sync, not the engine's
        return loss, logits

    engine.step = recording_step
    with pytest.raises(NonFiniteLossError) as e:
        for epoch in range(1, DIVERGING.epochs + 1):
            assert np.isfinite(engine.run_epoch(epoch)["train_loss"])
    first_bad = next(i for i, v in enumerate(losses) if not np.isfinite(v))
    spe = engine.steps_per_epoch
    failed_epoch = first_bad // spe + 1
    assert len(losses) == failed_epoch * spe, "the epoch ran to its end before the check"
    assert f"in epoch {failed_epoch} " in str(e.value) and "lr=10" in str(e.value)
    if batch_size == 2:  # 16 steps an epoch: the NaN must come mid-epoch for this to show much
        assert first_bad < spe - 1, f"precondition: NaN at step {first_bad + 1} of {spe}"


# ---------------------------------------------------------------- the import graph
def _import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` for the modules of ``package`` under ``root``,
    from every import statement in each file (inside functions too; ``if TYPE_CHECKING:``
    blocks never run and are skipped)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        edges: dict[str, int] = {}
        stack = list(ast.parse(path.read_text(encoding="utf-8"), str(path)).body)
        while stack:
            node = stack.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                stack.extend(node.orelse)
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name if is_pkg else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}".rstrip(".")
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t == package or t.startswith(package + "."):
                    target = resolve(t)
                    if target and target != name:
                        edges.setdefault(target, node.lineno)
            stack.extend(ast.iter_child_nodes(node))
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as the
    modules along the shortest cycle through its first module, that module repeated at the end."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: list[str] = []
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        on_stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while not comp or v not in comp:
                comp.add(on_stack.pop())
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for members in components:
        start = min(members)
        parent: dict[str, str] = {}
        queue = deque([start])
        while queue:  # breadth first from start until an edge leads back to it
            v = queue.popleft()
            if start in graph[v]:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                cycles.append([*reversed(path), start])
                break
            for w in sorted(graph[v]):
                if w in members and w != start and w not in parent:
                    parent[w] = v
                    queue.append(w)
    return cycles


def test_import_graph_walker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from .c import thing\n")
    (pkg / "c.py").write_text("import pkg.a as a\nthing = 1\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    graph = _import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.b": 4} and graph["pkg.b"] == {"pkg.c": 1}
    assert graph["pkg.d"] == {}
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_no_import_cycles_in_tune_pets():
    """Dependencies point one way (config/utils <- data, models <- engine <- train <- search,
    reproduce). An import inside a function counts: it hides a cycle, it does not remove it."""
    root = Path(tune_pets.__file__).resolve().parent
    graph = _import_graph(root, "tune_pets")
    assert {"tune_pets.engine", "tune_pets.train", "tune_pets.models"} <= set(graph)
    cycles = _cycles(graph)

    def where(a: str, b: str) -> str:
        return f"{a.rpartition('.')[2]}.py:{graph[a][b]}"

    described = [
        " -> ".join(c) + " (" + ", ".join(where(a, b) for a, b in zip(c, c[1:], strict=False)) + ")"
        for c in cycles
    ]
    assert not cycles, "import cycle(s) in tune_pets: " + "; ".join(described)


def _feature_rows(n: int, dim: int, seed: int = 0):
    x = np.random.default_rng(seed).normal(size=(1, n, 2, dim)).astype(np.float32)
    return x, np.arange(n) % 2


def test_overfit_check_fails_below_full_memorization():
    """One image twice, with two labels: at most 19 of 20 can be right, so the check fails
    (it passed at 90%)."""
    from tune_pets.engine import FitData
    from tune_pets.models import get_spec
    from tune_pets.train import overfit_check

    x, y = _feature_rows(20, 32)
    x[0, 1] = x[0, 0]  # the same features, labels 0 and 1
    data = FitData("features", ["a", "b"], x, y)
    cfg = get_spec("vit").defaults.replace(batch_size=20, lr=0.1)
    passed, steps, acc = overfit_check(cfg, data, n_batches=1)
    assert not passed and acc < 1.0 and steps == 300
