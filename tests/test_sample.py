"""The photo sample shipped inside the package (tune_pets/sample_data) and scripts/make_sample.py.

python -m pytest tests/test_sample.py -q
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import PIL
import pytest
from PIL import Image

import tune_pets
import tune_pets.sample
from tune_pets.sample import SAMPLE_NAME, resolve_data_dir, sample_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "make_sample.py"
SIZE = 144  # shorter side of every shipped image (make_sample.py's default --size)
QUALITY = 85
N_BREEDS, MIN_TRAIN, MIN_TEST = 37, 5, 3
MAX_BYTES = 5 * 1024 * 1024


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _load_script():
    spec = importlib.util.spec_from_file_location("make_sample", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_dir_is_the_shipped_folder():
    root = sample_dir()
    assert root == Path(tune_pets.__file__).resolve().parent / "sample_data"
    assert (root / "train").is_dir() and (root / "test").is_dir()


def test_resolve_data_dir():
    assert SAMPLE_NAME == "sample"
    assert resolve_data_dir("sample") == sample_dir()
    assert resolve_data_dir("data/oxford_pets") == Path("data/oxford_pets")
    assert resolve_data_dir(Path("/x/y")) == Path("/x/y")
    # Only the exact string selects the sample: a local folder stays reachable as ./sample.
    assert resolve_data_dir("./sample") == Path("sample")
    assert resolve_data_dir("samples") == Path("samples")


def test_sample_module_imports_only_stdlib():
    code = (
        "import sys, tune_pets.sample; "
        "print(sorted(m for m in ('numpy', 'torch', 'PIL', 'ray', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert out.stdout.strip() == "[]"


def test_sample_layout_is_balanced_over_37_breeds():
    root = sample_dir()
    train = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    test = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    assert len(train) == N_BREEDS and test == train
    assert "Abyssinian" in train and "american_bulldog" in train  # dataset spelling kept
    for breed in train:
        n_train = len(list((root / "train" / breed).glob("*.jpg")))
        n_test = len(list((root / "test" / breed).glob("*.jpg")))
        assert n_train >= MIN_TRAIN, f"train/{breed}: {n_train} images"
        assert n_test >= MIN_TEST, f"test/{breed}: {n_test} images"
    # Nothing else in it: the two splits of JPEGs and the README.
    for rel in _files(root):
        assert rel == "README.md" or (
            rel.split("/")[0] in ("train", "test") and rel.endswith(".jpg")
        ), rel


def test_sample_total_size_is_small():
    total = sum(p.stat().st_size for p in _files(sample_dir()).values())
    assert 0 < total <= MAX_BYTES, f"{total:,} bytes"


def test_every_sample_image_is_an_rgb_jpeg_of_the_requested_size():
    images = [p for rel, p in _files(sample_dir()).items() if rel != "README.md"]
    assert len(images) >= N_BREEDS * (MIN_TRAIN + MIN_TEST)
    for path in images:
        assert path.stem.startswith(path.parent.name + "_"), path  # original stems kept
        with Image.open(path) as img:
            assert img.format == "JPEG", path
            assert img.mode == "RGB", path
            assert min(img.size) == SIZE, (path, img.size)
            img.load()  # decodes fully: not truncated


def test_sample_readme_states_source_and_license():
    text = (sample_dir() / "README.md").read_text(encoding="utf-8")
    for needle in (
        "Oxford-IIIT Pet",
        "Parkhi",
        "Vedaldi",
        "Zisserman",
        "Jawahar",
        "Cats and Dogs",
        "CVPR",
        "https://www.robots.ox.ac.uk/~vgg/data/pets/",
        "CC BY-SA 4.0",
        "original owners",
        f"--size {SIZE} --quality {QUALITY}",
    ):
        assert needle in text, needle


def test_make_sample_regenerates_the_shipped_folder_byte_for_byte(sample_dir, tmp_path):
    # ``sample_dir`` here is conftest's fixture: the original photos in ../shared (skips when
    # absent), not tune_pets.sample.sample_dir.
    readme = (tune_pets.sample.sample_dir() / "README.md").read_text(encoding="utf-8")
    recorded = re.search(r"with Pillow (\S+),", readme)
    if recorded and recorded.group(1) != PIL.__version__:
        pytest.skip(
            f"made with Pillow {recorded.group(1)}, this is {PIL.__version__}: JPEG "
            "bytes may differ between builds"
        )
    out = tmp_path / "regen"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--source", str(sample_dir), "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    shipped, regen = _files(resolve_data_dir(SAMPLE_NAME)), _files(out)
    assert sorted(regen) == sorted(shipped)
    differ = [rel for rel in shipped if shipped[rel].read_bytes() != regen[rel].read_bytes()]
    assert not differ, f"{len(differ)} files differ, e.g. {differ[:3]}"


def test_make_sample_converts_quirk_files_and_picks_by_numeric_id(tmp_path, make_image_folder):
    src = make_image_folder(tmp_path / "src", {"Bengal": (12, 4), "pug": (12, 4)}, size=(60, 45))
    # The dataset's quirks: a GIF and an RGBA PNG, both named .jpg, among the chosen ids.
    Image.new("P", (50, 70), 3).save(src / "train" / "Bengal" / "Bengal_0.jpg", format="GIF")
    rgba = Image.new("RGBA", (80, 40), (255, 0, 0, 0))
    rgba.save(src / "test" / "pug" / "pug_0.jpg", format="PNG")
    make_sample = _load_script()
    out = tmp_path / "out"
    make_sample.build(src, out, per_train=5, per_test=3, size=32, quality=85)

    files = _files(out)
    # Numeric order: _0.._4, not the string order _0, _1, _10, _11, _2.
    assert [r for r in files if r.startswith("train/Bengal/")] == [
        f"train/Bengal/Bengal_{i}.jpg" for i in range(5)
    ]
    assert sum(r.startswith("test/pug/") for r in files) == 3
    for rel, path in files.items():
        if rel == "README.md":
            continue
        with Image.open(path) as img:
            assert (img.format, img.mode, min(img.size)) == ("JPEG", "RGB", 32), rel
    with Image.open(out / "test" / "pug" / "pug_0.jpg") as img:
        assert img.size == (64, 32)
        r, g, b = img.getpixel((32, 16))
        assert min(r, g, b) > 240  # fully transparent red composited on white, not red
    readme = files["README.md"].read_text(encoding="utf-8")
    assert "`train/Bengal/Bengal_0.jpg` (GIF)" in readme
    assert "`test/pug/pug_0.jpg` (PNG)" in readme
    make_sample.build(src, out, per_train=5, per_test=3, size=32, quality=85)  # replaces it
    (out / "notes.txt").write_text("mine")  # no longer only a sample: refused, kept
    with pytest.raises(SystemExit, match=r"--out .* holds other files than a sample's"):
        make_sample.build(src, out, per_train=5, per_test=3, size=32, quality=85)
    assert (out / "notes.txt").read_text() == "mine" and (out / "README.md").is_file()


def test_make_sample_refuses_a_breed_with_too_few_images(tmp_path, make_image_folder):
    src = make_image_folder(tmp_path / "src", {"Bengal": (5, 3), "pug": (4, 3)})
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"train/pug has 4 < 5"):
        _load_script().build(src, out, per_train=5, per_test=3, size=32, quality=85)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [src]  # no temporary folder left behind
