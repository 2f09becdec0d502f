"""Prepare: write the Oxford-IIIT Pet dataset as an ImageFolder, from the Hugging Face hub or
from a local copy.

    python -m tune_pets.prepare --output-dir data/oxford_pets                  # download
    python -m tune_pets.prepare --output-dir data/oxford_pets --from DIR       # official release
    python -m tune_pets.prepare --output-dir data/oxford_pets --dataset DIR    # hub copy, parquet

Sources, all written by the same code:

- ``--dataset ID`` (default ``timm/oxford-iiit-pet``): downloaded from the Hugging Face hub;
- ``--dataset DIR``: a local copy of such a dataset (its parquet files, e.g.
  ``DIR/data/train-*.parquet`` and ``DIR/data/test-*.parquet``);
- ``--from DIR``: the official release, ``DIR/images/*.jpg`` with
  ``DIR/annotations/trainval.txt`` and ``DIR/annotations/test.txt``, or torchvision's
  ``OxfordIIITPet`` root, which holds the same under ``DIR/oxford-iiit-pet/``.

Writes ``OUTPUT/{train,test}/<breed>/<image_id>.jpg`` (the layout every other command reads with
``--data-dir``; trainval becomes ``train``). Breed folders are named as the original files name
them (``Persian_98`` -> ``Persian``, ``american_bulldog_12`` -> ``american_bulldog``), not by the
hub's lowercase label names. JPEG sources are written byte for byte; anything else (the original
files include a GIF and an RGBA PNG named .jpg) becomes an RGB JPEG, quality 95. The folder is
built next to the output (``OUTPUT.tmp-XXXX``, under the lock file ``OUTPUT.lock``) and renamed
into place only when complete, with a ``.complete`` marker holding the counts; a second run finds
the marker and does nothing, and a run after a killed one removes the dead run's temp folder.

Offline: without network the hub download fails within seconds, with one line saying what to do
(``--from DIR``, ``--dataset DIR``, or ``--data-dir`` on a folder you copied yourself).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from tune_pets.data import IMAGE_EXTS
from tune_pets import cli
from tune_pets.hub import (
    first_line,
    hub_offline,
    hub_offline_mode,
    hub_unreachable,
    is_network_error,
    is_not_found_error,
)
from tune_pets.layout import DEFAULT_DATA_DIR
from tune_pets.utils import UserError, _umask, cli_main

DEFAULT_DATASET = "timm/oxford-iiit-pet"
MARKER = ".complete"
JPEG_QUALITY = 95
# Hub split name -> ImageFolder split name (tune_pets.data reads train/ plus test/ or val/).
SPLIT_NAMES = {"train": "train", "test": "test", "validation": "val"}
# The official release's split lists -> ImageFolder split name.
RELEASE_SPLITS = {"trainval.txt": "train", "test.txt": "test"}
TORCHVISION_FOLDER = "oxford-iiit-pet"  # torchvision.datasets.OxfordIIITPet(root) reads root/this

# One example for the writer: (image as PIL image or encoded bytes, class name, file stem).
Example = tuple[Any, str, str]
# One split for the writer: its examples and how many there are (for the progress bar).
SplitSource = tuple[Iterable[Example], int]


# ---------------------------------------------------------------- writing an ImageFolder
def safe_name(name: str) -> str:
    """A class or file name usable as one path component: only path separators are replaced."""
    name = str(name).replace("/", "_").replace(os.sep, "_")
    if os.altsep:
        name = name.replace(os.altsep, "_")
    name = name.strip()
    if name in ("", ".", ".."):
        raise ValueError(f"cannot use {name!r} as a file or folder name")
    return name


def _jpeg_bytes(image: Any) -> tuple[bytes, bool]:
    """Encoded JPEG for ``image`` (PIL image or encoded bytes), and whether it was converted.

    Bytes that already are a JPEG are kept as they are; anything else is decoded, composited
    over white if it has transparency, EXIF-rotated, and saved as RGB JPEG quality 95.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency warnings are noise here
            img = Image.open(io.BytesIO(data))
            if img.format == "JPEG":
                return data, False
            img.load()
    elif isinstance(image, Image.Image):
        img = image
    else:
        raise TypeError(f"expected a PIL image or encoded bytes, got {type(image).__name__}")
    img = _rgb(ImageOps.exif_transpose(img))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), True


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def write_image_folder(
    splits: Mapping[str, Iterable[Example]],
    output_dir: str | os.PathLike,
    *,
    progress: bool = True,
    totals: Mapping[str, int] | None = None,
) -> dict:
    """Write ``{split: [(image, class_name, stem), ...]}`` as ``output_dir/split/class/stem.jpg``.

    ``image`` is a PIL image or encoded bytes (written unchanged when they are a JPEG). A stem
    seen twice in one class folder gets a numeric suffix. Images that cannot be decoded are
    skipped and listed in the result. Returns counts: ``{"splits": {split: {class: n}},
    "converted": n, "skipped": [...]}``. Writes in place; ``build_atomically`` makes it atomic.
    """
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    counts: dict[str, dict[str, int]] = {}
    converted, skipped = 0, []
    for split, examples in splits.items():
        split_counts: dict[str, int] = {}
        used: set[tuple[str, str]] = set()
        total = (totals or {}).get(split)
        bar = tqdm(
            examples,
            total=total,
            desc=f"write {split}",
            unit="img",
            file=sys.stderr,
            disable=not progress or None,
        )
        for i, (image, label, stem) in enumerate(bar):
            cls = safe_name(label)
            stem = safe_name(stem) if stem else f"{cls}_{i}"
            name, k = stem, 1
            while (cls, name) in used:
                name, k = f"{stem}_{k}", k + 1
            try:
                data, was_converted = _jpeg_bytes(image)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                skipped.append(f"{split}/{cls}/{name}: {type(e).__name__}: {e}")
                continue
            used.add((cls, name))
            folder = output_dir / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.jpg").write_bytes(data)
            converted += was_converted
            split_counts[cls] = split_counts.get(cls, 0) + 1
        bar.close()
        counts[split] = dict(sorted(split_counts.items()))
    return {"splits": counts, "converted": converted, "skipped": skipped}


def build_atomically(
    splits: Mapping[str, SplitSource],
    output_dir: str | os.PathLike,
    *,
    source: str,
    progress: bool = True,
) -> Path:
    """Write ``splits`` as an ImageFolder at ``output_dir``: all of it, or nothing.

    Every source ends here. The tree is built in ``OUTPUT.tmp-XXXX`` and renamed into place with
    its ``.complete`` marker; ``OUTPUT.lock`` keeps two runs apart and lets this one delete the
    temp folders of runs that were killed. Returns the output dir (unchanged when complete).
    """
    output_dir = Path(output_dir)
    if is_prepared(output_dir):
        return output_dir
    _check_target(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(output_dir) as locked:
        if is_prepared(output_dir):  # another run finished while this one was loading
            return output_dir
        if locked:  # else a temp folder may belong to a live run
            _remove_stale_temp_dirs(output_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f"{output_dir.name}.tmp-", dir=output_dir.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
            t0 = time.perf_counter()
            result = write_image_folder(
                {name: examples for name, (examples, _) in splits.items()},
                tmp,
                progress=progress,
                totals={name: total for name, (_, total) in splits.items()},
            )
            marker = _marker(result, source, time.perf_counter() - t0)
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            if output_dir.is_dir():
                output_dir.rmdir()  # _check_target allowed only an empty folder
            os.replace(tmp, output_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if result["skipped"]:
        print(
            f"warning: skipped {len(result['skipped'])} undecodable image(s), listed in "
            f"{output_dir / MARKER}",
            file=sys.stderr,
        )
    return output_dir


def _marker(result: dict, source: str, seconds: float) -> dict:
    classes = sorted({c for per_class in result["splits"].values() for c in per_class})
    return {
        "source": source,
        "counts": {s: sum(c.values()) for s, c in result["splits"].items()},
        "num_classes": len(classes),
        "classes": classes,
        "per_class": result["splits"],
        "converted_to_jpeg": result["converted"],
        "skipped": result["skipped"],
        "seconds": round(seconds, 1),
    }


@contextlib.contextmanager
def _exclusive(output_dir: Path) -> Iterator[bool]:
    """Hold ``OUTPUT.lock`` for the block; a second run writing the same output is refused.

    An flock dies with its process, so a killed run never leaves a lock that blocks the next.
    Yields whether the lock is held (False only where there is no flock: not POSIX).
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    lock_path = output_dir.with_name(f"{output_dir.name}.lock")
    while True:
        lock = open(lock_path, "a")  # closed below, after the block
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise UserError(
                f"--output-dir {output_dir}: another prepare is writing it ({lock_path} is "
                f"locked); wait for it to finish or pick another --output-dir"
            ) from None
        # The previous holder deletes the file when done: a lock on its deleted file is no lock.
        if lock_path.exists() and os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino:
            break
        lock.close()
    try:
        yield True
    finally:
        lock_path.unlink(missing_ok=True)  # still locked here: no other run is inside
        lock.close()


def _remove_stale_temp_dirs(output_dir: Path) -> None:
    """Delete ``OUTPUT.tmp-*`` left by a killed run (safe: the caller holds the lock)."""
    for stale in output_dir.parent.glob(f"{output_dir.name}.tmp-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def is_prepared(output_dir: str | os.PathLike) -> bool:
    return (Path(output_dir) / MARKER).is_file()


def _check_target(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file; pass a folder path")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise UserError(
            f"--output-dir {output_dir} exists, is not empty and has no {MARKER} "
            f"marker (an interrupted or foreign folder); delete it or pick another "
            f"--output-dir"
        )


# ---------------------------------------------------------------- breed names
def breed_from_stem(stem: str | None) -> str | None:
    """The breed an original file name encodes: ``Persian_98`` -> ``Persian``; else None."""
    if not stem:
        return None
    stem = str(stem)
    if Path(stem).suffix.lower() in IMAGE_EXTS:
        stem = stem[: -len(Path(stem).suffix)]
    breed, _, number = stem.rpartition("_")
    return breed if breed and number.isdigit() else None


def breed_names(
    rows: Iterable[tuple[int, str | None]], fallback: Sequence[str] = ()
) -> dict[int, str]:
    """Class id -> folder name, from ``(class id, file stem)`` rows.

    The stems name the breeds as the original release does (cats Capitalized, dogs lower_case:
    ``British_Shorthair``, ``american_bulldog``); the hub's ClassLabel names (``british_shorthair``)
    lose that. Stems are trusted only when they name the classes one-to-one; otherwise, and for a
    class whose rows have no usable stem, the ``fallback`` name (by class id) is used. A class id
    with neither is left out: the caller decides what that means.
    """
    found: dict[int, set[str]] = {}
    for label, stem in rows:
        breeds = found.setdefault(int(label), set())
        breed = breed_from_stem(stem)
        if breed:
            breeds.add(breed)
    from_stems = {label: next(iter(b)) for label, b in found.items() if len(b) == 1}
    distinct = len(set(from_stems.values())) == len(from_stems)
    one_to_one = distinct and all(len(b) <= 1 for b in found.values())
    names = {}
    for label in sorted(found):
        name = from_stems.get(label) if one_to_one else None
        if name is None and 0 <= label < len(fallback):
            name = str(fallback[label])
        if name is not None:
            names[label] = name
    if len(set(names.values())) < len(names):  # stem names and fallback names collide
        names = {label: str(fallback[label]) for label in found if 0 <= label < len(fallback)}
    return names


# ---------------------------------------------------------------- from a Hugging Face dataset
def _columns(features: Any, source: str = "dataset") -> tuple[str, str]:
    """(image column, label column) of a Hugging Face dataset's features."""
    import datasets

    names = list(features)
    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    image_col = "image" if "image" in images else (images[0] if images else None)
    # "label" is the breed; "label_cat_dog" (2 classes) is the species: prefer the breed.
    label_col = (
        "label"
        if "label" in labels
        else (max(labels, key=lambda k: features[k].num_classes) if labels else None)
    )
    if image_col is None or label_col is None:
        raise UserError(
            f"{source}: has no image column and class-label column (columns: "
            f"{', '.join(names)}); expected 'image' and 'label'"
        )
    return image_col, label_col


def hf_class_names(dataset: Mapping[str, Any], source: str = "dataset") -> dict[int, str]:
    """Class id -> folder name for a ``DatasetDict``: breed names from the ``image_id`` stems
    (``Persian_98`` -> ``Persian``) when they name the classes one-to-one, else the ClassLabel
    names. Reads the label and id columns only, never the images."""
    rows: list[tuple[int, str | None]] = []
    fallback: list[str] = []
    for split in dataset.values():
        _, label_col = _columns(split.features, source)
        fallback = fallback or list(split.features[label_col].names)
        ids = split["image_id"] if "image_id" in split.features else [None] * len(split)
        rows += [(label, i) for label, i in zip(split[label_col], ids, strict=True)]
    return breed_names(((label, i) for label, i in rows if label is not None), fallback)


def hf_examples(split: Any, class_names: Mapping[int, str] | None = None) -> Iterable[Example]:
    """(encoded bytes or PIL image, breed name, stem) for each row of a Hugging Face split.

    Images are read undecoded, so JPEG files keep their original bytes. Breed names come from
    ``class_names`` (see ``hf_class_names``), else the label's ClassLabel names (not the
    integers); stems from ``image_id`` when present.
    """
    import datasets

    image_col, label_col = _columns(split.features)
    names = dict(enumerate(split.features[label_col].names))
    names.update(class_names or {})
    split = split.cast_column(image_col, datasets.Image(decode=False))
    has_id = "image_id" in split.features
    for i, row in enumerate(split):
        label = row[label_col]
        if label not in names:
            raise UserError(f"row {i} of the dataset has no valid label ({label!r})")
        stem = str(row["image_id"]) if has_id and row["image_id"] not in (None, "") else None
        if stem and Path(stem).suffix.lower() in IMAGE_EXTS:
            stem = stem[: -len(Path(stem).suffix)]  # an id like "Abyssinian_1.jpg"
        yield _undecoded(row[image_col]), names[label], stem or f"{safe_name(names[label])}_{i}"


def _undecoded(value: Any) -> Any:
    """Bytes (or a PIL image) from an undecoded ``datasets.Image`` cell."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"]).read_bytes()
        raise ValueError("image cell has neither bytes nor a path")
    return value


def write_dataset(
    dataset: Mapping[str, Any],
    output_dir: str | os.PathLike,
    *,
    source: str = DEFAULT_DATASET,
    progress: bool = True,
) -> Path:
    """Write a loaded Hugging Face ``DatasetDict`` atomically as an ImageFolder.

    This is everything ``prepare`` does after the download, so tests can run it on an
    in-memory dataset. Returns the output dir (unchanged if it is already complete).
    """
    output_dir = Path(output_dir)
    if is_prepared(output_dir):
        return output_dir
    wanted = {SPLIT_NAMES[s]: dataset[s] for s in SPLIT_NAMES if s in dataset}
    if "train" not in wanted or len(wanted) < 2:
        raise UserError(
            f"{source}: expected a train split and a test (or validation) split, "
            f"found {', '.join(dataset) or 'none'}"
        )
    names = hf_class_names(wanted, source)
    splits = {name: (hf_examples(ds, names), len(ds)) for name, ds in wanted.items()}
    return build_atomically(splits, output_dir, source=source, progress=progress)


# ---------------------------------------------------------------- from the official release
def release_root(folder: str | os.PathLike) -> Path:
    """The folder holding ``images/`` and ``annotations/``: ``folder`` itself (the official
    release) or ``folder/oxford-iiit-pet`` (torchvision's ``OxfordIIITPet`` root)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--from {folder}: folder not found")
    for root in (folder, folder / TORCHVISION_FOLDER):
        lists = [root / "annotations" / name for name in RELEASE_SPLITS]
        if (root / "images").is_dir() and all(p.is_file() for p in lists):
            return root
    hint = (
        "; it looks like an ImageFolder already: pass it as --data-dir to the other commands"
        if (folder / "train").is_dir()
        else ""
    )
    raise UserError(
        f"--from {folder}: neither the official Oxford-IIIT Pet release (DIR/images/*.jpg with "
        f"DIR/annotations/trainval.txt and test.txt) nor torchvision's OxfordIIITPet root "
        f"(DIR/{TORCHVISION_FOLDER}/images, DIR/{TORCHVISION_FOLDER}/annotations){hint}"
    )


def read_split_list(path: Path) -> list[tuple[str, int]]:
    """``(image name, class id)`` per line of ``trainval.txt``/``test.txt``.

    Lines read ``Abyssinian_100 1 1 1`` (image, class id 1-37, species, breed id); blank lines
    and ``#`` comments are skipped.
    """
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            rows.append((parts[0], int(parts[1])))
        except (IndexError, ValueError):
            raise UserError(
                f"{path}:{n}: expected 'IMAGE CLASS_ID SPECIES BREED_ID', got {line!r}"
            ) from None
    if not rows:
        raise UserError(f"{path}: lists no images")
    return rows


def release_splits(root: Path) -> dict[str, SplitSource]:
    """The release's splits for the writer; fails before writing if a listed image is missing.

    Breed names come from the image names (``Abyssinian_100`` -> ``Abyssinian``), checked
    against the class ids of the lists.
    """
    lists = {
        split: read_split_list(root / "annotations" / f) for f, split in RELEASE_SPLITS.items()
    }
    names = breed_names((cls, image) for rows in lists.values() for image, cls in rows)
    for file, split in RELEASE_SPLITS.items():
        unnamed = [image for image, cls in lists[split] if cls not in names]
        if unnamed:
            raise UserError(
                f"{root / 'annotations' / file}: cannot tell the breed of {unnamed[0]} (image "
                f"names must read BREED_NUMBER and name each class id once)"
            )
    # An image in both lists would put a test image into train: the search would see it.
    both = sorted({image for image, _ in lists["train"]} & {image for image, _ in lists["test"]})
    if both:
        raise UserError(
            f"{root / 'annotations'}: {both[0]} is listed in both trainval.txt and test.txt "
            f"({len(both)} image(s) in all); each image belongs to one split"
        )
    missing = [f"{image}.jpg" for rows in lists.values() for image, _ in rows]
    missing = [name for name in missing if not (root / "images" / name).is_file()]
    if missing:
        raise UserError(
            f"{root / 'images'}: {len(missing)} image(s) named in annotations/ are missing "
            f"(e.g. {', '.join(missing[:3])}); copy the complete images/ folder"
        )

    def examples(rows: list[tuple[str, int]]) -> Iterator[Example]:
        for image, cls in rows:
            yield (root / "images" / f"{image}.jpg").read_bytes(), names[cls], image

    return {split: (examples(rows), len(rows)) for split, rows in lists.items()}


def write_release(
    folder: str | os.PathLike, output_dir: str | os.PathLike, *, progress: bool = True
) -> Path:
    """Write a local copy of the official release (or torchvision's root) as an ImageFolder."""
    root = release_root(folder)
    kind = "torchvision OxfordIIITPet root" if root.name == TORCHVISION_FOLDER else "release"
    return build_atomically(
        release_splits(root), output_dir, source=f"{kind} {root.resolve()}", progress=progress
    )


# ---------------------------------------------------------------- loading a dataset
OFFLINE_HELP = (
    "without network, pass --from DIR (the official release: DIR/images and DIR/annotations, or "
    "torchvision's OxfordIIITPet root), --dataset DIR (a copy of the hub dataset's parquet files), "
    "or copy an ImageFolder to DIR/train/<breed>/*.jpg and DIR/test/<breed>/*.jpg and pass "
    "--data-dir DIR to the other commands"
)


def load_hf_dataset(name: str = DEFAULT_DATASET, progress: bool = True) -> Any:
    """The ``DatasetDict`` of a local folder (parquet files) or of a hub dataset id.

    Every failure is one ``UserError`` line that says what went wrong: the hub cannot be
    reached (only for network errors; within seconds), the dataset does not exist, or it could
    not be read.
    """
    import datasets

    if not progress:
        datasets.disable_progress_bars()
    if Path(name).is_dir():
        return _load_local(Path(name))
    offline_why = "HF_HUB_OFFLINE is set" if hub_offline(datasets_too=True) else hub_unreachable()
    if offline_why is None:
        print(f"downloading {name} from the Hugging Face hub...", flush=True)
        return _load_from_hub(name, offline_why)
    # Unreachable: the datasets cache may still hold it (a copy made while online).
    with hub_offline_mode():
        return _load_from_hub(name, offline_why)


def _load_from_hub(name: str, offline_why: str | None) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 - each kind of failure gets its own line below
        if is_network_error(e):  # offline, datasets says so with a ConnectionError too
            why = offline_why or f"{type(e).__name__}: {first_line(e)}"
            raise UserError(
                f"cannot download {name!r}: the Hugging Face hub is unreachable ({why}) and "
                f"the dataset is not in the local cache; {OFFLINE_HELP}"
            ) from None
        if is_not_found_error(e):
            raise UserError(
                f"--dataset {name}: no such dataset on the Hugging Face hub, or it is private or "
                f"gated ({first_line(e)}); check the id (default {DEFAULT_DATASET}) or pass a "
                f"local folder"
            ) from e
        raise UserError(
            f"--dataset {name}: could not load it ({type(e).__name__}: {first_line(e)}); "
            f"run with --debug for the traceback"
        ) from e


def _load_local(folder: Path) -> Any:
    import datasets

    if not any(folder.rglob("*.parquet")):
        raise UserError(
            f"--dataset {folder}: no parquet files in it; pass a copy of the hub dataset (e.g. "
            f"data/train-*.parquet and data/test-*.parquet), or use --from for the official "
            f"release"
        )
    try:
        return datasets.load_dataset(str(folder))
    except Exception as e:  # noqa: BLE001 - the folder's content is the user's
        raise UserError(
            f"--dataset {folder}: cannot read it as a dataset ({type(e).__name__}: "
            f"{first_line(e)}); expected parquet files named like train-*.parquet and "
            f"test-*.parquet (a copy of the hub dataset), or use --from for the official release"
        ) from e


def prepare(
    output_dir: str | os.PathLike,
    dataset: str = DEFAULT_DATASET,
    progress: bool = True,
    from_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``from_dir`` (the release) or ``dataset`` (hub id or local parquet copy) as an
    ImageFolder at ``output_dir``; idempotent: a complete output is returned untouched."""
    output_dir = Path(output_dir)
    if is_prepared(output_dir):
        return output_dir
    _check_target(output_dir)  # fail before a long download, not after it
    if from_dir is not None:
        return write_release(from_dir, output_dir, progress=progress)
    source = str(Path(dataset).resolve()) if Path(dataset).is_dir() else dataset
    return write_dataset(
        load_hf_dataset(dataset, progress), output_dir, source=source, progress=progress
    )


# ---------------------------------------------------------------- CLI
def build_parser() -> cli.ArgumentParser:
    p = cli.command_parser(__doc__, "python -m tune_pets.prepare")
    p.add_argument(
        "--output-dir",
        default=DEFAULT_DATA_DIR,
        metavar="OUTPUT",
        help="the ImageFolder to create; pass it to the other commands as --data-dir",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        metavar="ID_OR_DIR",
        help="a Hugging Face dataset id to download, or a local folder holding a copy of one "
        "(its parquet files, e.g. DIR/data/train-*.parquet and DIR/data/test-*.parquet)",
    )
    source.add_argument(
        "--from",
        dest="from_dir",
        metavar="DIR",
        help="read the official release instead of downloading: DIR/images/*.jpg with "
        "DIR/annotations/trainval.txt and test.txt, or torchvision's OxfordIIITPet root "
        f"(the same under DIR/{TORCHVISION_FOLDER}); no network is used",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    if is_prepared(out):
        print(f"{out} is already prepared ({MARKER} found); nothing to do")
        return 0
    prepare(out, args.dataset, progress=not args.no_progress, from_dir=args.from_dir)
    _print_summary(out)
    return 0


def _print_summary(out: Path) -> None:
    marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    counts = ", ".join(f"{n} {s}" for s, n in marker["counts"].items())
    print(
        f"wrote {out}: {counts} images, {marker['num_classes']} classes "
        f"({marker['converted_to_jpeg']} converted to JPEG)"
    )


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.prepare")
