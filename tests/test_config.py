"""RunConfig (fields, validation, split_seed) and search-space YAML loading (tune_pets.spaces)
with its error messages. The models' homework defaults live in the registry: test_models.py."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from tune_pets.config import RunConfig, validate_config
from tune_pets.models import get_spec, model_names
from tune_pets.spaces import SearchSpec, default_space, load_search_spec
from tune_pets.utils import UserError


# ---------------------------------------------------------------- RunConfig
def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().lr = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    "key, value",
    [
        ("epochs", 0),
        ("epochs", 2.5),
        ("epochs", "5"),
        ("epochs", True),
        ("batch_size", -1),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr", float("nan")),
        ("lr", "1e-3"),
        ("lr", 100.0),
        ("momentum", 1.5),
        ("dropout", 1.0),
        ("hflip", -0.1),
        ("aug_scale_min", 0.0),
        ("img_size", 8),
        ("depth", 0),
        ("optimizer", "rmsprop"),
        ("scheduler", "step"),
        ("pooling", "max"),
        ("metric", "test_acc"),
        ("model", ""),
        ("pretrained", "yes"),
        ("backbone", 3),
        ("seed", -1),
        ("seed", 2**32),  # numpy seeds must fit in 32 bits
        ("split_seed", -1),
        ("split_seed", 1.5),
        ("split_seed", "0"),
    ],
)
def test_validate_config_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(UserError) as e:
        validate_config(RunConfig().replace(**{key: value}), "my.json")
    msg = str(e.value)
    assert msg.startswith("my.json: ") and key in msg
    assert "\n" not in msg


def test_validate_config_names_the_flag_for_the_command_line():
    with pytest.raises(UserError, match=r"^command line: --label-smoothing="):
        validate_config(RunConfig(label_smoothing=1.5), "command line")


def test_validate_config_warmup_must_be_shorter_than_training():
    with pytest.raises(UserError, match="warmup_epochs"):
        validate_config(RunConfig(epochs=3, warmup_epochs=3))
    assert validate_config(RunConfig(epochs=3, warmup_epochs=2)).warmup_epochs == 2


def test_validate_config_normalizes_numbers():
    c = validate_config(RunConfig().replace(epochs=5.0, lr=1, weight_decay=0, split_seed=3.0))
    assert c.epochs == 5 and type(c.epochs) is int
    assert c.lr == 1.0 and type(c.lr) is float
    assert type(c.weight_decay) is float
    assert c.split_seed == 3 and type(c.split_seed) is int


def test_split_seed_defaults_to_the_seed_and_can_be_pinned():
    """Changing ``seed`` (a robustness check) must not move the validation split once
    ``split_seed`` is set; unset, the split follows ``seed`` as before."""
    assert RunConfig().split_seed is None
    assert RunConfig(seed=7).val_split_seed == 7
    assert RunConfig(seed=7, split_seed=0).val_split_seed == 0
    assert RunConfig(seed=0, split_seed=5).val_split_seed == 5
    assert validate_config(RunConfig(split_seed=None)).split_seed is None


def test_from_dict_round_trip():
    c = get_spec("vit").defaults.replace(
        lr=3e-4, pooling="both", feature_views=2, seed=7, split_seed=1
    )
    assert RunConfig.from_dict(c.to_dict()) == c
    assert RunConfig.from_dict({}) == RunConfig()


def test_from_dict_reads_config_files_of_earlier_versions():
    """Before the registry the probe was called vit_probe, and there was no split_seed."""
    old = {k: v for k, v in get_spec("vit").defaults.to_dict().items() if k != "split_seed"}
    old["model"] = "vit_probe"
    c = RunConfig.from_dict(old)
    assert c.model == "vit" and c.split_seed is None
    assert c == get_spec("vit").defaults


def test_from_dict_unknown_key_names_it_and_the_source():
    with pytest.raises(UserError, match=r"^ckpt\.json: unknown config key\(s\) lr_max, zzz"):
        RunConfig.from_dict({"lr": 0.1, "lr_max": 1, "zzz": 2}, "ckpt.json")


@pytest.mark.parametrize("d", [[1, 2], None, "cnn"])
def test_from_dict_refuses_a_config_that_is_not_a_mapping(d):
    with pytest.raises(UserError, match=r"best\.json: the config is a \w+, not a JSON object"):
        RunConfig.from_dict(d, "best.json")


def test_from_dict_validates():
    with pytest.raises(UserError, match="lr"):
        RunConfig.from_dict({"lr": -1.0})


# ---------------------------------------------------------------- search-space YAML
VALID_SPEC = """\
model: cnn
metric: val_macro_f1
mode: max
num_samples: 8
max_epochs: 12
grace_period: 2
reduction_factor: 3
max_concurrent: 2
seed: 1
split_seed: 4
time_budget_s: 600
resources: {cpu: 2, gpu: 0}
fixed:
  img_size: 64
  weight_decay: 5e-4
space:
  lr: {loguniform: [1e-4, 1e-2]}
  batch_size: {choice: [16, 32, 64]}
  optimizer: {choice: [adamw, sgd]}
  dropout: {uniform: [0.0, 0.5]}
  depth: {randint: [2, 5]}
  width: {quniform: [16, 64, 16]}
"""


def write(tmp_path, text: str, name: str = "space.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_load_valid_spec(tmp_path):
    path = write(tmp_path, VALID_SPEC)
    spec = load_search_spec(path)
    assert isinstance(spec, SearchSpec)
    assert spec.model == "cnn" and spec.metric == "val_macro_f1" and spec.mode == "max"
    assert (spec.num_samples, spec.max_epochs, spec.grace_period, spec.seed) == (8, 12, 2, 1)
    assert spec.split_seed == 4
    assert spec.resources == {"cpu": 2, "gpu": 0}
    assert spec.time_budget_s == 600
    assert spec.source == str(path)
    # PyYAML (YAML 1.1) reads `1e-4` as the string "1e-4": it must come back as a number.
    sampler, (lo, hi) = spec.space["lr"]
    assert sampler == "loguniform"
    assert isinstance(lo, float) and isinstance(hi, float)
    assert (lo, hi) == (1e-4, 1e-2)
    assert spec.fixed == {"img_size": 64, "weight_decay": 5e-4}
    assert isinstance(spec.fixed["weight_decay"], float)
    assert spec.space["batch_size"] == ("choice", [16, 32, 64])
    assert spec.space["optimizer"] == ("choice", ["adamw", "sgd"])
    assert spec.space["depth"] == ("randint", [2, 5])
    assert spec.space["width"] == ("quniform", [16, 64, 16])


def test_spec_defaults_auto_resources_and_split_seed_from_seed(tmp_path):
    lr = "space: {lr: {loguniform: [1.0e-4, 1.0e-2]}}\n"
    spec = load_search_spec(write(tmp_path, f"model: cnn\nseed: 3\nresources: auto\n{lr}"))
    assert spec.resources == "auto" and spec.seed == 3 and spec.split_seed is None
    spec = load_search_spec(write(tmp_path, f"model: cnn\nsplit_seed: null\n{lr}"))
    assert spec.split_seed is None


@pytest.mark.parametrize("name", ["vit", "vit_probe"])
def test_load_vit_spec_uses_the_registry_name(tmp_path, name):
    text = f"""\
        model: {name}
        space:
          pooling: {{choice: [cls, mean, both]}}
    """
    spec = load_search_spec(write(tmp_path, text))
    assert spec.model == "vit"
    assert spec.space["pooling"] == ("choice", ["cls", "mean", "both"])


def test_choice_values_written_yaml11_style_become_numbers(tmp_path):
    """`choice: [1e-4, 1e-3]` must give numbers to the trials, as loguniform bounds do."""
    text = """\
        model: cnn
        space:
          weight_decay: {choice: [1e-4, 1e-3, 0.0]}
    """
    spec = load_search_spec(write(tmp_path, text))
    _, values = spec.space["weight_decay"]
    assert values == [1e-4, 1e-3, 0.0]
    assert all(isinstance(v, float) for v in values), values


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("model", model_names())
def test_shipped_search_spaces_load(model, smoke):
    """Every registered model ships a search space (and a smoke one) that loads as is."""
    path = default_space(model, smoke)
    assert path.is_file(), f"no shipped search space for {model}: {path}"
    spec = load_search_spec(path)
    assert spec.model == model and spec.space
    assert spec.resources == "auto" or set(spec.resources) == {"cpu", "gpu"}


BAD_SPECS = [
    ("unknown top-level key", "model: cnn\nsamples: 3\n", ["samples"]),
    (
        "unknown sampler",
        "model: cnn\nspace:\n  lr: {lognormal: [1.0e-4, 1.0e-2]}\n",
        ["space.lr", "lognormal"],
    ),
    (
        "low >= high",
        "model: cnn\nspace:\n  dropout: {uniform: [0.5, 0.1]}\n",
        ["space.dropout", "low"],
    ),
    (
        "low == high",
        "model: cnn\nspace:\n  lr: {loguniform: [1.0e-3, 1.0e-3]}\n",
        ["space.lr", "low"],
    ),
    (
        "non-numeric bound",
        "model: cnn\nspace:\n  lr: {loguniform: [small, 1.0e-2]}\n",
        ["space.lr", "small"],
    ),
    (
        "space key not a config field",
        "model: cnn\nspace:\n  learning_rate: {uniform: [0, 1]}\n",
        ["space.learning_rate", "learning_rate"],
    ),
    (
        "seeds are not searchable",
        "model: cnn\nspace:\n  split_seed: {choice: [0, 1]}\n",
        ["space.split_seed", "not a searchable"],
    ),
    (
        "fixed key not a config field",
        "model: cnn\nfixed:\n  learning_rate: 0.1\n",
        ["fixed.learning_rate"],
    ),
    (
        "loguniform low <= 0",
        "model: cnn\nspace:\n  lr: {loguniform: [0.0, 1.0e-2]}\n",
        ["space.lr", "> 0"],
    ),
    (
        "both fixed and searched",
        "model: cnn\nfixed:\n  lr: 1.0e-3\nspace:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n",
        ["lr", "both fixed and searched"],
    ),
    (
        "sampler value out of the config's range",
        "model: cnn\nspace:\n  dropout: {uniform: [0.0, 1.5]}\n",
        ["space.dropout", "dropout"],
    ),
    (
        "bad choice value",
        "model: cnn\nspace:\n  optimizer: {choice: [adamw, rmsprop]}\n",
        ["space.optimizer", "rmsprop"],
    ),
    ("wrong arity", "model: cnn\nspace:\n  lr: {uniform: [0.1]}\n", ["space.lr", "2 numbers"]),
    ("not a sampler mapping", "model: cnn\nspace:\n  lr: 0.1\n", ["space.lr"]),
    ("bool bound", "model: cnn\nspace:\n  dropout: {uniform: [false, 0.5]}\n", ["space.dropout"]),
    (
        "randint with fractional bound",
        "model: cnn\nspace:\n  depth: {randint: [1, 3.5]}\n",
        ["space.depth", "integers"],
    ),
    (
        "continuous sampler on an integer field",  # TPE would sample depth 4.1: trials fail
        "model: cnn\nspace:\n  depth: {uniform: [3, 5]}\n",
        ["space.depth", "randint"],
    ),
    (
        "quniform on an integer field with a fractional step",
        "model: cnn\nspace:\n  depth: {quniform: [2, 6, 0.5]}\n",
        ["space.depth", "integers"],
    ),
    ("time budget not positive", "model: cnn\ntime_budget_s: -5\n", ["time_budget_s"]),
    ("bad metric", "model: cnn\nmetric: test_acc\n", ["metric", "test_acc"]),
    ("bad mode", "model: cnn\nmode: biggest\n", ["mode", "biggest"]),
    ("bad num_samples", "model: cnn\nnum_samples: 0\n", ["num_samples"]),
    ("bad split_seed", "model: cnn\nsplit_seed: -1\n", ["split_seed", "-1"]),
    ("bad resources", "model: cnn\nresources: {cpu: 1, tpu: 1}\n", ["resources"]),
    ("zero cpus", "model: cnn\nresources: {cpu: 0, gpu: 0}\n", ["resources.cpu"]),
    ("missing model", "space: {}\n", ["model"]),
    # Found in review: these crashed in Optuna (an empty space), were silently ignored (seed
    # under fixed) or picked the worst trials (a loss maximized).
    ("empty space", "model: cnn\nspace: {}\n", ["space is empty"]),
    ("no space", "model: cnn\nnum_samples: 2\n", ["space is empty"]),
    ("seed under fixed", "model: cnn\nfixed: {seed: 7}\n", ["fixed.seed", "top level"]),
    ("loss maximized", "model: cnn\nmetric: val_loss\nmode: max\n", ["worst", "mode: min"]),
    (
        "quniform step that does not divide the range",
        "model: cnn\nspace:\n  dropout: {quniform: [0.0, 0.5, 0.2]}\n",
        ["space.dropout", "must divide"],
    ),
    ("unknown model", "model: resnet\n", ["model", "resnet", "cnn, vit"]),
    ("not a mapping", "- model\n- cnn\n", ["mapping"]),
    # PyYAML keeps the last of two equal keys without a word: the first setting was lost.
    (
        "key given twice",
        "model: cnn\nmax_epochs: 3\nmax_epochs: 9\n",
        ["duplicate key 'max_epochs'", "line 3"],
    ),
    (
        "key given twice in a flow mapping",
        "model: cnn\nresources: {cpu: 1, cpu: 2}\n",
        ["duplicate key 'cpu'", "line 2"],
    ),
]


@pytest.mark.parametrize("section", ["fixed", "space"])
def test_an_unknown_key_lists_only_keys_the_file_may_set(tmp_path, section):
    value = "0.1" if section == "fixed" else "{uniform: [0, 1]}"
    with pytest.raises(UserError) as e:
        load_search_spec(write(tmp_path, f"model: cnn\n{section}:\n  learning_rate: {value}\n"))
    valid = str(e.value).split("valid: ")[1].split(", ")
    assert "lr" in valid and "dropout" in valid
    assert not {"epochs", "seed", "split_seed", "model", "metric"} & set(valid), valid


@pytest.mark.parametrize(
    "text, must_contain", [(t, m) for _, t, m in BAD_SPECS], ids=[i for i, _, _ in BAD_SPECS]
)
def test_bad_spec_error_names_file_and_key(tmp_path, text, must_contain):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_search_spec(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    assert "\n" not in msg
    for part in must_contain:
        assert part in msg, msg


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    text = """\
        model: cnn
        space:
          lr: {loguniform: [1.0e-4, 1.0e-2]}
          dropout: [uniform: 0.1
        metric: val_acc
    """
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_search_spec(path)
    msg = str(e.value)
    assert str(path) in msg and "YAML syntax error" in msg
    assert "line " in msg


def test_tab_indentation_error_points_at_its_line(tmp_path):
    path = write(tmp_path, "model: cnn\nspace:\n\tlr: {uniform: [0.1, 0.2]}\n")
    with pytest.raises(UserError, match=r"line 3"):
        load_search_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_search_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "fixed", ["lr: -1.0", "batch_size: 0", "optimizer: rmsprop", "dropout: 2.0"]
)
def test_invalid_fixed_value_is_rejected_without_a_space(tmp_path, fixed):
    """Fixed values go into every trial's config: a bad one must fail at load time, not in the
    middle of a search, even when the file searches nothing (and not with "space is empty")."""
    path = write(tmp_path, f"model: cnn\nfixed:\n  {fixed}\n")
    key = fixed.split(":")[0]
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: fixed: {key}\b"):
        load_search_spec(path)


def test_space_choice_is_checked_with_max_epochs_as_the_epochs(tmp_path):
    """warmup_epochs 5 is valid alone, not in a trial of max_epochs 5 epochs."""
    text = """\
        model: cnn
        max_epochs: 5
        space:
          warmup_epochs: {choice: [0, 5]}
    """
    path = write(tmp_path, text)
    with pytest.raises(UserError, match="warmup_epochs"):
        load_search_spec(path)


@pytest.mark.parametrize(
    "model, body, words",
    [
        ("cnn", "space: {epochs: {randint: [1, 2]}}", ["space.epochs", "max_epochs instead"]),
        ("cnn", "fixed: {epochs: 4}", ["fixed.epochs", "max_epochs instead"]),
        ("vit", "space: {img_size: {choice: [32, 96]}}", ["space.img_size", "own input size"]),
        ("vit", "fixed: {img_size: 96}", ["fixed.img_size", "own input size"]),
        ("vit", "space: {feature_views: {choice: [0, 2]}}", ["space.feature_views", "fixed"]),
        ("vit", "space: {aug_scale_min: {uniform: [0.1, 0.5]}}", ["space.aug_scale_min", "once"]),
        ("vit", "space: {pretrained: {choice: [true, false]}}", ["space.pretrained", "once"]),
        ("cnn", "resources: {cpu: .nan}", ["resources.cpu must be > 0"]),
        ("cnn", "resources: {cpu: 1, gpu: .nan}", ["resources.gpu >= 0"]),
    ],
)
def test_keys_a_trial_would_ignore_are_refused(tmp_path, model, body, words):
    """A searched epochs ran max_epochs anyway (and every trial read as stopped early), a vit
    img_size changed nothing, nor did a searched key the features are made from (every trial
    trained on the base config's features), a NaN resource made a search that waited forever."""
    path = write(tmp_path, f"model: {model}\n{body}\n")
    with pytest.raises(UserError) as e:
        load_search_spec(path)
    assert str(path) in str(e.value) and all(w in str(e.value) for w in words), e.value


@pytest.mark.parametrize("cmd", ["train", "search", "reproduce", "profiling", "evaluate"])
@pytest.mark.parametrize("flag", [["--no-pretrained"], ["--weights", __file__]])
def test_backbone_flags_are_refused_for_a_model_without_a_backbone(cmd, flag, tmp_path):
    import importlib

    main = importlib.import_module(f"tune_pets.{cmd}").main
    extra = ["--checkpoint", str(tmp_path / "none.pt")] if cmd == "evaluate" else []
    with pytest.raises(UserError, match=rf"^{flag[0]}: cnn has no pretrained backbone"):
        main(["cnn", *flag, *extra, "--artifacts-dir", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- search-space defaults and bounds
LR_SPACE = "space:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n"


def _space_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_a_loss_metric_without_mode_is_minimized(tmp_path):
    """Mode defaults to the metric's own direction (val_loss: min), not to max."""
    from tune_pets.spaces import load_search_spec

    spec = load_search_spec(_space_file(tmp_path, f"model: cnn\nmetric: val_loss\n{LR_SPACE}"))
    assert spec.mode == "min"


def test_reduction_factor_below_two_is_refused(tmp_path):
    """ASHA needs a reduction factor > 1; 1 is refused when the file is read."""
    from tune_pets.spaces import load_search_spec

    with pytest.raises(UserError, match="reduction_factor"):
        load_search_spec(_space_file(tmp_path, f"model: cnn\nreduction_factor: 1\n{LR_SPACE}"))
