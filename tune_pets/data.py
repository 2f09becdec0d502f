"""Data: ImageFolder scanning, a seeded stratified val split, the decode-once uint8 cache, and
batched tensor augmentation.

    train = load_split("data/oxford_pets", "train", res=cache_res(224, 0.875))
    x = train_augment(to_device_uint8(train.images, idx, device), 224, mean, std)

Layout: ``DATA_DIR/train/<class>/*`` plus ``test/`` (or ``val/``). Any PIL-readable file is an
image whatever its extension; hidden and known non-image files are ignored. Images are decoded
once, resized (shorter side) and center-cropped to ``res x res``, and cached as uint8
``[N, res, res, 3]`` keyed by the data's fingerprint, so training never decodes a JPEG.
Augmentation (torchvision's RandomResizedCrop + flip, then normalize) runs on batches of tensors:
on CPU an antialiased uint8 resize per crop (as torchvision), on CUDA one batched ``grid_sample``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import unicodedata
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from tune_pets.config import DEFAULT_VAL_FRACTION
from tune_pets.utils import UserError, atomic_path, atomic_write_json, usable_cores

if TYPE_CHECKING:  # torch is imported lazily: scanning and caching do not need it
    import torch

HELDOUT_NAMES = ("test", "val")
IMAGE_EXTS = set(".jpg .jpeg .png .gif .bmp .webp .tif .tiff .ppm .pgm".split())
NON_IMAGE_EXTS = set(
    ".txt .md .csv .json .xml .yaml .yml .db .ini .py .html .pdf .log .mat .npy .npz .pt .zip "
    ".tar .gz".split()
)
CACHE_VERSION = 2  # bump when the decode/resize rule or the cache metadata changes


def default_cache_dir() -> Path:
    # An empty value is unset (not the working folder).
    return Path(os.environ.get("TUNE_PETS_CACHE") or Path.home() / ".cache" / "tune_pets")


# ---------------------------------------------------------------- decoding
class BadImageError(Exception):
    pass


def load_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Open any PIL-readable image as 8-bit RGB: GIF/palette, RGBA (over white), grayscale,
    CMYK, 16-bit, EXIF-rotated. Raises ``BadImageError`` naming the file otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency and EXIF warnings are noise
            # ...but an image over PIL's pixel limit is refused, not decoded with a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # closed: PIL keeps a GIF's file open for its frames
                if draft_size and img.format == "JPEG":
                    # libjpeg decodes at a reduced scale (>= draft_size): several times faster.
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(
            f"{path}: image too large, refused as a possible decompression bomb ({e})"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        size = os.path.getsize(path) if os.path.exists(path) else -1
        why = "empty file (0 bytes)" if size == 0 else f"unreadable or truncated image ({e})"
        if os.path.islink(path) and size < 0:
            why = f"a broken symlink (to {os.readlink(path)})"
        raise BadImageError(f"{path}: {why}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of a decoded image: 16-bit scaled down, float in [0, 1] (a float TIFF) scaled
    up, transparency composited over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size else 0.0
        scale = 255.0 / 65535.0 if top > 255 else 255.0 if img.mode == "F" and top <= 1 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def decode_square(path: str, res: int, interpolation: str = "bilinear") -> np.ndarray:
    """Decode, resize the shorter side to ``res`` and center-crop to ``res x res`` (uint8 HWC)."""
    img = load_rgb(path, draft_size=res)
    w, h = img.size
    scale = res / min(w, h)
    nw, nh = max(res, round(w * scale)), max(res, round(h * scale))
    resample = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
    img = img.resize((nw, nh), resample)
    left, top = (nw - res) // 2, (nh - res) // 2
    return np.asarray(img.crop((left, top, left + res, top + res)), dtype=np.uint8)


def _decode_worker(args: tuple[str, int, str]) -> tuple[np.ndarray | None, str | None]:
    try:
        return decode_square(*args), None
    except BadImageError as e:
        return None, str(e)


def _start_worker() -> None:
    """A decode worker's start. Ctrl-C and SIGTERM reach the whole process group, and the
    parent stops the pool (it cancels the queued images): a worker that took the signal
    itself, between two images, died and broke the pool, CPython's executor then failed on a
    cancelled future, and the command hung at exit (2 of 26 Ctrl-Cs during a decode). On
    Linux a parent killed outright (SIGKILL, the OOM killer) takes its workers with it; they
    stayed blocked on the job queue for good."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


# ---------------------------------------------------------------- scanning
@dataclass
class SplitIndex:
    """The files of one split: paths relative to the data dir, labels into ``classes``."""

    name: str
    paths: list[str]
    labels: list[int]
    classes: list[str]
    ignored: list[str] = field(default_factory=list)  # non-image files passed over


def _is_image_candidate(p: Path) -> bool:
    ext = p.suffix.lower()
    if p.name.startswith(".") or ext in NON_IMAGE_EXTS:
        return False
    if ext in IMAGE_EXTS:
        return True
    try:  # any extension: an image is whatever PIL can identify
        with Image.open(p):
            return True
    except Exception:  # noqa: BLE001 - not an image, ignore it
        return False


def heldout_split_name(data_dir: Path) -> str:
    for name in HELDOUT_NAMES:
        if (data_dir / name).is_dir():
            return name
    raise UserError(
        f"{data_dir}: no held-out split: expected a {' or '.join(HELDOUT_NAMES)}/ folder "
        f"next to train/ (see README, 'Data')"
    )


def check_data_dir(data_dir: str | os.PathLike) -> Path:
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is a file; point it at an ImageFolder root")
    if not data_dir.is_dir():
        raise UserError(
            f"--data-dir {data_dir} does not exist; run `python -m tune_pets.prepare "
            f"--output-dir {data_dir}` or point --data-dir at an ImageFolder copy"
        )
    if not (data_dir / "train").is_dir():
        raise UserError(
            f"--data-dir {data_dir} has no train/ folder; expected "
            f"{data_dir}/train/<class>/*.jpg and {data_dir}/test/<class>/*.jpg"
        )
    # The held-out split is part of the layout, and its classes must all have training images.
    heldout = data_dir / heldout_split_name(data_dir)
    _check_heldout_classes(heldout, class_names(heldout), class_names(data_dir / "train"))
    return data_dir


def class_names(root: Path) -> list[str]:
    """The class folders of the split folder ``root``, sorted (hidden folders are none)."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def check_unicode_form(root: Path, extra: Sequence[str], known: Sequence[str], where: str) -> None:
    """Refuse the class folders ``extra`` of ``root`` (names not in ``known``, the classes of
    ``where``) when one is a known class spelled in another Unicode form."""
    nfc = {unicodedata.normalize("NFC", k) for k in known}  # a copy from macOS: NFD names
    if any(unicodedata.normalize("NFC", e) in nfc for e in extra):
        raise UserError(
            f"{root}: class folder(s) {', '.join(map(repr, extra))} are spelled in another "
            f"Unicode form (NFC/NFD) than in {where}; rename them to match"
        )


def _check_heldout_classes(root: Path, names: Sequence[str], train: Sequence[str]) -> None:
    extra = sorted(set(names) - set(train))
    check_unicode_form(root, extra, train, str(root.parent / "train"))
    if extra:
        raise UserError(
            f"{root}: class folder(s) {', '.join(map(repr, extra))} are not in "
            f"{root.parent / 'train'}; every held-out class needs training images"
        )


def _utf8(rel: str, path: Path) -> str:
    """``rel``, refused in one line when the name is not UTF-8 (bytes Python keeps as surrogates:
    the fingerprint's encode, and every file that lists paths, failed with a traceback)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise UserError(f"{shown}: the name is not UTF-8; rename it") from None
    return rel


def scan_split(data_dir: Path, split: str, classes: Sequence[str] | None = None) -> SplitIndex:
    """List the images of ``data_dir/split``. ``classes`` (from train) fixes the label order."""
    root = data_dir / split
    if not root.is_dir():
        raise UserError(f"{root} does not exist; expected {root}/<class>/<image files>")
    names = class_names(root)
    if not names:
        raise UserError(f"{root} has no class folders; expected {root}/<class>/<image files>")
    classes = names if classes is None else classes
    _check_heldout_classes(root, names, classes)
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, ignored = [], [], []
    for d in (root / name for name in names):
        files = sorted(
            p
            for p in d.rglob("*")
            # A broken symlink is listed: it fails to load like any unreadable image.
            if (p.is_file() or p.is_symlink() and not p.exists())
            and not any(part.startswith(".") for part in p.relative_to(d).parts[:-1])
        )
        n_before = len(paths)
        for p in files:
            rel = _utf8(p.relative_to(data_dir).as_posix(), p)
            if _is_image_candidate(p):
                paths.append(rel)
                labels.append(index[d.name])
            else:
                ignored.append(rel)
        if len(paths) == n_before and split == "train":
            raise UserError(f"class folder {d} has no images; add images or remove the folder")
    return SplitIndex(split, paths, labels, list(classes), ignored)


def fingerprint(data_dir: Path, index: SplitIndex) -> str:
    """Content key of a split: paths, sizes and mtimes (cheap; changes when any file does)."""
    h = hashlib.sha1(f"v{CACHE_VERSION}|{index.name}|{'|'.join(index.classes)}".encode())
    for rel, label in zip(index.paths, index.labels, strict=True):
        try:
            st = (data_dir / rel).stat()
        except FileNotFoundError:  # a broken symlink (a bad image to the loader): the link's
            st = (data_dir / rel).lstat()
        h.update(f"{rel}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the decode-once cache
@dataclass
class ImageSplit:
    """Decoded images of one split: uint8 ``images[N, res, res, 3]``, int64 ``labels[N]``."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    paths: list[str]
    classes: list[str]
    fingerprint: str
    skipped: list[str] = field(default_factory=list)  # bad files skipped (--skip-bad-images)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray, name: str) -> ImageSplit:
        idx = np.asarray(idx, dtype=np.int64)
        paths = [self.paths[i] for i in idx]
        images, labels = self.images[idx], self.labels[idx]
        return replace(self, name=name, images=images, labels=labels, paths=paths)


def load_split(
    data_dir: str | os.PathLike,
    split: str,
    res: int,
    *,
    interpolation: str = "bilinear",
    cache_dir: str | os.PathLike | None = None,
    skip_bad: bool = False,
    classes: Sequence[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> ImageSplit:
    """Decoded ``split`` at side ``res`` from the cache, decoding (in parallel) on a miss."""
    data_dir = check_data_dir(data_dir)
    index = scan_split(data_dir, split, classes)
    if not index.paths:
        raise UserError(f"{data_dir / split} contains no images")
    fp = fingerprint(data_dir, index)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    arr_path = cache / "images" / f"{split}-{fp}-r{res}-{interpolation}.npy"

    def check(meta: dict, images: np.ndarray) -> str | None:
        want = (len(meta["labels"]), res, res, 3)
        if images.shape != want or images.dtype != np.uint8:
            return f"shape {images.shape} {images.dtype}, expected {want} uint8"
        return None

    cached = load_entry(arr_path, "decode cache", check)
    if cached is not None:
        meta, images = cached
    else:
        images = np.empty((len(index.paths), res, res, 3), dtype=np.uint8)
        keep = np.ones(len(index.paths), dtype=bool)
        errors: list[str] = []
        jobs = [(str(data_dir / p), res, interpolation) for p in index.paths]
        workers = workers or min(usable_cores(), 8)
        with contextlib.ExitStack() as stack:
            results = map(_decode_worker, jobs)
            if workers > 1 and len(jobs) > 64:
                # fork on Linux, as before Python 3.14 made a forkserver the default: that
                # server and its helper are processes in the command's group too, and were
                # left behind for a second or two after a Ctrl-C or SIGTERM
                fork = multiprocessing.get_context("fork") if sys.platform == "linux" else None
                pool = ProcessPoolExecutor(workers, mp_context=fork, initializer=_start_worker)
                stack.callback(pool.shutdown, cancel_futures=True)  # stopped: drop the queue
                results = pool.map(_decode_worker, jobs, chunksize=16)
            desc = f"decode {split} @{res}px"
            bar = progress_bar(results, len(jobs), desc, progress, leave=False)
            for i, (arr, err) in enumerate(bar):
                if err is None:
                    images[i] = arr
                else:
                    keep[i] = False
                    errors.append(err)
        if errors and not skip_bad:
            _raise_bad(errors)  # before the entry is saved: the user fixes the files
        images = images[keep]
        meta = {
            "labels": np.asarray(index.labels, dtype=np.int64)[keep].tolist(),
            "paths": [p for p, k in zip(index.paths, keep, strict=True) if k],
            "classes": index.classes,
            "skipped": errors,
            "res": res,
            "interpolation": interpolation,
            "ignored": index.ignored,
        }
        save_entry(arr_path, images, meta)
    if meta["skipped"] and not skip_bad:
        _raise_bad(meta["skipped"])
    if meta["skipped"]:
        lines = [f"warning: skipped {len(meta['skipped'])} bad image(s) (--skip-bad-images):"]
        print("\n".join(lines + [f"  {e}" for e in meta["skipped"]]), file=sys.stderr)
    labels = np.asarray(meta["labels"], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(meta["classes"]))
    # Every train folder has image files; one left without any had them all skipped, and a
    # class without images could not be learnt. (A checkpoint's ``classes`` may hold more.)
    if split == "train" and classes is None and not counts.all():
        raise UserError(
            f"class folder {data_dir / split / meta['classes'][int(counts.argmin())]} has no "
            "readable images (all skipped by --skip-bad-images); replace them or remove it"
        )
    return ImageSplit(split, images, labels, meta["paths"], meta["classes"], fp, meta["skipped"])


def save_entry(arr_path: Path, arr: np.ndarray, meta: dict) -> None:
    """A cache entry: the array, then its metadata with the array's CRC-32 (the JSON comes last:
    an array without it is an entry a killed run left half-made)."""
    for stale in arr_path.parent.glob(f".{arr_path.name}.*.tmp"):  # a killed writer's temp file
        with contextlib.suppress(OSError):  # an hour old: no live writer's (they take minutes)
            if time.time() - stale.stat().st_mtime > 3600:
                stale.unlink()
    with atomic_path(arr_path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)
    crc = zlib.crc32(np.ascontiguousarray(arr).data)
    atomic_write_json(arr_path.with_suffix(".json"), {**meta, "crc32": crc})


def load_entry(
    arr_path: Path, what: str, check: Callable[[dict, np.ndarray], str | None]
) -> tuple[dict, np.ndarray] | None:
    """A ``save_entry`` entry checked by ``check(meta, arr)`` (why it is wrong, or None) and its
    CRC-32, or None when it is missing or damaged; a damaged entry is reported in one line (as
    ``what``) and rebuilt by the caller."""
    meta_path = arr_path.with_suffix(".json")
    if not (meta_path.is_file() or arr_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        arr = np.load(arr_path)
        why = check(meta, arr)
        if why is None and zlib.crc32(np.ascontiguousarray(arr).data) != meta["crc32"]:
            why = "checksum mismatch"
        if why is None:
            return meta, arr
    except (OSError, ValueError, EOFError, KeyError, TypeError) as e:
        why = f"{type(e).__name__}: {str(e)[:80]}"
    print(f"warning: {what} {arr_path} is damaged ({why}); rebuilding it", file=sys.stderr)
    return None


def progress_bar(
    items, total: int | None, desc: str, enabled: bool, leave: bool = True, unit: str = "img"
):
    """A tqdm bar over ``items`` on stderr, counting ``unit`` (images, or tqdm's "it" for
    batches and steps); silent unless ``enabled``."""
    from tqdm.auto import tqdm

    off = not enabled or None
    return tqdm(items, total=total, desc=desc, leave=leave, unit=unit, disable=off, file=sys.stderr)


def _raise_bad(errors: list[str]) -> None:
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    raise UserError(
        f"{errors[0]}{more}; delete or fix it, or pass --skip-bad-images to skip bad files"
    )


# ---------------------------------------------------------------- the validation split
def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified train/val indices. Every class with >= 2 images gets >= 1 val image."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(max(int(round(len(idx) * val_fraction)), 1), len(idx) - 1)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def load_or_make_val_split(
    train: ImageSplit,
    split_file: str | os.PathLike,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    reuse_only: bool = False,
) -> tuple[ImageSplit, ImageSplit]:
    """Carve the search's val split out of ``train``; the file lists are saved (and reused when
    they match the same data, fraction and seed) so the split can be audited. ``reuse_only``
    (a resumed search): a saved split for other data is an error, not replaced."""
    split_file = Path(split_file)
    pos = {p: i for i, p in enumerate(train.paths)}
    key = {"fingerprint": train.fingerprint, "val_fraction": val_fraction, "seed": seed}
    try:
        saved = json.loads(split_file.read_text("utf-8")) if split_file.is_file() else {}
        if isinstance(saved, dict) and all(saved.get(k) == v for k, v in key.items()):
            tr = np.asarray([pos[p] for p in saved["train"]], dtype=np.int64)
            va = np.asarray([pos[p] for p in saved["val"]], dtype=np.int64)
            return train.subset(tr, "train"), train.subset(va, "val")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        pass  # stale or broken: make a fresh one below
    if reuse_only and split_file.is_file():  # its trials were scored on the saved split
        raise UserError(
            f"{split_file}: does not match the train images now (added, removed or changed "
            "since it was made, or the file was edited); go on with that data, or start anew"
        )
    tr, va = stratified_split(train.labels, val_fraction, seed)
    lists = {"train": [train.paths[i] for i in tr], "val": [train.paths[i] for i in va]}
    counts = {"n_train": len(tr), "n_val": len(va)}
    atomic_write_json(split_file, {**key, "classes": train.classes, **counts, **lists})
    return train.subset(tr, "train"), train.subset(va, "val")


# ---------------------------------------------------------------- batches and augmentation
def cache_res(img_size: int, crop_pct: float) -> int:
    """Side of the cached square: the eval resize size (``img_size / crop_pct``)."""
    return int(math.floor(img_size / crop_pct))


def iterate_indices(
    n: int, batch_size: int, shuffle: bool, generator=None, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    import torch

    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - (n % batch_size) if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i : i + batch_size]


def to_device_uint8(images: np.ndarray, idx, device) -> torch.Tensor:
    """Gather a uint8 NHWC batch and move it to ``device`` (pinned, non-blocking on CUDA)."""
    import torch

    batch = torch.from_numpy(images[np.asarray(idx)])
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch


def _per_channel(values, x: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)


def eval_transform(x: torch.Tensor, size: int, crop_pct: float, mean, std) -> torch.Tensor:
    """Resize(floor(size / crop_pct)) + CenterCrop(size) + normalize on a cached uint8 NHWC batch.

    The cache holds the image at side ``R``, so in cached pixels this is a center crop of
    ``size * R / floor(size / crop_pct)`` resized to ``size`` (no resize when ``R`` fits).
    """
    import torch.nn.functional as F

    res = x.shape[1]
    crop = min(res, int(round(size * res / math.floor(size / crop_pct))))
    top = (res - crop) // 2
    x = x[:, top : top + crop, top : top + crop].permute(0, 3, 1, 2).float().div_(255.0)
    if crop != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return (x - _per_channel(mean, x)) / _per_channel(std, x)


def random_resized_crop_params(n: int, height: int, width: int, scale=(0.08, 1.0), generator=None):
    """Vectorized torchvision ``RandomResizedCrop.get_params`` (default ratio 3/4..4/3): boxes
    (x0, y0, w, h) per sample; 10 attempts each, then a center crop (torchvision falls back to
    the whole image when its aspect is within the ratio; the cache is square, where they agree)."""
    import torch

    area = height * width
    s = torch.empty(n, 10).uniform_(scale[0], scale[1], generator=generator) * area
    logr = torch.empty(n, 10).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    w, h = torch.sqrt(s * logr.exp()).round(), torch.sqrt(s / logr.exp()).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    found, first = ok.any(1), ok.float().argmax(1)  # the first attempt that fits
    side = torch.tensor(float(min(width, height)))
    cw = torch.where(found, w[torch.arange(n), first], side)
    ch = torch.where(found, h[torch.arange(n), first], side)
    ux, uy = torch.rand(n, 2, generator=generator).unbind(1)
    x0 = torch.where(found, torch.floor(ux * (width - cw + 1)), torch.floor((width - cw) / 2))
    y0 = torch.where(found, torch.floor(uy * (height - ch + 1)), torch.floor((height - ch) / 2))
    return x0, y0, cw, ch


def train_augment(
    x: torch.Tensor, size: int, mean, std, scale_min=0.08, hflip=0.5, generator=None
) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip + normalize on a uint8 NHWC batch.

    Boxes and flips are drawn on the CPU ``generator`` (torchvision's rule), so they do not
    depend on the device. On CPU each crop is resized on uint8, antialiased (what torchvision's
    tensor transform runs), keeping float temporaries small; on CUDA one batched bilinear
    ``grid_sample`` (no antialiasing: the cache at ``img_size / crop_pct`` keeps crops small).
    """
    import torch

    n, h, w = x.shape[0], x.shape[1], x.shape[2]
    x0, y0, cw, ch = random_resized_crop_params(n, h, w, (scale_min, 1.0), generator=generator)
    flip = torch.rand(n, generator=generator) < hflip
    if x.device.type == "cpu":
        out = _resized_crops_uint8(x, x0, y0, cw, ch, flip, size).float()
    else:
        out = _resized_crops_grid(x, x0, y0, cw, ch, flip, size)
    # 0..255 values -> normalized, in one fused in-place pass.
    s, m = _per_channel(std, out), _per_channel(mean, out)
    return out.mul_(1 / (255 * s)).add_(-m / s)


def _resized_crops_uint8(x, x0, y0, cw, ch, flip, size: int) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    src = x.permute(0, 3, 1, 2)  # uint8 NCHW view with channels-last strides (no copy)
    out = torch.empty(
        x.shape[0], 3, size, size, dtype=torch.uint8, memory_format=torch.channels_last
    )
    boxes = torch.stack([x0, y0, cw, ch], 1).long().tolist()
    # One thread: the crops are small, and with a busy core two-thread ops on them stalled
    # (3-12x slower, docs/benchmark-investigation.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, (left, top, width, height) in enumerate(boxes):
            crop = src[i : i + 1, :, top : top + height, left : left + width]
            r = F.interpolate(
                crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
            out[i : i + 1] = r.flip(-1) if flip[i] else r
    finally:
        torch.set_num_threads(threads)
    return out


def _resized_crops_grid(x, x0, y0, cw, ch, flip, size: int) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    h, w = x.shape[1], x.shape[2]
    sign = torch.where(flip, -1.0, 1.0)
    # Output pixel centers in [-1, 1] (align_corners=False) mapped into each crop box: the grid
    # affine_grid would build, computed directly from per-sample scales and offsets.
    base = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    gx = (cw / w * sign)[:, None] * base[None, :] + ((2 * x0 + cw) / w - 1)[:, None]
    gy = (ch / h)[:, None] * base[None, :] + ((2 * y0 + ch) / h - 1)[:, None]
    gx, gy = gx.to(x.device), gy.to(x.device)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    # Sample 0..255 values (bilinear sampling is linear; /255 is folded into the normalize).
    src = x.permute(0, 3, 1, 2).float()
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
