"""The frozen backbone of the ViT probe: built from the hub, a local file or a seeded random
init; its weights tag keys the feature cache.

    model = build_backbone(RunConfig(backbone="vit_tiny_patch16_224", pretrained=True))

timm loads weights non-strictly (a resnet18 file loads with one log line, leaving the backbone
random), so every backbone tensor must come from the file by exact name and shape. Hub weights
come from the local hub cache when there; offline without them this fails in seconds, not after
~55 s of retries (air-gapped: copy a hub cache made online, or pass ``--weights PATH``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tune_pets.config import RunConfig
from tune_pets import hub
from tune_pets.utils import UserError

RANDOM_INIT_SEED = 0  # a random-init backbone is always the same one: features stay cacheable
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in the order timm tries them
# Key prefixes of Hugging Face transformers ViT checkpoints (ViTModel / ViTForImageClassification).
TRANSFORMERS_PREFIXES = ("vit.", "embeddings.", "encoder.layer.")
SHOWN = 3  # how many offending keys an error names


def build_backbone(config: RunConfig) -> nn.Module:
    """The frozen timm backbone, its loaded weights checked; never touches the global RNG."""
    import timm

    name = config.backbone
    if name not in timm.list_models(pretrained=False):
        raise UserError(f"unknown timm backbone {name!r}")
    if not config.weights:
        return _from_hub(name) if config.pretrained else _create(name)
    path = _weights_file(config)
    option = f"--weights {path}"
    state = read_state_dict(path, option)
    model = _create(name)
    check_state_dict(model, state, option, name)
    wanted = model.state_dict().keys()  # the check allows only the classifier head beyond these
    model.load_state_dict({k: v for k, v in state.items() if k in wanted})
    return model


def backbone_tag(config: RunConfig) -> str:
    """Identifies the backbone's weights (part of the feature-cache key)."""
    if config.weights:
        # before stat(): a checkpoint may name a file gone since
        return f"{config.backbone}-file{_file_digest(_weights_file(config))}"
    if not config.pretrained:  # timm's init code makes the weights: its version is part of it
        import timm

        return f"{config.backbone}-random{RANDOM_INIT_SEED}-timm{timm.__version__}"
    # Not yet downloaded: plain "pretrained" (features made then are recomputed once, keyed by
    # the file).
    found = _cached_weights(config.backbone) if _hub_repo(config.backbone) else None
    if found is None:
        return f"{config.backbone}-pretrained"
    # The hub names a blob by its content's hash: other weights, another key. A cache copied
    # without its links (cp -rL, scp -r) has a plain file there: keyed as a --weights file.
    blob = found.resolve().name
    key = blob[:16] if re.fullmatch(r"[0-9a-f]{40,64}", blob) else f"file{_file_digest(found)}"
    return f"{config.backbone}-pretrained-{key}"


def _file_digest(p: Path) -> str:
    """The file's content: SHA-256 of its bytes (~30 ms for ViT-Tiny's 22 MB). Path, size and
    mtime were not enough: two weights files of one architecture have one size, and rsync -a,
    cp -p or tar keep the mtime, so replaced weights reused the old features. Within one
    process (a key per split and view) they are: the file is hashed once."""
    st = p.stat()
    return _content_digest(str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.cache
def _content_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _weights_file(config: RunConfig) -> Path:
    path = Path(config.weights)
    if not path.is_file():
        raise UserError(
            f"backbone weights file {path} not found (the weights this run or checkpoint was "
            "made with); pass --weights PATH to where it is now"
        )
    return path


def token_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, 2, D]``: the CLS token and the mean of the patch tokens (after the final norm)."""
    tokens = backbone.forward_features(x)
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    return torch.stack([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=1)


def _create(name: str, pretrained: bool = False) -> nn.Module:
    """Seeded in a forked RNG: random init is reproducible and the global RNG is spared."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return timm.create_model(name, pretrained=pretrained, num_classes=0)


def read_state_dict(path: Path, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (told by content: 8-byte header length, then JSON) or a
    ``torch.save``d dict, loaded with ``weights_only=True`` so a file cannot run code; wrappers
    (``{"state_dict": ...}``, ``{"model": ...}``) and DDP ``module.`` prefixes are removed."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
        if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the file's
        raise UserError(
            f"{source}: cannot read it as safetensors or as a PyTorch state dict (loaded with "
            f"weights_only=True: {type(e).__name__}: {hub.first_line(e)}); pass a .safetensors "
            f"file or a torch.save'd dict of tensors"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    items = state.items() if isinstance(state, Mapping) else []
    tensors = {str(k): v for k, v in items if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{source}: holds no named tensors; pass a backbone weights file")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def check_weights_file(path: Path, name: str | None, source: str) -> None:
    """Refuse a file that is not weights (text, cut short) or, given the backbone ``name``, not
    its weights: names and shapes checked on a model without storage (torch's meta device:
    milliseconds), before the data is decoded and the real backbone built."""
    import timm

    state = read_state_dict(path, source)
    if name is not None and name in timm.list_models(pretrained=False):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
        check_state_dict(model, state, source, name)


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, name: str
) -> None:
    """One-line ``UserError`` unless ``state`` holds every tensor of ``model`` by name and shape,
    and nothing else but the classifier head (``num_classes=0`` drops it). Transformers-format
    files are refused, not converted (other names, separate q/k/v; timm has its own files)."""
    expected = model.state_dict()
    head = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    heads = [head] if isinstance(head, str) else head
    ignored = {f"{c}.{p}" for c in heads for p in ("weight", "bias")}
    counter = "num_batches_tracked"  # BatchNorm step counters: not weights, older files lack them
    missing = [k for k in expected if k not in state and not k.endswith(counter)]
    known = expected.keys() | ignored
    unexpected = [k for k in state if k not in known and not k.endswith(counter)]
    reshaped = [
        f"{k}: file {_shape(state[k])}, model {_shape(expected[k])}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or reshaped):
        return
    repo = _hub_repo(name) or f"timm/{name}"
    transformers = [k for k in unexpected if k.startswith(TRANSFORMERS_PREFIXES)]
    if transformers:
        raise UserError(
            f"{source}: this is a Hugging Face transformers checkpoint (keys like "
            f"{transformers[0]!r}), not timm weights, and its names are not converted; use the "
            f"timm weights of {name} instead (model.safetensors of the hub repo {repo})"
        )
    problems = [
        f"{len(keys)}{what} (e.g. {', '.join(keys[:SHOWN])}{', ...' if len(keys) > SHOWN else ''})"
        for keys, what in (
            (missing, f" of {len(expected)} backbone tensors missing"),
            (unexpected, " unexpected"),
            (reshaped, " with another shape"),
        )
        if keys
    ]
    raise UserError(
        f"{source}: not weights of the backbone {name}: {', '.join(problems)}; "
        f"pass the timm weights of {name} (model.safetensors of the hub repo {repo}), or "
        f"choose the backbone these weights belong to"
    )


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _from_hub(name: str) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``: cache first, fast clear failure offline,
    the loaded file checked afterwards."""
    repo = _hub_repo(name)
    if repo is None:  # timm keeps (almost) all weights on the hub; the rest cannot be checked
        raise UserError(
            f"{name} has no pretrained weights on the Hugging Face hub that can be checked; "
            f"pass --weights PATH or --no-pretrained"
        )
    cached = _cached_weights(name)
    if cached is not None:  # checked first: timm names no tensor of a file that does not fit
        source = f"hub weights {cached}"
        try:
            state = read_state_dict(cached, source)
        except UserError as e:
            raise UserError(
                f"{e}; or delete that file to download it again, or pass --no-pretrained"
            ) from None
        try:
            check_state_dict(_create(name), state, source, name)
        except UserError as e:  # the file is picked by backbone name: it is the one to go
            raise UserError(f"{e}; or delete that file to download it again") from None
    elif why := hub.offline_reason() or hub.hub_unreachable():
        raise UserError(_offline_message(name, repo, why))
    # A cached copy is used as is, without asking the hub for a newer revision: no network
    # means no wait, and the weights of a run do not change under it.
    try:
        with hub.hub_offline_mode() if cached else contextlib.nullcontext():
            model = _create(name, pretrained=True)
    except Exception as e:  # noqa: BLE001 - hub/network failures come in many types
        why = f"{type(e).__name__}: {hub.first_line(e)}"
        if hub.is_network_error(e):
            raise UserError(_offline_message(name, repo, why)) from None
        where = f"the hub cache file {cached}" if cached else f"the hub repo {repo}"
        fix = "delete that file to download it again, " if cached else ""
        raise UserError(
            f"could not load the pretrained weights of {name} from {where} ({why}); "
            f"{fix}pass --weights PATH, or --no-pretrained"
        ) from e
    if cached is None:  # just downloaded
        path = _cached_weights(name)
        if path is None:
            from huggingface_hub import constants

            raise UserError(
                f"timm loaded weights for {name}, but not from the hub cache "
                f"({constants.HF_HUB_CACHE}), so they cannot be checked; pass --weights PATH"
            )
        source = f"hub weights {path}"
        check_state_dict(model, read_state_dict(path, source), source, name)
    return model


def _hub_repo(name: str) -> str | None:
    """The hub repo of ``name``'s default pretrained weights (``timm/<model>.<tag>``)."""
    from timm.models import get_pretrained_cfg

    return getattr(get_pretrained_cfg(name), "hf_hub_id", None) or None


def _cached_weights(name: str) -> Path | None:
    """The weights file of ``name``'s hub repo in the local hub cache, if it is there."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    repo, _, revision = (cfg.hf_hub_id or "").partition("@")
    for file in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES:
        found = try_to_load_from_cache(repo, file, revision=revision or None)
        if isinstance(found, str):  # not None, not the "known to be absent" marker
            return Path(found)
    return None


def _offline_message(name: str, repo: str, why: str) -> str:
    from huggingface_hub import constants

    return (
        f"cannot get the pretrained weights of {name}: the Hugging Face hub is unreachable "
        f"({why}) and {repo} is not in the hub cache ({constants.HF_HUB_CACHE}); pass --weights "
        f"PATH (that repo's model.safetensors), or --no-pretrained (random weights, for tests), or "
        f"for air-gapped use copy a hub cache made online (its folder "
        f"models--{repo.replace('/', '--')}) and set HF_HUB_CACHE to it"
    )
