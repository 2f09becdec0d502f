"""prepare: every source (hub dataset, a local parquet copy of it, the official release,
torchvision's root) through the same writer, with the original breed names and JPEG bytes;
atomic and idempotent output, cleanup after a killed run, and accurate, fast failures offline.

    python -m pytest tests/test_prepare.py -q
"""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import env, run
from PIL import Image

from tune_pets import hub
from tune_pets import prepare as prep
from tune_pets.utils import UserError, cli_main

# The 37 breeds as the original files name them, in the official class-id order (1-37).
BREEDS = [
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle",
    "Bengal", "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau",
    "english_cocker_spaniel", "english_setter", "german_shorthaired", "great_pyrenees",
    "havanese", "japanese_chin", "keeshond", "leonberger", "Maine_Coon", "miniature_pinscher",
    "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll", "Russian_Blue", "saint_bernard",
    "samoyed", "scottish_terrier", "shiba_inu", "Siamese", "Sphynx",
    "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
]  # fmt: skip
# From the real sample: a cat, a two-word cat and a dog; Abyssinian holds the dataset's GIF
# (train) and RGBA PNG (test) named .jpg. A few photos per split keep it fast.
SAMPLE_BREEDS = ("Abyssinian", "British_Shorthair", "american_bulldog")
QUIRKS = ("train/Abyssinian/Abyssinian_34.jpg", "test/Abyssinian/Abyssinian_5.jpg")
PER_SPLIT = 3


# ---------------------------------------------------------------- helpers and fixtures
def _noise(h: int = 40, w: int = 48, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


def _encode(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    if fmt == "GIF":
        img = img.convert("P")
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _rgba(seed: int = 0) -> np.ndarray:
    arr = np.dstack([_noise(seed=seed), np.full((40, 48), 255, np.uint8)])
    arr[:10, :, 3] = 0  # transparent top rows: must become white, not black
    return arr


def _run_cli(argv: list[str]) -> int:
    """Run the prepare CLI in-process the way ``python -m`` does; return its exit code."""
    with pytest.raises(SystemExit) as exc:
        cli_main(prep.main, argv, prog="python -m tune_pets.prepare")
    return exc.value.code


def _tree(root: Path) -> dict[str, bytes]:
    """Every image below ``root`` by relative path (the marker, which names the source, aside)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != prep.MARKER
    }


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Hugging Face caches in tmp_path: nothing read from or written to ~/.cache.

    datasets and huggingface_hub read these paths from the environment once, at import, so
    their module constants are set too."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    return tmp_path / "hf"


@pytest.fixture
def online_mode(monkeypatch, hf_cache):
    """HF_HUB_OFFLINE and its relatives unset, as on a machine that expects a network."""
    import datasets
    from huggingface_hub import constants

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(datasets.config, attr):  # datasets 2.18 has only HF_DATASETS_OFFLINE
            monkeypatch.setattr(datasets.config, attr, False)


def _hf_dataset():
    """An in-memory DatasetDict shaped like timm/oxford-iiit-pet (built offline): lowercase
    ClassLabel names, original file names in image_id; the test split lacks image_id."""
    import datasets

    names = ["abyssinian", "american_bulldog", "british_shorthair"]
    train = datasets.Dataset.from_dict(
        {
            "image": [
                {"bytes": _encode(_noise(seed=1), "JPEG"), "path": None},
                {"bytes": _encode(_rgba(seed=2), "PNG", "RGBA"), "path": None},
                {"bytes": _encode(_noise(seed=3), "GIF"), "path": None},
                {"bytes": _encode(_noise(seed=4), "JPEG"), "path": None},
            ],
            "label": [0, 0, 1, 2],
            "image_id": [
                "Abyssinian_1",
                "Abyssinian_2",
                "american_bulldog_3",
                "British_Shorthair_4.jpg",
            ],
            "label_cat_dog": [0, 0, 1, 0],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.ClassLabel(names=names),
                "image_id": datasets.Value("string"),
                "label_cat_dog": datasets.ClassLabel(names=["cat", "dog"]),
            }
        ),
    )
    test = datasets.Dataset.from_dict(  # no image_id column: stems fall back to <breed>_<index>
        {
            "image": [Image.fromarray(_noise(seed=5)), Image.fromarray(_noise(seed=6))],
            "label": [1, 1],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
        ),
    )
    return datasets.DatasetDict({"train": train, "test": test}), train


def _write_release(root: Path, files: dict[str, dict[str, bytes]], comments: bool = True) -> Path:
    """The official release layout: ``root/images/<name>.jpg`` and
    ``root/annotations/{trainval,test}.txt`` with lines ``NAME CLASS_ID SPECIES BREED_ID``.

    ``files`` maps a split ("train"/"test") to ``{image name: bytes}``."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for split, list_name in (("train", "trainval.txt"), ("test", "test.txt")):
        lines = ["# Image CLASS-ID SPECIES BREED ID", "# made for tests"] if comments else []
        for name, data in files[split].items():
            (root / "images" / name).write_bytes(data)
            stem = Path(name).stem
            breed = stem.rpartition("_")[0]
            species = 1 if breed[0].isupper() else 2  # cats are Capitalized in the release
            lines.append(f"{stem} {BREEDS.index(breed) + 1} {species} 1")
        (root / "annotations" / list_name).write_text("\n".join(lines) + "\n")
    return root


def _noise_release(root: Path, n: int = 2) -> Path:
    files = {
        split: {
            f"{breed}_{i + 100 * k + 1000 * j}.jpg": _encode(
                _noise(seed=i + 100 * k + 1000 * j), "JPEG"
            )
            for k, breed in enumerate(("Persian", "american_bulldog"))
            for i in range(n)
        }
        for j, split in enumerate(("train", "test"))
    }
    return _write_release(root, files)


def _append(path: Path, line: str) -> None:
    with path.open("a") as f:
        f.write(line + "\n")


# ---------------------------------------------------------------- breed names
@pytest.mark.parametrize(
    ("stem", "breed"),
    [
        ("Persian_98", "Persian"),
        ("american_bulldog_12", "american_bulldog"),
        ("British_Shorthair_5", "British_Shorthair"),
        ("Abyssinian_1.jpg", "Abyssinian"),
        ("noid", None),
        ("pug_", None),
        ("_12", None),
        ("pug_1a", None),
        (None, None),
    ],
)
def test_breed_from_stem(stem, breed):
    assert prep.breed_from_stem(stem) == breed


def test_breed_names_use_stems_only_when_one_to_one():
    rows = [(0, "Persian_1"), (0, "Persian_2"), (1, "pug_3"), (1, None)]
    assert prep.breed_names(rows, ["persian", "pug"]) == {0: "Persian", 1: "pug"}
    # Two classes whose stems say the same breed, or one class with two: the label names.
    clash = [(0, "img_1"), (1, "img_2")]
    assert prep.breed_names(clash, ["a", "b"]) == {0: "a", 1: "b"}
    split = [(0, "Persian_1"), (0, "Sphynx_2")]
    assert prep.breed_names(split, ["cat"]) == {0: "cat"}
    # One stray stem among many names no new breed (it renamed every class to the labels).
    stray = [(0, "Persian_1"), (0, "Persian_2"), (0, "Sphynx_3"), (1, "pug_4")]
    assert prep.breed_names(stray, ["persian", "pug"]) == {0: "Persian", 1: "pug"}
    # An id with a folder in it (images/...) names its file, not a breed "images/Persian".
    assert prep.breed_names([(0, "images/Persian_1.jpg")], ["persian"]) == {0: "Persian"}
    assert prep.breed_names(clash) == {}  # no fallback: the caller must refuse


# ---------------------------------------------------------------- the writer (HF datasets)
def test_a_build_removes_only_its_own_stale_temp_folders(tmp_path):
    """The stale-temp glob was not escaped: building pets[1] deleted pets1's temp folder, the
    work in progress of another prepare (it holds another lock)."""
    other = tmp_path / "pets1.tmp-other"
    (other / "train").mkdir(parents=True)
    splits = {"train": ([(_encode(_noise(), "JPEG"), "cat", "cat_1")], 1)}
    splits["test"] = ([(_encode(_noise(), "JPEG"), "cat", "cat_2")], 1)
    prep.build_atomically(splits, tmp_path / "pets[1]", source="test", progress=False)
    assert other.is_dir() and prep.is_prepared(tmp_path / "pets[1]")


def test_write_dataset_from_hf_dataset(tmp_path):
    from tune_pets.data import scan_split

    dd, train = _hf_dataset()
    out = prep.write_dataset(dd, tmp_path / "pets", progress=False)

    # Breed names as the files name them, not the lowercase labels and not "0".."2".
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "Abyssinian", "British_Shorthair", "american_bulldog"]  # fmt: skip
    assert sorted(p.name for p in (out / "test" / "american_bulldog").iterdir()) == [
        "american_bulldog_0.jpg", "american_bulldog_1.jpg"]  # fmt: skip
    # A JPEG source is copied byte for byte.
    first = train.cast_column("image", __import__("datasets").Image(decode=False))[0]["image"]
    assert (out / "train/Abyssinian/Abyssinian_1.jpg").read_bytes() == first["bytes"]
    # PNG (RGBA) and GIF sources become real RGB JPEGs; transparency becomes white.
    for rel in (
        "train/Abyssinian/Abyssinian_2.jpg",
        "train/american_bulldog/american_bulldog_3.jpg",
    ):
        with Image.open(out / rel) as img:
            assert (img.format, img.mode) == ("JPEG", "RGB")
    with Image.open(out / "train/Abyssinian/Abyssinian_2.jpg") as img:
        assert np.asarray(img)[:8].min() > 240
    marker = json.loads((out / prep.MARKER).read_text())
    assert (out / "train/British_Shorthair/British_Shorthair_4.jpg").is_file()  # no ".jpg.jpg"
    assert marker["counts"] == {"train": 4, "test": 2}
    assert marker["num_classes"] == 3
    assert marker["converted_to_jpeg"] == 4  # the PNG, the GIF and the two PIL images
    assert not list(tmp_path.glob("*.tmp-*")), "the temp build dir must be renamed away"
    assert not list(tmp_path.glob("*.lock")), "the lock file must be removed"
    # The training code reads what prepare wrote.
    index = scan_split(out, "train")
    assert index.classes == ["Abyssinian", "British_Shorthair", "american_bulldog"]
    assert len(index.paths) == 4 and index.ignored == []


def test_hf_dataset_with_a_leak_or_a_stray_image_id(tmp_path, capsys):
    """An image in train and test is refused (as in the release's lists); one row whose image_id
    names another breed is filed by its label with a warning, and renames no class."""
    import datasets

    dd, train = _hf_dataset()
    with pytest.raises(UserError, match="Abyssinian_1 is in train and in a held-out split"):
        prep.write_dataset(datasets.DatasetDict(train=train, test=train), tmp_path / "leak")
    assert not (tmp_path / "leak").exists()
    third = train.select([0]).map(lambda r: {"image_id": "Abyssinian_7"})
    stray = datasets.concatenate_datasets([train, third]).map(
        lambda r, i: {"image_id": "american_bulldog_9"} if i == 1 else {}, with_indices=True
    )
    out = prep.write_dataset(datasets.DatasetDict(train=stray, test=dd["test"]), tmp_path / "p")
    assert "1 of 5 image_id(s) name another breed" in capsys.readouterr().err
    assert (out / "train" / "Abyssinian" / "american_bulldog_9.jpg").is_file()
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "Abyssinian", "British_Shorthair", "american_bulldog"]  # fmt: skip


def test_hf_dataset_without_usable_image_ids_uses_label_names(tmp_path):
    import datasets

    names = ["Abyssinian", "odd/name"]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=names),
            "image_id": datasets.Value("string"),
        }  # fmt: skip
    )
    rows = {"image": [Image.fromarray(_noise(seed=s)) for s in range(3)], "label": [0, 1, 1],
            "image_id": ["img_1", "img_2", ""]}  # fmt: skip
    ds = datasets.Dataset.from_dict(rows, features=features)
    held_out = ds.select([2])  # no image_id: in no other split
    out = prep.write_dataset(
        datasets.DatasetDict(train=ds, test=held_out), tmp_path / "pets", progress=False
    )
    assert sorted(p.name for p in (out / "train").iterdir()) == ["Abyssinian", "odd_name"]
    assert sorted(p.name for p in (out / "train/odd_name").iterdir()) == [
        "img_2.jpg",
        "odd_name_2.jpg",
    ]


def test_prepare_is_idempotent(tmp_path, capsys):
    dd, _ = _hf_dataset()
    out = prep.write_dataset(dd, tmp_path / "pets", progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    class Exploding(dict):
        def __getitem__(self, key):
            raise AssertionError("a prepared folder must not be rewritten")

    assert prep.write_dataset(Exploding(train=1, test=1), out, progress=False) == out
    assert prep.prepare(out, dataset="no/such-dataset", progress=False) == out  # no download
    assert prep.prepare(out, from_dir=tmp_path / "nowhere", progress=False) == out
    assert _run_cli(["--output-dir", str(out), "--no-progress"]) == 0
    assert "already prepared" in capsys.readouterr().out
    # Asked for another source by name: said, not silently ignored.
    assert _run_cli(["--output-dir", str(out), "--from", str(tmp_path / "nowhere")]) == 2
    line = capsys.readouterr().err.strip()
    assert "already prepared, from" in line and "nowhere" in line and "\n" not in line
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_source_whose_path_only_starts_like_the_one_used_is_another_source(tmp_path, capsys):
    """The check was a substring test: made from release /x/pets_old, --from /x/pets passed."""
    out = prep.write_dataset(_hf_dataset()[0], tmp_path / "pets", progress=False)
    marker = json.loads((out / prep.MARKER).read_text(encoding="utf-8"))
    used = tmp_path / "pets_release_old"
    marker["source"] = f"release {used}"
    (out / prep.MARKER).write_text(json.dumps(marker), encoding="utf-8")
    assert _run_cli(["--output-dir", str(out), "--from", str(used)]) == 0
    assert _run_cli(["--output-dir", str(out), "--from", str(tmp_path / "pets_release")]) == 2
    assert "already prepared, from" in capsys.readouterr().err


def test_output_dir_that_is_a_link_to_an_empty_folder(tmp_path):
    """It was built in full next to the link, then failed ("Not a directory") on renaming."""
    (tmp_path / "big_disk" / "pets").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pets").symlink_to(tmp_path / "big_disk" / "pets")
    release = _noise_release(tmp_path / "release")
    prep.prepare(tmp_path / "data" / "pets", from_dir=release, progress=False)
    assert prep.is_prepared(tmp_path / "big_disk" / "pets")
    assert (tmp_path / "data" / "pets").is_symlink()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["pets"], "no temp left"


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    dd, _ = _hf_dataset()
    real, calls = prep._jpeg_bytes, []

    def flaky(image):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(image)

    monkeypatch.setattr(prep, "_jpeg_bytes", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        prep.write_dataset(dd, tmp_path / "pets", progress=False)
    assert list(tmp_path.iterdir()) == [], "no output dir, temp dir or lock file may be left"


def test_non_empty_folder_without_marker_is_refused(tmp_path):
    out = tmp_path / "pets"
    (out / "train").mkdir(parents=True)
    dd, _ = _hf_dataset()
    with pytest.raises(UserError, match="not empty"):
        prep.write_dataset(dd, out, progress=False)
    # An empty folder is fine: it is replaced by the prepared one.
    (out / "train").rmdir()
    assert prep.is_prepared(prep.write_dataset(dd, out, progress=False))


@pytest.mark.parametrize("name", [".", ".."])
def test_output_dir_without_a_name_is_refused(tmp_path, monkeypatch, name):
    """The finished folder is renamed into place: '.' once crashed in Path.with_name."""
    monkeypatch.chdir(tmp_path)
    dd, _ = _hf_dataset()
    with pytest.raises(UserError, match=rf"^--output-dir {re.escape(name)}: name a folder"):
        prep.write_dataset(dd, Path(name), progress=False)
    assert sorted(tmp_path.iterdir()) == []


def test_write_image_folder_duplicates_and_undecodable_bytes(tmp_path):
    jpeg = _encode(_noise(), "JPEG")
    examples = [(jpeg, "a", "x"), (jpeg, "a", "x"), (b"not an image", "a", "y"), (jpeg, "b", "")]
    result = prep.write_image_folder({"train": (examples, 4)}, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "train/a").iterdir()) == ["x.jpg", "x_1.jpg"]
    assert [p.name for p in (tmp_path / "train/b").iterdir()] == ["b_3.jpg"]
    assert result["splits"] == {"train": {"a": 2, "b": 1}}
    assert len(result["skipped"]) == 1 and "train/a/y" in result["skipped"][0]


# ---------------------------------------------------------------- every real source, one writer
def _sample_subset(sample_dir: Path) -> dict[str, dict[str, bytes]]:
    """{split: {file name: original bytes}}: a few photos of SAMPLE_BREEDS plus the quirks."""
    files: dict[str, dict[str, bytes]] = {"train": {}, "test": {}}
    for split in files:
        for breed in SAMPLE_BREEDS:
            for p in sorted((sample_dir / split / breed).glob("*.jpg"))[:PER_SPLIT]:
                files[split][p.name] = p.read_bytes()
    for rel in QUIRKS:
        split, _, name = rel.split("/")
        files[split][name] = (sample_dir / rel).read_bytes()
    return files


def _write_parquet_copy(root: Path, files: dict[str, dict[str, bytes]]) -> Path:
    """A local copy of timm/oxford-iiit-pet with the hub's schema and file names:
    ``root/data/{train,test}-00000-of-00001.parquet``."""
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[b.lower() for b in BREEDS]),
            "image_id": datasets.Value("string"),
            "label_cat_dog": datasets.ClassLabel(names=["cat", "dog"]),
        }
    )
    for split, images in files.items():
        stems = [Path(name).stem for name in images]
        breeds = [stem.rpartition("_")[0] for stem in stems]
        ds = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": data, "path": None} for data in images.values()],
                "label": [BREEDS.index(b) for b in breeds],
                "image_id": stems,
                "label_cat_dog": [0 if b[0].isupper() else 1 for b in breeds],
            },
            features=features,
        )
        (root / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_every_source_gives_the_same_image_folder(sample_dir, tmp_path, hf_cache):
    """The official release, torchvision's root and a parquet copy of the hub dataset, built
    from the same original files, give identical folders: the sample's breed names and counts,
    JPEG bytes unchanged, the GIF and the PNG converted."""
    import torchvision

    assert sorted(p.name for p in (sample_dir / "train").iterdir()) == sorted(BREEDS)
    files = _sample_subset(sample_dir)
    release = _write_release(tmp_path / "release", files)
    tv_root = tmp_path / "tv"
    # torchvision's own layout: no comment lines (its reader would choke on them).
    _write_release(tv_root / "oxford-iiit-pet", files, comments=False)
    assert len(torchvision.datasets.OxfordIIITPet(tv_root, split="trainval")) == len(files["train"])
    parquet = _write_parquet_copy(tmp_path / "parquet", files)

    sources = {
        "release": ["--from", str(release)],
        "torchvision": ["--from", str(tv_root)],
        "parquet": ["--dataset", str(parquet)],
    }
    trees = {}
    for name, args in sources.items():
        out = tmp_path / f"out_{name}"
        assert _run_cli([*args, "--output-dir", str(out), "--no-progress"]) == 0, name
        trees[name] = _tree(out)
        marker = json.loads((out / prep.MARKER).read_text())
        assert marker["classes"] == sorted(SAMPLE_BREEDS), name
        assert marker["counts"] == {s: len(f) for s, f in files.items()}, name
        assert marker["converted_to_jpeg"] == len(QUIRKS), name
    assert trees["release"] == trees["torchvision"] == trees["parquet"]

    expected = {
        f"{split}/{Path(n).stem.rpartition('_')[0]}/{n}" for split in files for n in files[split]
    }
    assert set(trees["release"]) == expected  # the sample's own relative paths
    for rel, data in trees["release"].items():
        original = (sample_dir / rel).read_bytes()
        if rel in QUIRKS:
            with Image.open(io.BytesIO(data)) as img:
                assert (img.format, img.mode) == ("JPEG", "RGB")
        else:
            assert data == original, f"{rel}: JPEG bytes changed"


def test_release_without_comment_lines_or_torchvision_layout_detected(tmp_path):
    _noise_release(tmp_path / "tv" / "oxford-iiit-pet")
    assert prep.release_root(tmp_path / "tv") == tmp_path / "tv" / "oxford-iiit-pet"
    out = prep.prepare(tmp_path / "pets", from_dir=tmp_path / "tv", progress=False)
    marker = json.loads((out / prep.MARKER).read_text())
    assert marker["classes"] == ["Persian", "american_bulldog"]
    assert "torchvision" in marker["source"]


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda d: d.mkdir(), "neither the official Oxford-IIIT Pet release"),
        (lambda d: (d / "train" / "pug").mkdir(parents=True), "looks like an ImageFolder already"),
        (lambda d: None, "folder not found"),
        (
            lambda d: (_noise_release(d), (d / "images" / "Persian_1.jpg").unlink()),
            "1 image(s) named in annotations/ are missing (e.g. Persian_1.jpg)",
        ),
        (
            lambda d: (
                _noise_release(d),
                _append(d / "annotations" / "test.txt", "Persian_0 24 1 1"),
            ),
            "Persian_0 is listed in both trainval.txt and test.txt",
        ),
        (
            lambda d: (
                _noise_release(d),
                _append(d / "annotations" / "trainval.txt", "Persian_0 24 1 1"),
            ),
            "Persian_0 is listed again (first on line",
        ),
        (
            lambda d: (
                _noise_release(d),
                (d / "annotations" / "test.txt").write_text("Persian_0\n"),
            ),
            "test.txt:1: expected 'IMAGE CLASS_ID SPECIES BREED_ID'",
        ),
        (
            lambda d: (_noise_release(d), (d / "annotations" / "test.txt").write_text("# none\n")),
            "test.txt: lists no images",
        ),
        (  # trainval.txt, the first image, was blamed: "cannot tell the breed of Persian_0"
            lambda d: (
                _noise_release(d),
                (d / "annotations" / "test.txt").write_text(
                    (d / "annotations" / "test.txt")
                    .read_text()
                    .replace("Persian_1001 24", "Persian_1001 99")
                ),
            ),
            "test.txt: Persian_1001 has class id 99, but 3 other Persian image(s) have 24",
        ),
        (  # a traceback (UnicodeDecodeError)
            lambda d: (
                _noise_release(d),
                (d / "annotations" / "test.txt").write_text("Persian_0 24 1 1\n", "utf-16"),
            ),
            "test.txt: not UTF-8 text; save it as UTF-8",
        ),
    ],
    ids=[
        "empty",
        "imagefolder",
        "absent",
        "missing-image",
        "in-both",
        "twice",
        "bad-line",
        "empty-list",
        "wrong-class-id",
        "utf-16",
    ],  # fmt: skip
)
def test_bad_from_dir_is_one_line(tmp_path, capsys, make, expect):
    src = tmp_path / "src"
    make(src)
    out = tmp_path / "pets"
    assert _run_cli(["--from", str(src), "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert err.startswith("python -m tune_pets.prepare: error: ")
    assert not list(tmp_path.glob("pets*")), "no output, temp dir or lock file"


def test_from_and_dataset_are_exclusive(tmp_path, capsys):
    args = ["--from", str(tmp_path), "--dataset", "x/y", "--output-dir", str(tmp_path / "o")]
    assert _run_cli(args) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_help_names_the_local_sources(capsys):
    # Help text and defaults of every option are checked for all commands in test_layout_cli.
    assert _run_cli(["--help"]) == 0
    text = capsys.readouterr().out
    assert "torchvision" in text and "parquet" in text and "annotations" in text


# ---------------------------------------------------------------- killed and concurrent runs
def test_killed_run_leaves_nothing_after_the_next_run(tmp_path):
    release = _noise_release(tmp_path / "release", n=20)
    out = tmp_path / "pets"
    slow_prepare = (
        "import sys, time\n"
        "from tune_pets import prepare as prep\n"
        "real = prep._jpeg_bytes\n"
        "prep._jpeg_bytes = lambda image: (time.sleep(0.2), real(image))[1]\n"
        "prep.main(sys.argv[1:])\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            slow_prepare,
            "--from",
            str(release),
            "--output-dir",
            str(out),
            "--no-progress",
        ],  # fmt: skip
        cwd=tmp_path,  # a relative write would land in tmp_path, which is checked below
        env=env(),  # the checkout importable from there
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(tmp_path.glob("pets.tmp-*/train/*/*.jpg")):
            assert proc.poll() is None, "the slowed prepare ended before it was killed"
            assert time.monotonic() < deadline, "the slowed prepare wrote nothing in 60 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup handler runs, as when a machine dies
        proc.wait()
    assert list(tmp_path.glob("pets.tmp-*")) and not out.exists()  # what a killed run leaves

    assert _run_cli(["--from", str(release), "--output-dir", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pets", "release"]
    assert json.loads((out / prep.MARKER).read_text())["counts"] == {"train": 40, "test": 40}


def test_second_run_on_the_same_output_is_refused(tmp_path):
    release = _noise_release(tmp_path / "release")
    out = tmp_path / "pets"
    with prep._exclusive(out):  # another prepare is writing it
        with pytest.raises(UserError, match="another prepare is writing it"):
            prep.prepare(out, from_dir=release, progress=False)
        assert not out.exists()
    assert prep.is_prepared(prep.prepare(out, from_dir=release, progress=False))


# ---------------------------------------------------------------- the hub: failures, offline
def test_prepare_offline_fails_with_one_line(tmp_path):
    out = tmp_path / "pets"
    t0 = time.perf_counter()
    # helpers.env sets HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1
    r = run("prepare", ["--output-dir", out, "--no-progress"], tmp_path, timeout=120,
            extra_env={"HF_HOME": str(tmp_path / "hf")})  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "Hugging Face hub is unreachable" in lines[0] and "--data-dir" in lines[0]
    assert "HF_HUB_OFFLINE is set" in lines[0] and "--from DIR" in lines[0]
    assert not out.exists() and not list(tmp_path.glob("pets.tmp-*"))
    print(f"offline prepare CLI (HF_HUB_OFFLINE=1) failed in {elapsed:.1f} s")


def test_unreachable_hub_fails_fast_without_offline_flag(tmp_path, online_mode, capsys):
    """HF_HUB_OFFLINE unset and no network: seconds, not ~25 s of retries."""
    if hub.hub_unreachable() is None:
        pytest.skip("the hub is reachable here: the download would succeed")
    out = tmp_path / "pets"
    t0 = time.perf_counter()
    assert _run_cli(["--output-dir", str(out), "--no-progress"]) == 2
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, f"took {elapsed:.1f} s"  # the retries sleep 23 s; generous for load
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Hugging Face hub is unreachable" in err and "not in the local cache" in err
    for hint in ("--from DIR", "--dataset DIR", "--data-dir DIR"):
        assert hint in err, hint
    assert not out.exists() and not list(tmp_path.glob("pets.tmp-*"))


def _raise(error: BaseException):
    def load_dataset(*args, **kwargs):
        raise error

    return load_dataset


def _not_found() -> BaseException:
    from datasets.exceptions import DatasetNotFoundError

    return DatasetNotFoundError("Dataset 'no/such' doesn't exist on the Hub or cannot be accessed.")


@pytest.mark.parametrize(
    ("error", "expect", "not_expect"),
    [
        (_not_found, "no such dataset on the Hugging Face hub", "unreachable"),
        (
            lambda: ValueError("bad config name"),
            "could not load it (ValueError: bad config name)",
            "unreachable",
        ),
        (
            lambda: ConnectionError("Couldn't reach 'no/such' on the Hub"),
            "hub is unreachable",
            "no such",
        ),
        (lambda: TimeoutError("read timed out"), "hub is unreachable", "no such"),
    ],
    ids=["not-found", "other", "connection", "timeout"],
)
def test_hub_errors_are_told_apart(monkeypatch, online_mode, error, expect, not_expect):
    """ "Unreachable" is said for network errors only (the hub answered: probe says reachable)."""
    import datasets

    monkeypatch.setattr(prep, "hub_unreachable", lambda *a, **k: None)
    monkeypatch.setattr(datasets, "load_dataset", _raise(error()))
    with pytest.raises(UserError) as e:
        prep.load_hf_dataset("no/such", progress=False)
    msg = str(e.value)
    assert expect in msg and not_expect not in msg and "\n" not in msg


@pytest.mark.parametrize("variable", ["HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_message_names_the_variable_that_is_set(monkeypatch, online_mode, variable):
    """Offline by another variable than HF_HUB_OFFLINE: the message names that one."""
    import datasets

    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(prep, "hub_unreachable", lambda *a, **k: pytest.fail("probed the hub"))
    monkeypatch.setattr(datasets, "load_dataset", _raise(ConnectionError("offline mode")))
    with pytest.raises(UserError) as e:
        prep.load_hf_dataset("timm/oxford-iiit-pet", progress=False)
    msg = str(e.value)
    assert f"({variable} is set)" in msg and "HF_HUB_OFFLINE" not in msg, msg


def test_unreachable_hub_still_uses_the_datasets_cache(monkeypatch, online_mode):
    """No network: the load runs in offline mode (fast, cache only) instead of not at all."""
    import datasets
    from huggingface_hub import constants

    seen = []
    monkeypatch.setattr(prep, "hub_unreachable", lambda *a, **k: "huggingface.co: no route")
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name: seen.append(constants.HF_HUB_OFFLINE) or "cached"
    )
    assert prep.load_hf_dataset("timm/oxford-iiit-pet", progress=False) == "cached"
    assert seen == [True] and constants.HF_HUB_OFFLINE is False  # restored afterwards


def test_local_dataset_folder_that_is_not_a_dataset_is_one_line(tmp_path, hf_cache):
    import datasets

    # A mistyped folder: not taken for a hub id (offline, the hub error told the user to pass
    # --dataset DIR, which they had).
    for missing in ("./copy", str(tmp_path / "copy"), "data/pets/parquet"):
        with pytest.raises(UserError, match=rf"^--dataset {re.escape(missing)}: folder not found"):
            prep.load_hf_dataset(missing, progress=False)

    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"^--dataset .*copy: no parquet files in it"):
        prep.load_hf_dataset(str(tmp_path / "copy"), progress=False)
    # Parquet files without images: the source is named, not a traceback.
    table = datasets.Dataset.from_dict({"text": ["a", "b"]})
    table.to_parquet(str(tmp_path / "copy" / "train-00000-of-00001.parquet"))
    table.to_parquet(str(tmp_path / "copy" / "test-00000-of-00001.parquet"))
    with pytest.raises(UserError, match=r"copy: has no image column and class-label column"):
        prep.prepare(tmp_path / "pets", dataset=str(tmp_path / "copy"), progress=False)


def test_a_dataset_row_without_an_image_is_skipped_and_listed(tmp_path, hf_cache):
    """A parquet copy with a null image cell: that row is skipped and listed like an
    undecodable image (it was a TypeError traceback), the rest is written."""
    import datasets

    def jpeg(shade: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (shade, 90, 160)).save(buf, format="JPEG")
        return buf.getvalue()

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["abyssinian", "beagle"]),
            "image_id": datasets.Value("string"),
        }
    )
    for split in ("train", "test"):
        stems = [f"{b}_{i}" for b in ("Abyssinian", "beagle") for i in range(1, 4)]
        stems = [f"{s}{'0' if split == 'test' else ''}" for s in stems]
        images = [{"bytes": jpeg(20 * i), "path": None} for i in range(len(stems))]
        if split == "train":
            images[1] = None
        columns = {"image": images, "label": [0, 0, 0, 1, 1, 1], "image_id": stems}
        ds = datasets.Dataset.from_dict(columns, features=features)
        ds.to_parquet(str(tmp_path / "copy" / "data" / f"{split}-00000-of-00001.parquet"))
    out = tmp_path / "pets"
    prep.prepare(out, dataset=str(tmp_path / "copy"), progress=False)
    assert len(list((out / "train").rglob("*.jpg"))) == 5
    assert len(list((out / "test").rglob("*.jpg"))) == 6
    skipped = json.loads((out / prep.MARKER).read_text())["skipped"]
    assert skipped == ["train/Abyssinian/Abyssinian_2: ValueError: the row holds no image"]


def test_breed_from_an_upper_case_extension():
    """Abyssinian_1.JPG names the breed as Abyssinian_1.jpg does."""
    from tune_pets.prepare import breed_from_stem

    assert breed_from_stem("Abyssinian_1.JPG") == "Abyssinian"
    assert breed_from_stem("images/great_pyrenees_7.JPEG") == "great_pyrenees"


def test_stem_names_that_collide_with_fallback_names_are_not_used():
    """Class 0's stems say 'beagle', the fallback name of class 1: two classes in one folder
    unless the fallback names are used alone."""
    from tune_pets.prepare import breed_names

    names = breed_names([(0, "beagle_1"), (0, "beagle_2"), (1, None)], ["Abyssinian", "beagle"])
    assert names == {0: "Abyssinian", 1: "beagle"}
