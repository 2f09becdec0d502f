"""The model registry (tune_pets.models): what each spec holds, registering and looking up by
name, and invariants parametrized over every registered model (real timm, random init).

Loading backbone weights (hub cache, --weights files) and its errors: test_weights.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch

from tune_pets.backbone import backbone_tag, build_backbone
from tune_pets.config import RunConfig, validate_config
from tune_pets.models import (
    CNN_CROP_PCT,
    CNN_MEAN,
    CNN_STD,
    ModelSpec,
    ViTProbe,
    get_spec,
    model_names,
    pool_features,
    register,
    unregister,
)
from tune_pets.utils import UserError

NUM_CLASSES = 5


def config_for(name: str) -> RunConfig:
    """A cheap config of a registered model: a narrow CNN at 32 px, a random-init backbone."""
    spec = get_spec(name)
    if spec.kind == "images":
        return spec.defaults.replace(img_size=32, width=8)
    return spec.defaults.replace(pretrained=False)


def input_size(name: str) -> int:
    return get_spec(name).data_config(config_for(name))["img_size"]


@pytest.fixture(scope="module")
def probe():
    """One random-init ViT probe for the module (a ViT build costs about a second on a CPU)."""
    return get_spec("vit").build(config_for("vit"), NUM_CLASSES)


@pytest.fixture(scope="module", params=model_names())
def built(request):
    name = request.param
    if name == "vit":
        return name, request.getfixturevalue("probe")
    torch.manual_seed(0)
    return name, get_spec(name).build(config_for(name), NUM_CLASSES)


# ---------------------------------------------------------------- the registry
def test_registry_has_the_two_models_and_the_legacy_name_is_only_an_alias():
    names = model_names()
    assert names[:2] == ["cnn", "vit"]
    assert "vit_probe" not in names
    assert get_spec("vit_probe") is get_spec("vit")


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError) as e:
        get_spec("resnet50")
    msg = str(e.value)
    assert "resnet50" in msg and "\n" not in msg
    for name in model_names():
        assert name in msg


def test_homework_defaults_cnn():
    spec = get_spec("cnn")
    c = spec.defaults
    assert (spec.name, spec.kind, spec.fixed_input_size) == ("cnn", "images", False)
    assert (c.model, c.optimizer, c.lr, c.batch_size, c.epochs, c.scheduler) == (
        "cnn",
        "adamw",
        1e-3,
        32,
        50,
        "cosine",
    )
    assert (c.depth, c.width, c.dropout, c.img_size) == (3, 64, 0.2, 224)
    assert validate_config(c) == c


def test_homework_defaults_vit():
    spec = get_spec("vit")
    c = spec.defaults
    assert (spec.name, spec.kind, spec.fixed_input_size) == ("vit", "features", True)
    assert (c.model, c.optimizer, c.lr, c.batch_size, c.epochs, c.scheduler) == (
        "vit",
        "adam",
        1e-3,
        32,
        10,
        "none",
    )
    assert c.backbone == "vit_tiny_patch16_224" and c.pooling == "cls" and c.weight_decay == 0
    assert validate_config(c) == c


def _tiny_spec(name: str = "tiny", **changes) -> ModelSpec:
    base = dict(
        name=name,
        kind="images",
        help="a test model",
        defaults=RunConfig(model=name, img_size=16),
        build=lambda cfg, n: torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(3 * cfg.img_size**2, n)
        ),
        data_config=get_spec("cnn").data_config,
    )
    return ModelSpec(**{**base, **changes})


def test_register_and_unregister_a_model():
    spec = _tiny_spec()
    try:
        assert register(spec) is spec
        assert "tiny" in model_names() and get_spec("tiny") is spec
        replacement = dataclasses.replace(spec, help="replaced")
        register(replacement)  # same name: replaces
        assert get_spec("tiny") is replacement and model_names().count("tiny") == 1
        net = get_spec("tiny").trainable(spec.defaults, 3)
        assert net(torch.zeros(2, 3, 16, 16)).shape == (2, 3)
    finally:
        unregister("tiny")
    assert "tiny" not in model_names()
    with pytest.raises(UserError, match="tiny"):
        get_spec("tiny")
    unregister("tiny")  # unregistering an unknown name is a no-op


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"kind": "pixels"}, "kind must be one of"),
        ({"kind": "features"}, "needs a backbone and a head"),
        ({"defaults": RunConfig(model="cnn")}, "defaults.model is 'cnn'"),
    ],
)
def test_register_refuses_an_inconsistent_spec(changes, message):
    with pytest.raises(ValueError, match=message):
        register(_tiny_spec("broken", **changes))
    assert "broken" not in model_names()


def test_trainable_is_the_whole_net_or_only_the_head():
    cnn = get_spec("cnn")
    net = cnn.trainable(config_for("cnn"), 4)
    assert isinstance(net, type(cnn.build(config_for("cnn"), 4)))
    head = get_spec("vit").trainable(config_for("vit").replace(pooling="both"), 4, 192)
    assert isinstance(head, torch.nn.Linear)
    assert (head.in_features, head.out_features) == (384, 4)


def test_cache_res_covers_the_largest_size_a_search_may_ask_for():
    cnn, vit = get_spec("cnn"), get_spec("vit")
    cfg = cnn.defaults.replace(img_size=64)
    assert cnn.cache_res(cfg) == 73  # floor(64 / 0.875)
    assert cnn.cache_res(cfg, img_sizes=(96, 128)) == 146  # floor(128 / 0.875)
    # The searched sizes alone: the base config's img_size (224 by default) is no trial's.
    assert cnn.cache_res(cnn.defaults, img_sizes=(96, 128)) == 146
    assert cnn.cache_res(cnn.defaults, img_sizes=(256,)) == 292
    # The probe's input size is the backbone's own: a search's img_size values do not count.
    assert vit.cache_res(vit.defaults, img_sizes=(512,)) == vit.cache_res(vit.defaults) == 248


# ---------------------------------------------------------------- every model
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


# ---------------------------------------------------------------- the ViT probe
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


def test_build_takes_pooling_from_the_config():
    m = get_spec("vit").build(config_for("vit").replace(pooling="both"), 3)
    assert isinstance(m, ViTProbe) and m.head.in_features == 384 and m.pooling == "both"


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(UserError, match="not_a_model"):
        build_backbone(RunConfig(model="vit", backbone="not_a_model", pretrained=False))


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--weights"):
        build_backbone(RunConfig(model="vit", weights=str(tmp_path / "w.safetensors")))


def test_random_init_backbone_is_identical_across_builds_and_leaves_rng_alone(probe):
    cfg = config_for("vit")
    torch.manual_seed(2)  # a different global seed must not change the backbone
    rng = torch.get_rng_state()
    fresh = build_backbone(cfg).state_dict()
    assert torch.equal(torch.get_rng_state(), rng), "building the backbone consumed global RNG"
    ref = probe.backbone.state_dict()
    assert fresh.keys() == ref.keys()
    for k in ref:
        assert torch.equal(fresh[k], ref[k]), k
    assert backbone_tag(cfg) == f"vit_tiny_patch16_224-random0-timm{timm.__version__}"


def test_an_augmented_views_cache_key_names_the_device_type(tiny_data, tmp_path):
    """A view's crops are resampled one way on CPU, another on CUDA: one key reused a GPU's
    views on CPU. The clean view is the same on both, and keeps one key."""
    from tune_pets.data import load_split
    from tune_pets.features import feature_key

    cfg = config_for("vit")
    dc = get_spec("vit").data_config(cfg)
    split = load_split(tiny_data, "train", 36, cache_dir=tmp_path, progress=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert feature_key(cfg, dc, split, None, cpu) == feature_key(cfg, dc, split, None, cuda)
    assert feature_key(cfg, dc, split, 0, cpu) != feature_key(cfg, dc, split, 0, cuda)


# ---------------------------------------------------------------- the CNN
def test_cnn_shape_follows_config():
    build = get_spec("cnn").build
    m = build(RunConfig(depth=4, width=16, dropout=0.3), 7)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128]
    assert m.head.in_features == 128 and m.head.out_features == 7
    assert m.dropout.p == 0.3
    wide = build(RunConfig(depth=5, width=256), 2)
    assert max(c.out_channels for c in wide.modules() if isinstance(c, torch.nn.Conv2d)) == 512


def test_cnn_same_seed_same_weights():
    sd = []
    for _ in range(2):
        torch.manual_seed(123)
        sd.append(get_spec("cnn").build(RunConfig(width=8), 4).state_dict())
    for k in sd[0]:
        assert torch.equal(sd[0][k], sd[1][k]), k


# ---------------------------------------------------------------- preprocessing
def test_data_config_vit_comes_from_the_model():
    dc = get_spec("vit").data_config(get_spec("vit").defaults)
    assert dc["mean"] == (0.5, 0.5, 0.5) and dc["std"] == (0.5, 0.5, 0.5)
    assert dc["mean"] != CNN_MEAN
    assert dc["crop_pct"] == pytest.approx(0.9)
    assert dc["interpolation"] == "bicubic"
    assert dc["img_size"] == 224


def test_data_config_cnn():
    dc = get_spec("cnn").data_config(get_spec("cnn").defaults.replace(img_size=64))
    assert dc["img_size"] == 64 and dc["crop_pct"] == CNN_CROP_PCT == 0.875
    assert dc["mean"] == CNN_MEAN and dc["std"] == CNN_STD and dc["interpolation"] == "bilinear"


# ---------------------------------------------------------------- the feature cache's key and views
def _image_split(n: int = 6, res: int = 8):
    from tune_pets.data import ImageSplit

    images = np.random.default_rng(0).integers(0, 256, (n, res, res, 3), dtype=np.uint8)
    paths = [f"train/a/{i}.jpg" for i in range(n)]
    return ImageSplit("train", images, np.arange(n) % 2, paths, ["a", "b"], "fp0123456789abcd")


@pytest.fixture(scope="module")
def random_vit():
    from tune_pets.backbone import build_backbone

    return build_backbone(RunConfig(model="vit", pretrained=False))


def test_feature_key_differs_for_other_images_of_one_split():
    """Two val splits of one train split (other split_seed) share name and fingerprint
    (``subset`` keeps it); only the paths tell their features apart."""
    from tune_pets.features import feature_key

    split = _image_split()
    cfg, dc, cpu = RunConfig(model="vit", pretrained=False), {"img_size": 224}, torch.device("cpu")
    a, b = split.subset(np.array([0, 1, 2]), "val"), split.subset(np.array([3, 4, 5]), "val")
    assert a.fingerprint == b.fingerprint and a.name == b.name
    assert feature_key(cfg, dc, a, None, cpu) != feature_key(cfg, dc, b, None, cpu)


def test_feature_key_follows_the_preprocessing():
    """The backbone's data config (crop_pct, mean, std, ...) is part of the key: a timm
    upgrade that changes it must not reuse features made with the old one."""
    from tune_pets.features import feature_key

    split, cfg, cpu = _image_split(), RunConfig(model="vit", pretrained=False), torch.device("cpu")
    dc = {"img_size": 224, "crop_pct": 0.9, "interpolation": "bicubic",
          "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # fmt: skip
    assert feature_key(cfg, dc, split, None, cpu) != feature_key(
        cfg, {**dc, "crop_pct": 0.875}, split, None, cpu
    )


def test_augmented_views_are_different_crops(random_vit):
    """View k is seeded by k; every view seeded alike made V identical copies."""
    from tune_pets.features import extract
    from tune_pets.models import vit_data_config

    cfg = RunConfig(model="vit", pretrained=False)
    dc = vit_data_config(cfg)
    split = _image_split(n=2, res=64)
    v0 = extract(random_vit, split, dc, torch.device("cpu"), view=0, progress=False)
    v1 = extract(random_vit, split, dc, torch.device("cpu"), view=1, progress=False)
    assert not np.allclose(v0, v1)


def test_features_are_extracted_without_tf32(random_vit):
    """cuDNN's default TF32 convolutions made a GPU-made clean entry differ from a CPU-made one
    under one key; extraction turns TF32 off and restores the setting after."""
    from tune_pets.features import extract
    from tune_pets.models import vit_data_config

    seen = []
    hook = random_vit.patch_embed.register_forward_hook(
        lambda *_: seen.append(
            (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        )
    )
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        dc = vit_data_config(RunConfig(model="vit", pretrained=False))
        extract(random_vit, _image_split(n=2, res=64), dc, torch.device("cpu"), progress=False)
        assert seen == [(False, False)]
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        hook.remove()
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
