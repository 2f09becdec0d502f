"""Prepare: write the Oxford-IIIT Pet dataset as an ImageFolder, from the Hugging Face hub or
from a local copy.

    python -m tune_pets.prepare --output-dir data/oxford_pets                  # download
    python -m tune_pets.prepare --output-dir data/oxford_pets --from DIR       # official release
    python -m tune_pets.prepare --output-dir data/oxford_pets --dataset DIR    # hub copy, parquet

``--from`` also takes torchvision's ``OxfordIIITPet`` root. Every source writes
``OUTPUT/{train,test}/<breed>/<image_id>.jpg`` with the original breed names (``Persian_98`` ->
``Persian``), JPEG bytes unchanged, anything else (the originals include a GIF and an RGBA PNG
named .jpg) as RGB JPEG. The tree is built in ``OUTPUT.tmp-XXXX`` under ``OUTPUT.lock`` and
renamed into place with a ``.complete`` marker, so a second run does nothing.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from tune_pets import cli, hub
from tune_pets.data import IMAGE_EXTS, progress_bar, to_rgb
from tune_pets.hub import first_line, hub_unreachable  # tests replace prepare.hub_unreachable
from tune_pets.layout import DEFAULT_DATA_DIR
from tune_pets.utils import DISK_FULL_ERRNOS, LockHeld, UserError, _umask, cli_main
from tune_pets.utils import atomic_write_json, exclusive_lock, read_json

DEFAULT_DATASET = "timm/oxford-iiit-pet"
MARKER = ".complete"
JPEG_QUALITY = 95
# Hub split name -> ImageFolder split name (tune_pets.data reads train/ plus test/ or val/).
SPLIT_NAMES = {"train": "train", "test": "test", "validation": "val"}
RELEASE_SPLITS = {"trainval.txt": "train", "test.txt": "test"}  # the release's split lists
TORCHVISION_FOLDER = "oxford-iiit-pet"  # torchvision.datasets.OxfordIIITPet(root) reads root/this

# One example for the writer: (PIL image or encoded bytes, class name, file stem).
Example = tuple[Any, str, str]
# One split for the writer: its examples and how many there are (for the progress bar).
SplitSource = tuple[Iterable[Example], int]


# ---------------------------------------------------------------- writing an ImageFolder
def safe_name(name: str) -> str:
    """A class or file name usable as one path component: only path separators are replaced."""
    name = str(name)
    for sep in {"/", os.sep, os.altsep} - {None}:
        name = name.replace(sep, "_")
    name = name.strip()
    if name in ("", ".", ".."):
        raise ValueError(f"cannot use {name!r} as a file or folder name")
    return name


def _jpeg_bytes(image: Any) -> tuple[bytes, bool]:
    """Encoded JPEG for an image (encoded bytes, or an undecoded ``datasets.Image`` cell), and
    whether it was converted. JPEG bytes are kept as they are; anything else is decoded and
    saved as RGB JPEG. ValueError or OSError: no readable image (the writer skips it)."""
    if isinstance(image, dict):  # a hub dataset's cell: its bytes, or a file's path
        if image.get("bytes") is not None:
            image = image["bytes"]
        elif image.get("path"):
            image = Path(image["path"]).read_bytes()
    if not isinstance(image, (bytes, bytearray, memoryview)):  # a row without an image: null
        raise ValueError("the row holds no image")
    data = bytes(image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-transparency warnings are noise here
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            return data, False
        img.load()
    buf = io.BytesIO()
    to_rgb(ImageOps.exif_transpose(img)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), True


def write_image_folder(
    splits: Mapping[str, SplitSource], output_dir: str | os.PathLike, *, progress: bool = True
) -> dict:
    """Write ``{split: ([(image, class_name, stem), ...], total)}`` as
    ``output_dir/split/class/stem.jpg``, in place (``build_atomically`` makes it atomic).

    A stem seen twice in one class folder gets a numeric suffix; undecodable images are skipped.
    Returns ``{"splits": {split: {class: n}}, "converted": n, "skipped": [...]}``.
    """
    output_dir = Path(output_dir)
    counts: dict[str, dict[str, int]] = {}
    converted, skipped = 0, []
    for split, (examples, total) in splits.items():
        used: set[tuple[str, str]] = set()  # (class, name) of each file written
        bar = progress_bar(examples, total, f"write {split}", progress)
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
        bar.close()
        counts[split] = dict(sorted(Counter(cls for cls, _ in used).items()))
    return {"splits": counts, "converted": converted, "skipped": skipped}


def build_atomically(
    splits: Mapping[str, SplitSource],
    output_dir: str | os.PathLike,
    *,
    source: str,
    progress: bool = True,
) -> Path:
    """Write ``splits`` as an ImageFolder at ``output_dir``, all of it or nothing: built in a
    temp folder under the lock, then renamed into place with its marker. Every source ends here."""
    output_dir = Path(output_dir)
    if is_prepared(output_dir):
        return output_dir
    _check_target(output_dir)
    if output_dir.is_symlink():  # built beside the folder it names, on that folder's disk
        output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(output_dir) as locked:
        if is_prepared(output_dir):  # another run finished while this one was loading
            return output_dir
        if locked:  # else a temp folder may belong to a live run
            for stale in output_dir.parent.glob(f"{glob.escape(output_dir.name)}.tmp-*"):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{output_dir.name}.tmp-", dir=output_dir.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
            t0 = time.perf_counter()
            try:
                result = write_image_folder(splits, tmp, progress=progress)
            except OSError as e:  # a full disk's error names no file
                if e.filename or e.errno not in DISK_FULL_ERRNOS:
                    raise
                raise OSError(e.errno, e.strerror, str(output_dir)) from e
            per_class = result["splits"]
            classes = sorted({c for counts in per_class.values() for c in counts})
            marker = {
                "source": source,
                "counts": {s: sum(c.values()) for s, c in per_class.items()},
                "num_classes": len(classes),
                "classes": classes,
                "per_class": per_class,
                "converted_to_jpeg": result["converted"],
                "skipped": result["skipped"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
            atomic_write_json(tmp / MARKER, marker)
            if output_dir.is_dir():
                output_dir.rmdir()  # _check_target allowed only an empty folder
            os.replace(tmp, output_dir)
        finally:  # a failed build's leftovers (none once renamed into place)
            shutil.rmtree(tmp, ignore_errors=True)
    if result["skipped"]:
        print(
            f"warning: skipped {len(result['skipped'])} undecodable image(s), listed in "
            f"{output_dir / MARKER}",
            file=sys.stderr,
        )
    return output_dir


@contextlib.contextmanager
def _exclusive(output_dir: Path) -> Iterator[bool]:
    """Hold ``OUTPUT.lock`` for the block, refusing a second run; yields False without flock."""
    lock_path = output_dir.with_name(f"{output_dir.name}.lock")
    try:
        with exclusive_lock(lock_path) as locked:
            yield locked
    except LockHeld:
        raise UserError(
            f"--output-dir {output_dir}: another prepare is writing it ({lock_path} is "
            f"locked); wait for it to finish or pick another --output-dir"
        ) from None


def prepare_default_data_dir(data_dir: str, progress: bool) -> None:
    """The default data dir, missing, is prepared (downloaded) first, so the quick start is one
    command (search, pipeline); any other --data-dir must exist."""
    if data_dir == DEFAULT_DATA_DIR and not Path(data_dir).exists():
        print(f"{data_dir} not found: preparing the dataset there first", flush=True)
        prepare(Path(data_dir), progress=progress)


def is_prepared(output_dir: str | os.PathLike) -> bool:
    return (Path(output_dir) / MARKER).is_file()


def _check_target(output_dir: Path) -> None:
    if output_dir.name in ("", ".."):  # the finished folder is renamed into place: it needs a name
        raise UserError(f"--output-dir {output_dir}: name a folder, e.g. data/oxford_pets")
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file; pass a folder path")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise UserError(
            f"--output-dir {output_dir} exists, is not empty and has no {MARKER} marker (an "
            f"interrupted or foreign folder); delete it or pick another --output-dir"
        )


# ---------------------------------------------------------------- breed names
def _strip_ext(stem: str) -> str:
    """``Abyssinian_1.jpg`` (or ``images/Abyssinian_1.jpg``) -> ``Abyssinian_1``; other names
    keep all but a folder."""
    name = Path(stem.replace("\\", "/")).name
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in IMAGE_EXTS else name


def breed_from_stem(stem: str | None) -> str | None:
    """The breed an original file name encodes: ``Persian_98`` -> ``Persian``; else None."""
    if not stem:
        return None
    breed, _, number = _strip_ext(str(stem)).rpartition("_")
    return breed if breed and number.isdigit() else None


def breed_names(
    rows: Iterable[tuple[int, str | None]], fallback: Sequence[str] = ()
) -> dict[int, str]:
    """Class id -> folder name, from ``(class id, file stem)`` rows.

    The stems keep the release's names (cats Capitalized, dogs lower_case), which the hub's
    ClassLabel names lose. Each class takes the breed most of its stems name (one stray stem
    renamed every class to the fallback names), if that names the classes one-to-one; else
    the ``fallback`` name by class id is used. A class id with neither is left out.
    """
    found: dict[int, Counter] = {}
    for label, stem in rows:
        breeds = found.setdefault(int(label), Counter())
        if breed := breed_from_stem(stem):
            breeds[breed] += 1
    top = {label: b.most_common(2) for label, b in found.items() if b}
    from_stems = {label: t[0][0] for label, t in top.items()}
    one_to_one = len(set(from_stems.values())) == len(from_stems) and all(
        len(t) == 1 or t[0][1] > t[1][1]
        for t in top.values()  # a tie names no breed
    )
    by_label = {label: str(fallback[label]) for label in found if 0 <= label < len(fallback)}
    names = by_label | from_stems if one_to_one else by_label
    # Stem names and fallback names may collide: then the fallback names alone.
    return names if len(set(names.values())) == len(names) else by_label


# ---------------------------------------------------------------- from a Hugging Face dataset
def _columns(features: Any, source: str = "dataset") -> tuple[str, str]:
    """(image column, label column) of a Hugging Face dataset's features."""
    import datasets

    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    image_col = "image" if "image" in images else next(iter(images), None)
    # "label" is the breed; "label_cat_dog" (2 classes) is the species: prefer the breed, else
    # the column with the most classes.
    label_col = max(labels, key=lambda k: (k == "label", features[k].num_classes), default=None)
    if image_col is None or label_col is None:
        raise UserError(
            f"{source}: has no image column and class-label column (columns: "
            f"{', '.join(features)}); expected 'image' and 'label'"
        )
    return image_col, label_col


def _hf_examples(split: Any, columns: tuple[str, str], breeds: dict[int, str]) -> Iterator[Example]:
    """(undecoded image cell, breed name, stem) per row: JPEG files keep their original bytes."""
    import datasets

    image_col, label_col = columns
    names = dict(enumerate(split.features[label_col].names)) | breeds
    split = split.cast_column(image_col, datasets.Image(decode=False))
    for i, row in enumerate(split):
        label = row[label_col]
        if label not in names:
            raise UserError(f"row {i} of the dataset has no valid label ({label!r})")
        image_id = row.get("image_id")
        stem = _strip_ext(str(image_id)) if image_id not in (None, "") else ""
        # no stem: write_image_folder names it <class>_<i>
        yield row[image_col], names[label], stem


def write_dataset(
    dataset: Mapping[str, Any],
    output_dir: str | os.PathLike,
    *,
    source: str = DEFAULT_DATASET,
    progress: bool = True,
) -> Path:
    """Write a loaded Hugging Face ``DatasetDict`` atomically as an ImageFolder: all that
    ``prepare`` does after the download. Returns the output dir (untouched if complete)."""
    if is_prepared(output_dir):
        return Path(output_dir)
    wanted = {SPLIT_NAMES[s]: dataset[s] for s in SPLIT_NAMES if s in dataset}
    if "train" not in wanted or len(wanted) < 2:
        raise UserError(
            f"{source}: expected a train split and a test (or validation) split, "
            f"found {', '.join(dataset) or 'none'}"
        )
    columns = {name: _columns(ds.features, source) for name, ds in wanted.items()}
    # Breed names from the image_id stems, else the ClassLabel names: no image is read here.
    rows, fallback, ids_of = [], [], {}
    for name, ds in wanted.items():
        label_col = columns[name][1]
        fallback = fallback or list(ds.features[label_col].names)
        ids = ds["image_id"] if "image_id" in ds.features else [None] * len(ds)
        rows += [(y, i) for y, i in zip(ds[label_col], ids, strict=True) if y is not None]
        ids_of[name] = {_strip_ext(str(i)) for i in ids if i not in (None, "")}
    # An image in two splits would put a test image into train: the search would see it.
    both = sorted(ids_of["train"] & set().union(*(v for k, v in ids_of.items() if k != "train")))
    if both:
        raise UserError(
            f"{source}: image_id {both[0]} is in train and in a held-out split ({len(both)} "
            "image(s) in all); each image belongs to one split"
        )
    breeds = breed_names(rows, fallback)
    stems = [(i, breeds.get(int(y))) for y, i in rows if breed_from_stem(i)]
    stray = [(i, folder) for i, folder in stems if breed_from_stem(i) != folder]
    if stray:  # a few: a row's stray id; all: ids that do not name the classes one-to-one
        print(
            f"warning: {len(stray)} of {len(stems)} image_id(s) name another breed than the "
            f"folder of their label (e.g. {stray[0][0]} in {stray[0][1]}/); files go by label",
            file=sys.stderr,
        )
    splits = {
        name: (_hf_examples(ds, columns[name], breeds), len(ds)) for name, ds in wanted.items()
    }
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
    hint = "; it looks like an ImageFolder already: pass it as --data-dir to the other commands"
    raise UserError(
        f"--from {folder}: neither the official Oxford-IIIT Pet release (DIR/images/*.jpg with "
        f"DIR/annotations/trainval.txt and test.txt) nor torchvision's OxfordIIITPet root "
        f"(DIR/{TORCHVISION_FOLDER}/images, DIR/{TORCHVISION_FOLDER}/annotations)"
        + (hint if (folder / "train").is_dir() else "")
    )


def read_split_list(path: Path) -> list[tuple[str, int]]:
    """``(image name, class id)`` per line ``Abyssinian_100 1 1 1`` (image, class id 1-37,
    species, breed id) of ``trainval.txt``/``test.txt``; blank and ``#`` lines are skipped."""
    rows, seen = [], {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # saved as UTF-16 by an editor, say
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8 (or ASCII)") from None
    for n, line in enumerate(text.splitlines(), 1):
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
        # Written twice, an image could fall on both sides of the val split.
        if (first := seen.setdefault(parts[0], n)) != n:
            raise UserError(f"{path}:{n}: {parts[0]} is listed again (first on line {first})")
    if not rows:
        raise UserError(f"{path}: lists no images")
    return rows


def release_splits(root: Path) -> dict[str, SplitSource]:
    """The release's splits for the writer, breeds named by the image names; fails before
    writing if an image is missing, unnamed or in both lists."""
    lists = {
        split: read_split_list(root / "annotations" / f) for f, split in RELEASE_SPLITS.items()
    }
    # A breed's images share one class id: a line that breaks it is named (breed_names would
    # drop every name from the stems, and the first image checked below would be blamed).
    ids: dict[str, Counter] = {}
    for image, cls in (row for rows in lists.values() for row in rows):
        ids.setdefault(breed_from_stem(image) or "", Counter())[cls] += 1
    for file, split in RELEASE_SPLITS.items():
        for image, cls in lists[split]:
            breed = breed_from_stem(image) or ""
            (usual, n), *others = ids[breed].most_common()
            if breed and others and cls != usual:
                raise UserError(
                    f"{root / 'annotations' / file}: {image} has class id {cls}, but {n} other "
                    f"{breed} image(s) have {usual}; correct that line"
                )
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


# ---------------------------------------------------------------- loading a dataset
OFFLINE_HELP = (
    "without network, run python -m tune_pets.prepare with --from DIR (the official release: "
    "DIR/images and DIR/annotations, or torchvision's OxfordIIITPet root) or --dataset DIR (a copy "
    "of the hub dataset's parquet files), or copy an ImageFolder to DIR/train/<breed>/*.jpg and "
    "DIR/test/<breed>/*.jpg and pass --data-dir DIR to the other commands"
)


def load_hf_dataset(name: str = DEFAULT_DATASET, progress: bool = True) -> Any:
    """The ``DatasetDict`` of a local folder (parquet files) or of a hub dataset id. Each
    failure is one ``UserError`` line: hub unreachable (within seconds), no such dataset, or
    unreadable."""
    import datasets

    if not progress:
        datasets.disable_progress_bars()
    if Path(name).is_dir():
        return _load_local(Path(name))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not OWNER/NAME
        raise UserError(f"--dataset {name}: folder not found; pass the folder of a parquet copy")
    offline_why = hub.offline_reason(datasets_too=True) or hub_unreachable()
    if offline_why is None:
        print(f"downloading {name} from the Hugging Face hub...", flush=True)
    try:  # unreachable: the datasets cache may still hold it (a copy made while online)
        with hub.hub_offline_mode() if offline_why else contextlib.nullcontext():
            return datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 - each kind of failure gets its own line below
        if hub.is_network_error(e):  # offline, datasets says so with a ConnectionError too
            why = offline_why or f"{type(e).__name__}: {first_line(e)}"
            raise UserError(
                f"cannot download {name!r}: the Hugging Face hub is unreachable ({why}) and "
                f"the dataset is not in the local cache; {OFFLINE_HELP}"
            ) from None
        if hub.is_not_found_error(e):
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
            f"data/train-*.parquet and data/test-*.parquet), or use --from for the official release"
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
        root = release_root(from_dir)
        kind = "torchvision OxfordIIITPet root" if root.name == TORCHVISION_FOLDER else "release"
        source = f"{kind} {root.resolve()}"
        return build_atomically(release_splits(root), output_dir, source=source, progress=progress)
    source = str(Path(dataset).resolve()) if Path(dataset).is_dir() else dataset
    return write_dataset(
        load_hf_dataset(dataset, progress), output_dir, source=source, progress=progress
    )


# ---------------------------------------------------------------- CLI
def build_parser() -> cli.ArgumentParser:
    p = cli.command_parser(__doc__, "python -m tune_pets.prepare")
    out_help = "the ImageFolder to create; pass it to the other commands as --data-dir"
    p.add_argument("--output-dir", default=DEFAULT_DATA_DIR, metavar="OUTPUT", help=out_help)
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
        marker = read_json(out / MARKER, "marker")
        made_from = marker.get("source", "?") if isinstance(marker, dict) else "?"
        asked = args.from_dir or (args.dataset if args.dataset != DEFAULT_DATASET else None)
        path = str(Path(asked or ".").resolve())  # as prepare() records it: KIND PATH, or PATH
        ends = (f" {path}", f" {path}/{TORCHVISION_FOLDER}")
        if asked and asked != made_from and made_from != path and not made_from.endswith(ends):
            raise UserError(
                f"--output-dir {out} is already prepared, from {made_from}, not {asked}; delete "
                "it or pick another --output-dir to prepare from that"
            )
        print(f"{out} is already prepared from {made_from} ({MARKER} found); nothing to do")
        return 0
    prepare(out, args.dataset, progress=not args.no_progress, from_dir=args.from_dir)
    marker = read_json(out / MARKER, "marker")
    counts = ", ".join(f"{n} {s}" for s, n in marker["counts"].items())
    print(
        f"wrote {out}: {counts} images, {marker['num_classes']} classes "
        f"({marker['converted_to_jpeg']} converted to JPEG)"
    )
    return 0


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.prepare")
