"""Model registry invariants, parametrized over every registered model (real timm, random init)."""

from __future__ import annotations

import pytest
import torch

from tune_pets.config import RunConfig, homework_defaults
from tune_pets.data import CNN_MEAN
from tune_pets.models import (
    MODELS,
    ViTProbe,
    backbone_tag,
    build_backbone,
    build_model,
    data_config,
    pool_features,
)
from tune_pets.utils import UserError

NUM_CLASSES = 5


def config_for(name: str) -> RunConfig:
    if name == "cnn":
        return homework_defaults("cnn").replace(img_size=32, width=8)
    return homework_defaults("vit").replace(pretrained=False)


def input_size(name: str) -> int:
    return 32 if name == "cnn" else 224


@pytest.fixture(scope="module")
def probe():
    """One random-init ViT probe for the module (a ViT build costs about a second on a CPU)."""
    return build_model("vit_probe", NUM_CLASSES, config_for("vit_probe"))


@pytest.fixture(scope="module", params=sorted(MODELS))
def built(request):
    name = request.param
    if name == "vit_probe":
        return name, request.getfixturevalue("probe")
    torch.manual_seed(0)
    return name, build_model(name, NUM_CLASSES, config_for(name))


def test_registry_has_both_models():
    assert set(MODELS) == {"cnn", "vit_probe"}


def test_output_shape_and_finite(built):
    name, model = built
    model.eval()
    x = torch.randn(2, 3, input_size(name), input_size(name))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


def test_loss_is_finite_and_backprop_reaches_trainable_params(built):
    name, model = built
    model.train()
    x = torch.randn(2, 3, input_size(name), input_size(name))
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, NUM_CLASSES - 1]))
    assert torch.isfinite(loss)
    model.zero_grad(set_to_none=True)
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n
    model.zero_grad(set_to_none=True)


def test_vit_probe_only_head_is_trainable(probe):
    model = probe
    assert isinstance(model, ViTProbe)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["head.bias", "head.weight"]
    assert model.head.in_features == 192  # ViT-Tiny embed dim, CLS pooling
    model.train()
    assert model.training and model.head.training
    assert not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    model.eval()
    model.train(True)
    assert not any(m.training for m in model.backbone.modules())


def test_vit_probe_train_mode_output_is_deterministic(probe):
    """Frozen backbone in eval mode: no dropout noise in train mode, even with dropout set."""
    drops = [m for m in probe.backbone.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops
    try:
        for m in drops:
            m.p = 0.5
        probe.train()
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            a, b = probe(x), probe(x)
        assert torch.equal(a, b)
    finally:
        for m in drops:
            m.p = 0.0


@pytest.mark.parametrize("pooling, dim", [("cls", 192), ("mean", 192), ("both", 384)])
def test_vit_probe_pooling_sets_head_width(probe, pooling, dim):
    model = ViTProbe(probe.backbone, 3, pooling)
    assert model.head.in_features == dim
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 224, 224)).shape == (2, 3)
    feats = torch.randn(4, 2, 192)
    assert pool_features(feats, pooling).shape == (4, dim)
    torch.testing.assert_close(pool_features(feats, "cls"), feats[:, 0])
    torch.testing.assert_close(pool_features(feats, "mean"), feats[:, 1])
    both = torch.cat([feats[:, 0], feats[:, 1]], 1)
    torch.testing.assert_close(pool_features(feats, "both"), both)


def test_build_model_takes_pooling_from_config_and_accepts_cli_alias():
    m = build_model("vit", 3, homework_defaults("vit").replace(pretrained=False, pooling="both"))
    assert isinstance(m, ViTProbe) and m.head.in_features == 384 and m.pooling == "both"


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError) as e:
        build_model("resnet50", 3)
    msg = str(e.value)
    assert "resnet50" in msg
    for name in MODELS:
        assert name in msg


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(UserError, match="not_a_model"):
        build_backbone(RunConfig(model="vit_probe", backbone="not_a_model", pretrained=False))


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--weights"):
        build_backbone(RunConfig(model="vit_probe", weights=str(tmp_path / "w.safetensors")))


def test_cnn_shape_follows_config():
    m = build_model("cnn", 7, RunConfig(depth=4, width=16, dropout=0.3))
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128]
    assert m.head.in_features == 128 and m.head.out_features == 7
    assert m.dropout.p == 0.3
    wide = build_model("cnn", 2, RunConfig(depth=5, width=256))
    assert max(c.out_channels for c in wide.modules() if isinstance(c, torch.nn.Conv2d)) == 512


def test_cnn_same_seed_same_weights():
    sd = []
    for _ in range(2):
        torch.manual_seed(123)
        sd.append(build_model("cnn", 4, RunConfig(width=8)).state_dict())
    for k in sd[0]:
        assert torch.equal(sd[0][k], sd[1][k]), k


def test_data_config_vit_comes_from_the_model():
    dc = data_config(homework_defaults("vit"))
    assert dc["mean"] == (0.5, 0.5, 0.5) and dc["std"] == (0.5, 0.5, 0.5)
    assert dc["mean"] != CNN_MEAN
    assert dc["crop_pct"] == pytest.approx(0.9)
    assert dc["interpolation"] == "bicubic"
    assert dc["img_size"] == 224


def test_data_config_cnn():
    dc = data_config(homework_defaults("cnn").replace(img_size=64))
    assert dc["img_size"] == 64 and dc["crop_pct"] == 0.875
    assert dc["mean"] == CNN_MEAN and dc["interpolation"] == "bilinear"


def test_random_init_backbone_is_identical_across_builds_and_leaves_rng_alone(probe):
    cfg = config_for("vit_probe")
    torch.manual_seed(2)  # a different global seed must not change the backbone
    rng = torch.get_rng_state()
    fresh = build_backbone(cfg).state_dict()
    assert torch.equal(torch.get_rng_state(), rng), "building the backbone consumed global RNG"
    ref = probe.backbone.state_dict()
    assert fresh.keys() == ref.keys()
    for k in ref:
        assert torch.equal(fresh[k], ref[k]), k
    assert backbone_tag(cfg) == "vit_tiny_patch16_224-random0"
