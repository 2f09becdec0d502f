"""Backbone weights are checked, not trusted: --weights files and hub weights must cover every
backbone tensor by name and shape; the real ``timm.create_model(pretrained=True)`` path runs
offline on a hub cache written here; offline without weights fails fast with one line.

    python -m pytest tests/test_weights.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tune_pets import hub
from tune_pets import prepare as prep
from tune_pets.backbone import backbone_tag, build_backbone, token_features
from tune_pets.config import RunConfig
from tune_pets.utils import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "vit_tiny_patch16_224"
HUB_REPO = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm's default weights for it
REVISION = "0123456789abcdef0123456789abcdef01234567"  # any commit hash: the cache maps main to it


# ---------------------------------------------------------------- helpers and fixtures
def _model(name: str = BACKBONE, seed: int = 123, **kwargs) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, **kwargs)


def _write_hub_cache(cache: Path, state: dict, repo: str = HUB_REPO) -> Path:
    """huggingface_hub's cache layout: the file as a blob named by its hash, linked from
    ``snapshots/<revision>/``, and ``refs/main`` naming that revision."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    tmp = cache / "model.safetensors.tmp"
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    blob = repo_dir / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest()
    blob.parent.mkdir(parents=True)
    tmp.replace(blob)
    snapshot = repo_dir / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    return snapshot / "model.safetensors"


@pytest.fixture(scope="module")
def hub_weights() -> dict:
    """The "pretrained" weights the hub cache holds: a seeded random ViT-Tiny with its 1000-class
    head, as the real hub file has one."""
    return _model().state_dict()


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, hub_weights) -> Path:
    cache = tmp_path_factory.mktemp("hf_hub_cache")
    _write_hub_cache(cache, hub_weights)
    return cache


@pytest.fixture
def use_hub(monkeypatch):
    """``use_hub(cache, offline)``: point huggingface_hub at ``cache``, offline mode on or off.

    The environment is set for child processes; huggingface_hub's constants, which it reads
    from the environment once at import, are set for this process."""
    from huggingface_hub import constants

    def use(cache: Path, offline: bool) -> dict:
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(key, raising=False)
        if offline:
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        return dict(os.environ)

    return use


def _backbone_keys(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def _assert_same(model: torch.nn.Module, state: dict) -> None:
    got = model.state_dict()
    assert got.keys() == _backbone_keys(state).keys()
    for k in got:
        assert torch.equal(got[k], state[k]), k


def _features(model: torch.nn.Module) -> torch.Tensor:
    x = torch.linspace(-1, 1, 3 * 224 * 224).reshape(1, 3, 224, 224)
    with torch.no_grad():
        return token_features(model.eval(), x)


def _reference_features(state: dict) -> torch.Tensor:
    ref = _model(num_classes=0, seed=999)
    ref.load_state_dict(_backbone_keys(state))
    return _features(ref)


# ---------------------------------------------------------------- the hub path, offline
def test_timm_default_weights_are_the_repo_the_cache_is_written_for():
    """If timm changes its default tag, the hub-cache tests below must be updated, not pass."""
    from timm.models import get_pretrained_cfg

    assert get_pretrained_cfg(BACKBONE).hf_hub_id == HUB_REPO


def test_pretrained_backbone_from_hub_cache_offline(hub_cache, hub_weights, use_hub):
    use_hub(hub_cache, offline=True)
    rng = torch.get_rng_state()
    model = build_backbone(RunConfig(backbone=BACKBONE, pretrained=True))
    assert torch.equal(torch.get_rng_state(), rng), "building the backbone consumed global RNG"
    _assert_same(model, hub_weights)
    assert torch.equal(_features(model), _reference_features(hub_weights))


def test_feature_cache_key_follows_the_hub_weights(tmp_path, hub_cache, hub_weights, use_hub):
    """Features are cached by weights: other weights in the hub cache must not reuse them."""
    config = RunConfig(backbone=BACKBONE, pretrained=True)
    use_hub(hub_cache, offline=True)
    first = backbone_tag(config)
    assert first.startswith(f"{BACKBONE}-pretrained-"), first
    other = tmp_path / "other_hub"
    _write_hub_cache(other, _model(seed=7).state_dict())
    use_hub(other, offline=True)
    assert backbone_tag(config) not in (first, f"{BACKBONE}-pretrained")
    use_hub(hub_cache, offline=True)
    assert backbone_tag(config) == first
    use_hub(tmp_path / "empty_hub", offline=True)  # not downloaded yet
    assert backbone_tag(config) == f"{BACKBONE}-pretrained"


def test_feature_cache_key_follows_a_hub_cache_copied_without_links(tmp_path, use_hub):
    """``cp -rL``/``scp -r`` turn the snapshot's link into a plain model.safetensors: its name
    says nothing of its content, and other weights there once reused the old features."""
    config = RunConfig(backbone=BACKBONE, pretrained=True)
    cache = tmp_path / "copied_hub"
    snapshot_file = _write_hub_cache(cache, _model(seed=1).state_dict())
    content = snapshot_file.read_bytes()
    snapshot_file.unlink()
    snapshot_file.write_bytes(content)  # a plain file, where the hub keeps a link
    use_hub(cache, offline=True)
    first = backbone_tag(config)
    assert first.startswith(f"{BACKBONE}-pretrained-file"), first
    save_file({k: v.contiguous() for k, v in _model(seed=2).state_dict().items()},
              str(snapshot_file))  # fmt: skip
    assert backbone_tag(config) != first


def test_feature_cache_key_follows_a_weights_files_content(tmp_path, hub_weights):
    """Other weights copied over a --weights file with its size and mtime kept (rsync -a,
    cp -p) reused the old features; the same bytes elsewhere are the same key."""
    path, moved = tmp_path / "w.safetensors", tmp_path / "moved.safetensors"
    save_file(hub_weights, str(path))
    first = backbone_tag(RunConfig(backbone=BACKBONE, weights=str(path)))
    moved.write_bytes(path.read_bytes())
    assert backbone_tag(RunConfig(backbone=BACKBONE, weights=str(moved))) == first
    stat = path.stat()
    save_file({k: v.contiguous() for k, v in _model(seed=2).state_dict().items()}, str(path))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    from tune_pets import backbone

    backbone._content_digest.cache_clear()  # what the next command (a new process) sees
    assert backbone_tag(RunConfig(backbone=BACKBONE, weights=str(path))) != first


def test_cached_weights_need_no_network(hub_cache, hub_weights, use_hub, monkeypatch):
    """HF_HUB_OFFLINE unset: a cached copy is still used as is, without probing the hub or
    opening any connection."""
    import socket

    use_hub(hub_cache, offline=False)

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used although the weights are cached")

    monkeypatch.setattr(prep, "hub_unreachable", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    _assert_same(build_backbone(RunConfig(backbone=BACKBONE, pretrained=True)), hub_weights)


@pytest.mark.parametrize(
    "other, words",
    [
        ("resnet18", ["missing", "cls_token", "unexpected"]),
        # timm raised "Error(s) in loading state_dict" naming no tensor, after a page of log
        ("vit_small_patch16_224", ["with another shape", "cls_token: file 1x1x384"]),
    ],
)
def test_hub_cache_with_other_weights_is_refused(tmp_path, use_hub, caplog, other, words):
    """timm alone loads a non-matching hub file with a log line and a random backbone."""
    _write_hub_cache(tmp_path / "hub", _model(other).state_dict())
    use_hub(tmp_path / "hub", offline=True)
    with pytest.raises(UserError) as e:
        build_backbone(RunConfig(backbone=BACKBONE, pretrained=True))
    msg = str(e.value)
    assert "hub weights" in msg and "model.safetensors" in msg and "\n" not in msg
    assert all(w in msg for w in words), msg
    # The file was picked by the backbone's name, not by the user: the fix is to delete it.
    assert msg.endswith("or delete that file to download it again"), msg
    assert not [r for r in caplog.records if "keys" in r.getMessage()], "timm's key log"


def test_corrupt_hub_cache_file_is_named(tmp_path, hub_weights, use_hub):
    """A truncated download in the hub cache: the error names the cached file (timm's own
    error names neither it nor the cache) and says how to get it again."""
    path = _write_hub_cache(tmp_path / "hub", hub_weights)
    blob = path.resolve()
    blob.write_bytes(blob.read_bytes()[:1000])
    use_hub(tmp_path / "hub", offline=True)
    with pytest.raises(UserError) as e:
        build_backbone(RunConfig(backbone=BACKBONE, pretrained=True))
    msg = str(e.value)
    assert str(path) in msg and "delete that file" in msg and "\n" not in msg


def test_offline_flag_without_cache_fails_at_once(tmp_path, use_hub):
    use_hub(tmp_path / "empty", offline=True)
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        build_backbone(RunConfig(backbone=BACKBONE, pretrained=True))
    assert time.perf_counter() - t0 < 30  # no retries; generous for a loaded machine
    msg = str(e.value)
    assert "HF_HUB_OFFLINE is set" in msg and HUB_REPO in msg


def test_offline_by_transformers_variable_names_it(tmp_path, use_hub, monkeypatch):
    """TRANSFORMERS_OFFLINE alone also means offline: the message names it, not HF_HUB_OFFLINE."""
    use_hub(tmp_path / "empty", offline=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        build_backbone(RunConfig(backbone=BACKBONE, pretrained=True))
    msg = str(e.value)
    assert "(TRANSFORMERS_OFFLINE is set)" in msg and "HF_HUB_OFFLINE" not in msg, msg


def test_unreachable_hub_without_cache_fails_fast(tmp_path, use_hub):
    """HF_HUB_OFFLINE unset, nothing cached, no network: seconds, not ~55 s of retries."""
    use_hub(tmp_path / "empty", offline=False)
    if hub.hub_unreachable() is None:
        pytest.skip("the hub is reachable here: a download would succeed")
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        build_backbone(RunConfig(backbone=BACKBONE, pretrained=True))
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, f"took {elapsed:.1f} s"  # retries: ~55 s; generous for a loaded machine
    msg = str(e.value)
    assert "\n" not in msg and "unreachable" in msg
    for hint in ("--weights PATH", "--no-pretrained", "air-gapped", "HF_HUB_CACHE"):
        assert hint in msg, hint


def test_train_that_cannot_load_the_backbone_leaves_no_run_folder(tiny_data, tmp_path, use_hub):
    """The val split is carved before the features need the backbone; a start that fails there
    must not leave a run folder holding only val_split.json."""
    from tune_pets import train

    use_hub(tmp_path / "empty", offline=True)
    art = tmp_path / "art"
    argv = ["vit", "--data-dir", str(tiny_data), "--artifacts-dir", str(art), "--no-progress"]
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        train.main([*argv, "--cache-dir", str(tmp_path / "cache")])
    assert not (art / "train" / "vit").exists()


@pytest.mark.slow
def test_search_that_cannot_load_the_backbone_leaves_no_search_folder(tiny_data, tmp_path):
    """The same for search (offline, nothing cached): it left search/vit/ with val_split.json."""
    from helpers import error_line, run

    art = tmp_path / "art"
    argv = ["vit", "--data-dir", tiny_data, "--artifacts-dir", art, "--no-progress", "--cache-dir",
            tmp_path / "cache", "--runs-dir", tmp_path / "runs", "--num-cpus", 1]  # fmt: skip
    proc = run("search", argv, tmp_path, extra_env={"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert "HF_HUB_OFFLINE" in error_line(proc)
    assert not (art / "search" / "vit").exists()


# ---------------------------------------------------------------- --weights files
@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-wrapped"])
def test_weights_file_loads_every_tensor(tmp_path, hub_weights, fmt):
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        save_file(hub_weights, str(path))
    elif fmt == "pth":
        torch.save(_backbone_keys(hub_weights), path)  # no head: a num_classes=0 model's own
    else:  # a training checkpoint of a DistributedDataParallel model
        torch.save(
            {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in hub_weights.items()}}, path
        )
    _assert_same(build_backbone(RunConfig(backbone=BACKBONE, weights=str(path))), hub_weights)


def _transformers_vit_state() -> dict:
    """Key names of a Hugging Face transformers ViTForImageClassification checkpoint."""
    d = 192
    state = {
        "vit.embeddings.cls_token": torch.zeros(1, 1, d),
        "vit.embeddings.position_embeddings": torch.zeros(1, 197, d),
        "vit.embeddings.patch_embeddings.projection.weight": torch.zeros(d, 3, 16, 16),
        "vit.layernorm.weight": torch.ones(d),
        "classifier.weight": torch.zeros(1000, d),
    }
    for part in ("query", "key", "value"):
        state[f"vit.encoder.layer.0.attention.attention.{part}.weight"] = torch.zeros(d, d)
    return state


def _one_tensor_short(hub_weights: dict) -> dict:
    return {k: v for k, v in hub_weights.items() if k != "blocks.11.mlp.fc2.bias"}


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (
            lambda w: _model("resnet18").state_dict(),
            ["missing", "cls_token", "unexpected (e.g. "],
        ),
        (lambda w: _model("vit_small_patch16_224").state_dict(), ["another shape", "1x1x384"]),
        (lambda w: {f"vit.{k}": v for k, v in w.items()}, ["transformers", HUB_REPO]),
        (lambda w: _transformers_vit_state(), ["transformers", "vit.embeddings"]),
        (_one_tensor_short, ["1 of 150 backbone tensors missing", "blocks.11.mlp.fc2.bias"]),
        (lambda w: {**w, "extra.weight": torch.zeros(1)}, ["1 unexpected", "extra.weight"]),
    ],
    ids=["resnet18", "vit_small", "vit-prefix", "transformers", "one-missing", "one-extra"],
)
def test_weights_file_that_does_not_fit_is_refused(tmp_path, hub_weights, make, expect):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in make(hub_weights).items()}, str(path))
    with pytest.raises(UserError) as e:
        build_backbone(RunConfig(backbone=BACKBONE, weights=str(path)))
    msg = str(e.value)
    assert msg.startswith(f"--weights {path}: ") and "\n" not in msg
    for part in expect:
        assert part in msg, part


def test_weights_of_another_backbone_are_refused_before_the_data(tmp_path, hub_weights, capsys):
    """Names and shapes are checked on a storage-less model when the flags are read; the data
    (here a folder that does not exist) was decoded first, minutes on the full set."""
    from tune_pets.train import main
    from tune_pets.utils import cli_main

    argv = ["vit", "--data-dir", str(tmp_path / "no_data"), "--no-progress", "--weights"]
    right, wrong = tmp_path / "right.safetensors", tmp_path / "wrong.safetensors"
    save_file(hub_weights, str(right))
    save_file(_model("resnet18").state_dict(), str(wrong))
    for path, expect in ((wrong, "not weights of the backbone"), (right, "does not exist")):
        with pytest.raises(SystemExit) as e:
            cli_main(main, [*argv, str(path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and expect in err and len(err.strip().splitlines()) == 1, err


class _Payload:
    """Unpickled, it writes a marker file: the code in a weights file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "this ran while loading"))


@pytest.mark.parametrize("content", ["junk", "pickle-with-code", "no-tensors"], ids=lambda c: c)
def test_unreadable_weights_file_is_refused(tmp_path, content):
    path, marker = tmp_path / "w.pth", tmp_path / "ran.txt"
    if content == "junk":
        path.write_bytes(b"not a weights file")
    elif content == "pickle-with-code":
        torch.save({"x": _Payload(marker)}, path)  # weights_only=True must refuse to run it
    else:
        torch.save({"epoch": 3}, path)
    with pytest.raises(UserError, match=r"^--weights .*w\.pth: (cannot read|holds no)"):
        build_backbone(RunConfig(backbone=BACKBONE, weights=str(path)))
    # An unsafe load ran the code and then failed as "holds no named tensors": the same error.
    assert not marker.exists()


# ---------------------------------------------------------------- the train CLI
def _train(*args: str, env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tune_pets.train", "vit", *args],
        cwd=cwd,
        env={**env, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_cli_train_vit_with_pretrained_weights_from_hub_cache(
    tiny_data, tmp_path, hub_cache, use_hub
):
    """python -m tune_pets.train vit without --no-pretrained, on a hub cache, offline; then
    with no cache and no network: one line, exit code 2."""
    out = [
        "--data-dir", str(tiny_data), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
        "--artifacts-dir", str(tmp_path / "a"), "--runs-dir", str(tmp_path / "r"), "--no-progress",
    ]  # fmt: skip
    env = use_hub(hub_cache, offline=True)
    proc = _train(*out, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    [config_file] = (tmp_path / "a").rglob("config.json")  # where the artifact layout puts it
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config = config.get("config", config)
    assert config["pretrained"] is True and config["weights"] is None

    # Without HF_HUB_OFFLINE where the hub really is unreachable (so the probe decides).
    env = use_hub(tmp_path / "empty", offline=hub.hub_unreachable() is None)
    t0 = time.perf_counter()
    # A fresh feature cache: with the features cached, the backbone is never built.
    proc = _train(*out, "--cache-dir", str(tmp_path / "cache2"), env=env, cwd=tmp_path)
    elapsed = time.perf_counter() - t0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "pretrained weights" in lines[0] and "--weights PATH" in lines[0]
    print(f"offline train CLI failed in {elapsed:.1f} s (process start and imports included)")


@pytest.fixture(scope="module")
def random_vit():
    return build_backbone(RunConfig(model="vit", pretrained=False))


def test_patch_mean_feature_leaves_out_the_cls_token(random_vit):
    """Feature 1 is the mean of the patch tokens only, not of all tokens with the CLS."""
    from tune_pets.backbone import token_features

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = random_vit.eval().forward_features(x)
        feats = token_features(random_vit, x)
    prefix = random_vit.num_prefix_tokens
    torch.testing.assert_close(feats[:, 0], tokens[:, 0])
    torch.testing.assert_close(feats[:, 1], tokens[:, prefix:].mean(1))
