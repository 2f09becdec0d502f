"""CUDA paths (skipped without a GPU): bf16 autocast + channels_last training, batched
augmentation on the device, deterministic retrains, a train step without host syncs.
test_engine.py's fit/profiling equivalence check also runs on CUDA when there is one.

    python -m pytest tests/test_gpu.py tests/test_engine.py -q -m gpu
"""

from __future__ import annotations

import pytest
import torch

from tune_pets.data import _resized_crops_grid, train_augment
from tune_pets.engine import Engine, load_fit_data, precision
from tune_pets.models import get_spec
from tune_pets.train import fit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def _cnn(**kw):
    return get_spec("cnn").defaults.replace(
        img_size=32, width=8, depth=2, epochs=2, batch_size=8, **kw
    )


def _data(cfg, data_dir, cache_dir):
    return load_fit_data(
        cfg,
        data_dir,
        split_file=cache_dir / "split.json",
        cache_dir=cache_dir,
        device=CUDA,
        progress=False,
    )


def test_augmentation_on_cuda_matches_the_cpu_grid():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 40, 40, 3), dtype=torch.uint8, generator=gen)
    boxes = (torch.zeros(8), torch.zeros(8), torch.full((8,), 30.0), torch.full((8,), 36.0))
    flip = torch.arange(8) % 2 == 0
    cpu = _resized_crops_grid(x, *boxes, flip, 32)
    gpu = _resized_crops_grid(x.to(CUDA), *boxes, flip, 32).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3)
    out = train_augment(x.to(CUDA), 32, (0.5,) * 3, (0.5,) * 3, generator=gen)
    assert out.device.type == "cuda" and out.shape == (8, 3, 32, 32) and out.isfinite().all()


def test_fit_on_cuda_with_bf16_autocast(tiny_data, cache_dir):
    cfg = _cnn(amp=True)
    data = _data(cfg, tiny_data, cache_dir)
    result = fit(cfg, data, device=CUDA)
    major, _ = torch.cuda.get_device_capability(CUDA)
    assert result.precision == precision(cfg, CUDA) == ("bf16" if major >= 8 else "fp32")
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)
    assert result.checkpoint["state_dict"]["head.weight"].device.type == "cpu"


def test_deterministic_fit_on_cuda_is_repeatable(tiny_data, cache_dir):
    cfg = _cnn(deterministic=True)
    data = _data(cfg, tiny_data, cache_dir)
    a = fit(cfg, data, device=CUDA).checkpoint["state_dict"]
    b = fit(cfg, data, device=CUDA).checkpoint["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_step_never_waits_for_the_device(tiny_data, cache_dir):
    """``Engine.step`` keeps the loss on the device: no ``.item()``, no copy back, so the host
    can queue the next step while the GPU runs this one (the loss is checked once per epoch)."""
    cfg = _cnn(amp=True)
    engine = Engine(cfg, _data(cfg, tiny_data, cache_dir), CUDA)
    batches = list(engine.batches.train(1))
    assert len(batches) >= 3
    engine.step(*batches[0])  # first step: lazy CUDA/cuDNN initialisation may sync
    torch.cuda.synchronize(CUDA)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches[1:]:
            loss, logits = engine.step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.device.type == "cuda" and logits.device.type == "cuda"
    assert torch.isfinite(loss).item()


def test_vit_features_extracted_on_cuda(tiny_data, cache_dir):
    cfg = get_spec("vit").defaults.replace(pretrained=False, epochs=1)
    data = _data(cfg, tiny_data, cache_dir)
    assert data.kind == "features" and data.train_x.shape[-1] == 192
    (epoch,) = fit(cfg, data, device=CUDA).history
    assert torch.isfinite(torch.tensor(epoch["train_loss"]))
