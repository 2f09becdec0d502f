"""Shared fixtures: tiny ImageFolder trees written as real JPEGs, an isolated cache, the real
Oxford-IIIT Pet sample from ../shared when it is present. Running CLIs in a subprocess:
``tests/helpers.py``.

    python -m pytest -m "not slow"           # the fast tests first: a broken basic test fails early
    python -m pytest -m slow                 # then the end-to-end runs (real processes, real Ray)
    python -m pytest tests/test_engine.py    # one file

Timing, honestly (2 idle CPU cores, fresh clone, `bash .ci/run`): the fast set (~590 tests)
takes about 2 minutes, the slow set (~100: Ray searches, clusters, killed processes, pipelines)
about 23 (22.7-23.3 in the last five fresh-clone runs); with one core kept busy by another
process the slow set took 25-34 minutes.

Marking: ``@pytest.mark.slow`` on anything that starts a command in a subprocess and takes more
than a few seconds (interpreter + torch import alone costs 3-5 s), every Ray search, and the
pipeline runs. Cheap checks of the same code paths run in process (``cli_main(main, argv)``) and
stay unmarked, so ``-m "not slow"`` keeps covering the CLIs' argument handling.
``@pytest.mark.gpu`` marks tests that need CUDA; they skip themselves without it.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared/data/oxford_pets_sample"


def pytest_configure(config) -> None:
    """The Ctrl-C tests send SIGINT to the commands they start, which inherit this process's
    disposition of it. Run as a background job (``cmd &``, ``nohup``), pytest has SIGINT
    ignored, the commands then rightly ignore it too, and those tests failed (exit 0 for 130)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# One class name with a space, one with a space and a non-ASCII letter: both must survive the
# scan, the label order, the CSV headers and the confusion-matrix plot.
TINY_CLASSES = {
    "Abyssinian": (10, 4),
    "chat été": (10, 4),
    "golden retriever": (10, 4),
    "pug": (10, 4),
}


def _write_image_folder(
    root: Path, classes: dict[str, tuple[int, int]], size: tuple[int, int], seed: int
) -> Path:
    """Write ``root/{train,test}/<class>/<class>_<i>.jpg``: uniform noise over a strong
    class-dependent tint, so a small model can learn the classes in a few steps."""
    rng = np.random.default_rng(seed)
    w, h = size
    for k, (name, counts) in enumerate(classes.items()):
        tint = np.array(
            [(60 + 150 * ((k >> b) & 1) + 37 * k) % 256 for b in range(3)], dtype=np.float64
        )
        for split, n in zip(("train", "test"), counts, strict=True):
            if n == 0:
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.uniform(-50, 50, size=(h, w, 3))
                arr = np.clip(tint + noise, 0, 255).astype(np.uint8)
                Image.fromarray(arr, "RGB").save(folder / f"{name}_{i}.jpg", quality=90)
    return root


@pytest.fixture
def make_image_folder():
    """``make_image_folder(root, classes={"cat a": (n_train, n_test), ...}, size=(w, h), seed=0)``
    writes a real ImageFolder tree of JPEGs under ``root`` and returns ``root``."""

    def make(
        root: str | Path,
        classes: dict[str, tuple[int, int]] | None = None,
        size: tuple[int, int] = (48, 40),
        seed: int = 0,
    ) -> Path:
        return _write_image_folder(Path(root), dict(classes or TINY_CLASSES), size, seed)

    return make


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 classes x (10 train, 4 test) 48x40 JPEGs. Shared by the session: do not modify it."""
    return _write_image_folder(tmp_path_factory.mktemp("tiny_data"), TINY_CLASSES, (48, 40), 0)


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    """Decode/feature cache for one test. Always pass it (``--cache-dir``) to what you call."""
    return tmp_path / "cache"


@pytest.fixture(autouse=True, scope="session")
def _no_home_cache(tmp_path_factory):
    """Safety net: anything that forgets ``cache_dir`` writes to a temp dir, never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNE_PETS_CACHE", str(tmp_path_factory.mktemp("tune_pets_cache")))
        yield


@pytest.fixture
def sample_dir() -> Path:
    """The real Oxford-IIIT Pet sample (570 train / 411 test photos), skipped when absent."""
    if not (SAMPLE_DIR / "train").is_dir():
        pytest.skip(f"real data sample not found at {SAMPLE_DIR}")
    return SAMPLE_DIR
