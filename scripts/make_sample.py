"""Build the small photo sample shipped inside the package (``tune_pets/sample_data``).

    python scripts/make_sample.py                       # from ../shared/data/oxford_pets_sample
    python scripts/make_sample.py --source DIR --out /tmp/sample --size 160

It reads an ImageFolder copy of Oxford-IIIT Pet (``train/<breed>/<breed>_<id>.jpg``,
``test/...``), takes the first ``--per-class-train`` / ``--per-class-test`` images of every breed
by numeric id, decodes each one as 8-bit RGB (GIF/palette and RGBA files, which the dataset
names ``.jpg``, become RGB; transparency is composited on white, as ``tune_pets.data`` does),
resizes it so its shorter side is ``--size`` px (Lanczos), and writes a baseline JPEG without
metadata, keeping the original file stem. It then writes ``README.md`` (license, attribution,
what was changed, counts). The output is a pure function of the source files, the arguments and
the Pillow build: running it twice gives byte-identical files. ``--out`` is replaced as a whole.
Needs only Pillow.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from PIL import Image, ImageOps, __version__ as PILLOW_VERSION

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "oxford_pets_sample"
DEFAULT_OUT = REPO / "tune_pets" / "sample_data"
SPLITS = ("train", "test")
_ID = re.compile(r"_(\d+)$")


def image_id(path: Path) -> tuple[int, str]:
    """Sort key: the dataset's numeric id at the end of the stem (``Bengal_12`` -> 12)."""
    m = _ID.search(path.stem)
    return (int(m.group(1)) if m else sys.maxsize, path.name)


def list_images(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=image_id)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; palette transparency and alpha are composited on white."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def convert(src: Path, dst: Path, size: int, quality: int) -> str:
    """Write ``src`` as an RGB JPEG whose shorter side is ``size``; returns the source format."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-transparency warnings are noise here
        with Image.open(src) as img:
            fmt = img.format or "?"
            img.load()  # first frame of a GIF
            rgb = to_rgb(ImageOps.exif_transpose(img))
    w, h = rgb.size
    scale = size / min(w, h)
    new = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
    rgb = rgb.resize(new, Image.Resampling.LANCZOS)
    rgb.save(dst, "JPEG", quality=quality, optimize=True, progressive=False, subsampling="4:2:0")
    return fmt


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


README = """\
# Oxford-IIIT Pet: a small downscaled sample shipped with tune_pets

{n_total} photos of the 37 breeds of the Oxford-IIIT Pet dataset, {per_train} per breed in
`train/` ({n_train} images) and {per_test} per breed in `test/` ({n_test} images), in the
ImageFolder layout the project reads (`train/<breed>/<breed>_<id>.jpg`; cats are Capitalized,
dogs lower_case, as in the dataset's file names). It exists so that a plain clone, offline,
can run the quick start (`python -m tune_pets.pipeline --smoke`, or `--data-dir sample` in
any command). It is far too small to be a benchmark: numbers measured on it mean nothing.

## Source, license, attribution

- Images from the **Oxford-IIIT Pet dataset**: O. M. Parkhi, A. Vedaldi, A. Zisserman,
  C. V. Jawahar, "Cats and Dogs", IEEE Conference on Computer Vision and Pattern Recognition
  (CVPR), 2012. <https://www.robots.ox.ac.uk/~vgg/data/pets/>
- The dataset is available under the Creative Commons Attribution-ShareAlike 4.0
  International license (CC BY-SA 4.0, <https://creativecommons.org/licenses/by-sa/4.0/>).
  The copyright of the images remains with their original owners.
- The images in this folder are adapted (downscaled and re-encoded) from those images and
  are distributed under the same license, **CC BY-SA 4.0**; if you share them or further
  adapt them, keep this attribution and the license. This license covers the images and
  this file only; the code of tune_pets is under its own license.

## What was changed

- Chosen: for every breed, the first {per_train} images of the source `train/` folder and the
  first {per_test} of its `test/` folder, sorted by the numeric image id in the file name.
  The source was the 981-image sample of original files used by the project's tests (for 34
  breeds its train/test split is a 70/30 split by image id, not the official one).
- Resized so that the shorter side is {size} px (Lanczos), aspect ratio kept.
- Re-encoded as baseline JPEG, quality {quality}, 4:2:0 chroma subsampling, all metadata
  (EXIF, ICC profiles) dropped; pixel values were not colour-managed.
- Files that were not RGB JPEGs despite their `.jpg` name were converted to RGB JPEG:
{quirks}
- File stems are the dataset's originals, so every image can be traced back to it.

Size: {n_total} images, {jpeg_bytes:,} bytes of JPEG.

## How it was made

    python scripts/make_sample.py --per-class-train {per_train} --per-class-test {per_test} \\
        --size {size} --quality {quality}

with Pillow {pillow}, from a copy of the sample at `../shared/data/oxford_pets_sample`.
Re-running it gives byte-identical files (with the same Pillow build).
"""


def build(source: Path, out: Path, per_train: int, per_test: int, size: int, quality: int) -> int:
    """Write the sample into a temporary folder next to ``out``, then swap it in. Returns the
    total size in bytes."""
    for split in SPLITS:
        if not (source / split).is_dir():
            raise SystemExit(f"make_sample: error: {source / split} is not a folder (--source)")
    # --out is replaced as a whole: only an earlier sample (or an empty folder) may go.
    if out.is_file() or out.is_dir() and {p.name for p in out.iterdir()} - {"README.md", *SPLITS}:
        raise SystemExit(f"make_sample: error: --out {out} holds other files than a sample's")
    breeds = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    want = {"train": per_train, "test": per_test}
    short = []
    for split in SPLITS:
        for b in breeds:
            n = len(list_images(source / split / b)) if (source / split / b).is_dir() else 0
            if n < want[split]:
                short.append(f"{split}/{b} has {n} < {want[split]}")
    if short:
        raise SystemExit("make_sample: error: not enough images: " + "; ".join(short))

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        quirks, counts, jpeg_bytes = [], dict.fromkeys(SPLITS, 0), 0
        for split in SPLITS:
            for b in breeds:
                (tmp / split / b).mkdir(parents=True)
                for src in list_images(source / split / b)[: want[split]]:
                    dst = tmp / split / b / f"{src.stem}.jpg"
                    fmt = convert(src, dst, size, quality)
                    jpeg_bytes += dst.stat().st_size
                    counts[split] += 1
                    if fmt != "JPEG":
                        quirks.append(f"  `{split}/{b}/{src.name}` ({fmt})")
        n_total = counts["train"] + counts["test"]
        text = README.format(
            n_total=n_total,
            n_train=counts["train"],
            n_test=counts["test"],
            per_train=per_train,
            per_test=per_test,
            size=size,
            quality=quality,
            quirks="\n".join(quirks) if quirks else "  none among the chosen files.",
            jpeg_bytes=jpeg_bytes,
            pillow=PILLOW_VERSION,
        )
        (tmp / "README.md").write_text(text, encoding="utf-8")
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0o700; the sample is read by anyone
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = folder_bytes(out)
    print(
        f"wrote {out}: {counts['train']} train + {counts['test']} test images, "
        f"{len(breeds)} breeds, shorter side {size} px, quality {quality}, {total:,} bytes"
    )
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help="ImageFolder copy of the dataset"
    )
    out_help = "output folder, replaced as a whole if it holds an earlier sample"
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=out_help)
    ap.add_argument("--per-class-train", type=int, default=5, help="train images per breed")
    ap.add_argument("--per-class-test", type=int, default=3, help="test images per breed")
    ap.add_argument("--size", type=int, default=144, help="shorter side in px")
    ap.add_argument("--quality", type=int, default=85, help="JPEG quality")
    args = ap.parse_args(argv)
    if min(args.per_class_train, args.per_class_test, args.size) < 1:
        ap.error("--per-class-train, --per-class-test and --size must be >= 1")
    if not 1 <= args.quality <= 95:
        ap.error("--quality must be in 1..95")
    build(args.source, args.out, args.per_class_train, args.per_class_test, args.size, args.quality)
    return 0


if __name__ == "__main__":
    sys.exit(main())
