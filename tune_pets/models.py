"""The model registry: one ``ModelSpec`` per model holds everything model-specific, so no other
module compares model names and adding a model is one ``register(ModelSpec(...))`` call.
``images`` models (cnn) train the whole network on images; ``features`` models (vit: a linear
probe) train a head on cached features of a frozen timm backbone. Usage:
``spec = get_spec("vit"); head = spec.trainable(spec.defaults, num_classes, feature_dim)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tune_pets.backbone import build_backbone, token_features
from tune_pets.config import LEGACY_MODEL_NAMES, RunConfig
from tune_pets.data import cache_res
from tune_pets.utils import UserError

# The homework's eval transform: Resize(256) + CenterCrop(224) -> crop_pct 0.875.
CNN_CROP_PCT = 0.875
CNN_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics: fine for a CNN trained from scratch
CNN_STD = (0.229, 0.224, 0.225)
KINDS = ("images", "features")
# The config keys a "features" model's cached features are made from. A search computes them
# once, before its trials, from the base config: so they are fixed, never searched.
FEATURE_KEYS = ("backbone", "pretrained", "weights", "feature_views", "aug_scale_min", "hflip")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # CLI name and RunConfig.model
    kind: str  # one of KINDS
    help: str  # one line for --help
    defaults: RunConfig  # the homework's settings: the baseline and the search's first point
    build: Callable[[RunConfig, int], nn.Module]  # (config, num_classes) -> the evaluable model
    data_config: Callable[[RunConfig], dict]  # img_size, crop_pct, interpolation, mean, std
    # "features" models: the frozen backbone, and the trained head on ``[..., 2, D]`` features.
    build_backbone: Callable[[RunConfig], nn.Module] | None = None
    build_head: Callable[[RunConfig, int, int], nn.Module] | None = None  # (cfg, D, classes)
    fixed_input_size: bool = False  # the input size is the model's own; --img-size is refused
    homework: tuple[float, float] | None = None  # the homework's val acc / macro-F1 (report)

    def trainable(self, config: RunConfig, num_classes: int, feature_dim: int = 0) -> nn.Module:
        """The module a fit optimizes: the whole network, or only the head on features."""
        if self.kind == "images":
            return self.build(config, num_classes)
        return self.build_head(config, feature_dim, num_classes)

    def cache_res(self, config: RunConfig, img_sizes: Sequence[int] = ()) -> int:
        """Side of the cached squares: the eval resize of the run's input size, or of the
        largest of ``img_sizes``, every size a search's trials may ask for. (Not the base
        config's too: the cnn's default 224 made a search over 96-128 px cache 256 px squares,
        3x the memory, and its trials downscale 2-2.7x where reproduce's did not.)"""
        dc = self.data_config(config)
        size = max(img_sizes) if img_sizes and not self.fixed_input_size else dc["img_size"]
        return cache_res(size, dc["crop_pct"])


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` (replacing one of the same name) and return it."""
    if spec.kind not in KINDS:
        raise ValueError(f"ModelSpec {spec.name!r}: kind must be one of {KINDS}, got {spec.kind!r}")
    if spec.kind == "features" and (spec.build_backbone is None or spec.build_head is None):
        raise ValueError(f"ModelSpec {spec.name!r}: a features model needs a backbone and a head")
    if spec.defaults.model != spec.name:
        raise ValueError(f"ModelSpec {spec.name!r}: defaults.model is {spec.defaults.model!r}")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def model_names() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    name = LEGACY_MODEL_NAMES.get(name, name)
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; registered models: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


# ---------------------------------------------------------------- cnn
class SmallCNN(nn.Module):
    """``depth`` blocks of Conv-BN-ReLU-MaxPool (channels ``width * 2**i``, at most 512),
    global average pooling, dropout, linear."""

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
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A mean, not AdaptiveAvgPool2d(1): its CUDA backward has no deterministic implementation.
        x = self.features(x).mean(dim=(2, 3))
        return self.head(self.dropout(x))


register(
    ModelSpec(
        name="cnn",
        kind="images",
        help="small CNN trained from scratch (conv blocks 64/128/256)",
        # RunConfig's defaults are the homework CNN's but for img_size: it trained at 224 px.
        defaults=RunConfig(model="cnn", img_size=224),
        build=lambda cfg, n: SmallCNN(n, cfg.depth, cfg.width, cfg.dropout),
        data_config=lambda cfg: {
            "img_size": cfg.img_size,
            "crop_pct": CNN_CROP_PCT,
            "interpolation": "bilinear",
            "mean": CNN_MEAN,
            "std": CNN_STD,
        },
        homework=(0.2306, 0.2185),
    )
)


# ---------------------------------------------------------------- vit (linear probe)
class ViTProbe(nn.Module):
    """Frozen backbone + trainable linear head. ``train()`` never unfreezes the backbone."""

    def __init__(self, backbone: nn.Module, num_classes: int, pooling: str = "cls"):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.pooling = pooling
        self.head = make_probe_head(backbone.num_features, num_classes, pooling)

    def train(self, mode: bool = True) -> ViTProbe:
        super().train(mode)
        self.backbone.eval()  # frozen: dropout-style layers stay in eval mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = token_features(self.backbone, x)
        return self.head(pool_features(feats, self.pooling))


def pool_features(feats: torch.Tensor, pooling: str) -> torch.Tensor:
    """The probe's input from ``[..., 2, D]`` (CLS, patch mean) features: cls, mean or both."""
    if pooling == "both":
        return feats.flatten(-2)
    return feats[..., 0 if pooling == "cls" else 1, :]


def make_probe_head(embed_dim: int, num_classes: int, pooling: str) -> nn.Linear:
    return nn.Linear(embed_dim * (2 if pooling == "both" else 1), num_classes)


def vit_data_config(config: RunConfig) -> dict:
    """The backbone's own preprocessing, read from timm's pretrained config (no model built)."""
    import timm

    pretrained_cfg = timm.models.get_pretrained_cfg(config.backbone)
    if pretrained_cfg is None:
        raise UserError(f"timm backbone {config.backbone!r} has no data config")
    dc = timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg.to_dict())
    return {
        "img_size": int(dc["input_size"][-1]),
        "crop_pct": float(dc["crop_pct"]),
        "interpolation": dc["interpolation"],
        "mean": tuple(map(float, dc["mean"])),
        "std": tuple(map(float, dc["std"])),
    }


register(
    ModelSpec(
        name="vit",
        kind="features",
        help="linear probe on a frozen, pretrained timm vit_tiny_patch16_224",
        defaults=RunConfig(
            model="vit",
            epochs=10,
            batch_size=32,
            lr=1e-3,
            optimizer="adam",
            weight_decay=0.0,
            scheduler="none",
            img_size=224,
            dropout=0.0,
            pooling="cls",
        ),
        build=lambda cfg, n: ViTProbe(build_backbone(cfg), n, cfg.pooling),
        data_config=vit_data_config,
        build_backbone=build_backbone,
        build_head=lambda cfg, dim, n: make_probe_head(dim, n, cfg.pooling),
        fixed_input_size=True,
        homework=(0.7912, 0.7888),
    )
)
