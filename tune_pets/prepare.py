"""Prepare: download the Oxford-IIIT Pet dataset from the Hugging Face hub into an ImageFolder.

    python -m tune_pets.prepare --output-dir data/oxford_pets
    python -m tune_pets.prepare --output-dir data/oxford_pets --dataset timm/oxford-iiit-pet

Writes ``OUTPUT/{train,test}/<breed>/<image_id>.jpg`` (the layout every other command reads
with ``--data-dir``). JPEG sources are written byte for byte; anything else (the original
files include a GIF and an RGBA PNG named .jpg) becomes an RGB JPEG, quality 95. The folder is
built next to the output (``OUTPUT.tmp-XXXX``) and renamed into place only when complete, with a
``.complete`` marker holding the counts; a second run finds the marker and does nothing.

Offline: when the hub is unreachable this fails with one line; copy the images yourself into
``DIR/train/<breed>/*.jpg`` and ``DIR/test/<breed>/*.jpg`` and pass ``--data-dir DIR``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from tune_pets.data import IMAGE_EXTS
from tune_pets.utils import ArgumentParser, UserError, _umask, cli_main

DEFAULT_DATASET = "timm/oxford-iiit-pet"
MARKER = ".complete"
JPEG_QUALITY = 95
# Hub split name -> ImageFolder split name (tune_pets.data reads train/ plus test/ or val/).
SPLIT_NAMES = {"train": "train", "test": "test", "validation": "val"}

# One example for the writer: (image as PIL image or encoded bytes, class name, file stem).
Example = tuple[Any, str, str]


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
    "converted": n, "skipped": [...]}``. Writes in place; ``prepare`` makes it atomic.
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


# ---------------------------------------------------------------- from a Hugging Face dataset
def _columns(features: Any) -> tuple[str, str]:
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
            f"dataset has no image column and class-label column (columns: "
            f"{', '.join(names)}); expected 'image' and 'label'"
        )
    return image_col, label_col


def hf_examples(split: Any) -> Iterable[Example]:
    """(encoded bytes or PIL image, breed name, stem) for each row of a Hugging Face split.

    Images are read undecoded, so JPEG files keep their original bytes. Breed names come from
    the label's ``ClassLabel`` names (not the integers); stems from ``image_id`` when present.
    """
    import datasets

    image_col, label_col = _columns(split.features)
    names = split.features[label_col].names
    split = split.cast_column(image_col, datasets.Image(decode=False))
    has_id = "image_id" in split.features
    for i, row in enumerate(split):
        label = names[row[label_col]]
        stem = str(row["image_id"]) if has_id and row["image_id"] not in (None, "") else None
        if stem and Path(stem).suffix.lower() in IMAGE_EXTS:
            stem = stem[: -len(Path(stem).suffix)]  # an id like "Abyssinian_1.jpg"
        yield _undecoded(row[image_col]), label, stem or f"{safe_name(label)}_{i}"


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
    _check_target(output_dir)
    wanted = {SPLIT_NAMES[s]: dataset[s] for s in SPLIT_NAMES if s in dataset}
    if "train" not in wanted or len(wanted) < 2:
        raise UserError(
            f"{source}: expected a train split and a test (or validation) split, "
            f"found {', '.join(dataset) or 'none'}"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
        t0 = time.perf_counter()
        result = write_image_folder(
            {name: hf_examples(ds) for name, ds in wanted.items()},
            tmp,
            progress=progress,
            totals={name: len(ds) for name, ds in wanted.items()},
        )
        classes = sorted({c for per_class in result["splits"].values() for c in per_class})
        marker = {
            "source": source,
            "counts": {s: sum(c.values()) for s, c in result["splits"].items()},
            "num_classes": len(classes),
            "classes": classes,
            "per_class": result["splits"],
            "converted_to_jpeg": result["converted"],
            "skipped": result["skipped"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
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


def load_hub_dataset(name: str = DEFAULT_DATASET, progress: bool = True) -> Any:
    """``datasets.load_dataset(name)``; an unreachable hub becomes one-line ``UserError``."""
    import datasets

    if not progress:
        datasets.disable_progress_bars()
    print(f"downloading {name} from the Hugging Face hub...", flush=True)
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    # Offline, the hub client logs each of its 5 retries (~25 s); the one line below says it.
    hub_logger.setLevel(logging.ERROR)
    try:
        return datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 - network failures come as many exception types
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: {_first_line(e)}"
        raise UserError(
            f"cannot download {name!r}: the Hugging Face hub is unreachable ({why}); copy the "
            f"images into DIR/train/<breed>/*.jpg and DIR/test/<breed>/*.jpg and pass "
            f"--data-dir DIR to the other commands"
        ) from None
    finally:
        hub_logger.setLevel(level)


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def prepare(
    output_dir: str | os.PathLike, dataset: str = DEFAULT_DATASET, progress: bool = True
) -> Path:
    """Download ``dataset`` and write it as an ImageFolder at ``output_dir`` (idempotent)."""
    output_dir = Path(output_dir)
    if is_prepared(output_dir):
        return output_dir
    _check_target(output_dir)  # fail before a long download, not after it
    return write_dataset(
        load_hub_dataset(dataset, progress), output_dir, source=dataset, progress=progress
    )


# ---------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m tune_pets.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--output-dir",
        default="data/oxford_pets",
        help="ImageFolder to create (default data/oxford_pets)",
    )
    p.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help=f"Hugging Face dataset id (default {DEFAULT_DATASET})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    out = Path(args.output_dir)
    if is_prepared(out):
        print(f"{out} is already prepared ({MARKER} found); nothing to do")
        return 0
    prepare(out, args.dataset, progress=not args.no_progress)
    marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    counts = ", ".join(f"{n} {s}" for s, n in marker["counts"].items())
    print(
        f"wrote {out}: {counts} images, {marker['num_classes']} classes "
        f"({marker['converted_to_jpeg']} converted to JPEG)"
    )
    return 0


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.prepare")
