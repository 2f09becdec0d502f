"""Model registry: ``build_model(name, num_classes, config)``.

- ``cnn``: the homework CNN (conv blocks of Conv-BN-ReLU-MaxPool, adaptive avg pool, dropout,
  linear); ``depth``/``width``/``dropout`` configurable, defaults 3 blocks of 64/128/256.
- ``vit_probe``: a frozen timm ``vit_tiny_patch16_224`` (eval mode, no grads) with a linear head
  on its CLS token, the mean of its patch tokens, or both. Preprocessing comes from the model
  (``timm.data.resolve_model_data_config``), not ImageNet constants.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from tune_pets.config import RunConfig, canonical_model
from tune_pets.data import CNN_CROP_PCT, CNN_MEAN, CNN_STD
from tune_pets.utils import UserError

RANDOM_INIT_SEED = 0  # a random-init backbone is always the same one: features stay cacheable


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, depth: int = 3, width: int = 64, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(depth):
            c_out = min(width * 2**i, 512)
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(x))


class ViTProbe(nn.Module):
    """Frozen backbone + trainable linear head. ``train()`` never unfreezes the backbone."""

    def __init__(self, backbone: nn.Module, num_classes: int, pooling: str = "cls"):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.pooling = pooling
        self.head = make_probe_head(backbone.num_features, num_classes, pooling)

    def train(self, mode: bool = True) -> ViTProbe:
        super().train(mode)
        self.backbone.eval()  # frozen: dropout/BN-style layers stay in eval mode
        return self

    @torch.no_grad()
    def token_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 2, D]``: CLS token and mean of patch tokens (after the final norm)."""
        return token_features(self.backbone, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pool_features(self.token_features(x), self.pooling))


def token_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    tokens = backbone.forward_features(x)
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    return torch.stack([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=1)


def pool_features(feats: torch.Tensor, pooling: str) -> torch.Tensor:
    """Select the probe's input from ``[..., 2, D]`` features: cls, mean, or both concatenated."""
    if pooling == "cls":
        return feats[..., 0, :]
    if pooling == "mean":
        return feats[..., 1, :]
    return feats.flatten(-2)


def make_probe_head(embed_dim: int, num_classes: int, pooling: str) -> nn.Linear:
    return nn.Linear(embed_dim * (2 if pooling == "both" else 1), num_classes)


def build_backbone(config: RunConfig) -> nn.Module:
    """The frozen timm backbone: pretrained from the hub, from ``config.weights``, or random."""
    import timm

    name = config.backbone
    if name not in timm.list_models(pretrained=False):
        raise UserError(f"unknown timm backbone {name!r}")
    if config.weights:
        from pathlib import Path

        if not Path(config.weights).is_file():
            raise UserError(f"--weights {config.weights}: file not found")
        try:
            return timm.create_model(
                name,
                pretrained=True,
                num_classes=0,
                pretrained_cfg_overlay={"file": str(config.weights)},
            )
        except Exception as e:  # noqa: BLE001 - any load failure is the user's file
            raise UserError(
                f"--weights {config.weights}: could not load weights for {name} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
    if not config.pretrained:
        with _seeded(RANDOM_INIT_SEED):
            return timm.create_model(name, pretrained=False, num_classes=0)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001 - hub/network failures come in many types
        raise UserError(
            f"could not get pretrained weights for {name} from the Hugging Face hub "
            f"({type(e).__name__}); pass --weights PATH to load a local weights file, "
            f"or --no-pretrained for random weights (tests only)"
        ) from None


def backbone_tag(config: RunConfig) -> str:
    """Identifies the backbone's weights (part of the feature-cache key)."""
    if config.weights:
        import hashlib
        from pathlib import Path

        p = Path(config.weights)
        digest = hashlib.sha1(f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}".encode())
        return f"{config.backbone}-file{digest.hexdigest()[:10]}"
    return f"{config.backbone}-{'pretrained' if config.pretrained else f'random{RANDOM_INIT_SEED}'}"


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def data_config(config: RunConfig, backbone: nn.Module | None = None) -> dict:
    """Preprocessing for a model: img size, crop_pct, interpolation, mean, std.

    For the ViT probe these come from the timm model's own data config.
    """
    if canonical_model(config.model) == "cnn":
        return {
            "img_size": config.img_size,
            "crop_pct": CNN_CROP_PCT,
            "interpolation": "bilinear",
            "mean": CNN_MEAN,
            "std": CNN_STD,
        }
    import timm

    if backbone is None:  # the model's pretrained config, read without building the model
        pretrained_cfg = timm.models.get_pretrained_cfg(config.backbone)
        if pretrained_cfg is None:
            raise UserError(f"timm backbone {config.backbone!r} has no data config")
        dc = timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg.to_dict())
    else:
        dc = timm.data.resolve_model_data_config(backbone)
    return {
        "img_size": int(dc["input_size"][-1]),
        "crop_pct": float(dc["crop_pct"]),
        "interpolation": dc["interpolation"],
        "mean": tuple(map(float, dc["mean"])),
        "std": tuple(map(float, dc["std"])),
    }


def build_cnn(config: RunConfig, num_classes: int) -> nn.Module:
    return SmallCNN(num_classes, config.depth, config.width, config.dropout)


def build_vit_probe(config: RunConfig, num_classes: int) -> nn.Module:
    return ViTProbe(build_backbone(config), num_classes, config.pooling)


MODELS: dict[str, Callable[[RunConfig, int], nn.Module]] = {
    "cnn": build_cnn,
    "vit_probe": build_vit_probe,
}


def build_model(name: str, num_classes: int, config: RunConfig | None = None) -> nn.Module:
    """Build a registered model by name; an unknown name lists the valid ones."""
    if name not in MODELS and name not in ("vit",):
        raise UserError(f"unknown model {name!r}; registered models: {', '.join(MODELS)}")
    name = canonical_model(name)
    config = (config or RunConfig(model=name)).replace(model=name)
    return MODELS[name](config, num_classes)
