"""Data sanity report: class counts, image sizes, sample grids and odd files of an ImageFolder.

    python -m tune_pets.sanity --data-dir data/oxford_pets --artifacts-dir artifacts

Reads the files as training does (``data.scan_split``, ``load_rgb``) and writes into
``<artifacts>/data_sanity/``: ``class_counts.csv`` (images per class and split),
``image_sizes.csv`` (split, path, class, format, mode, width, height), ``odd_files.csv`` (named
.jpg but not a JPEG, not RGB, unreadable, or ignored non-image files), ``grid_<split>.png`` (a
deterministic round-robin sample, every class at least once by default) and ``summary.json``
(read by ``tune_pets.report``). Odd files are reported, not fixed: training converts them to RGB
and fails on unreadable ones unless given ``--skip-bad-images``.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from tune_pets.data import BadImageError, SplitIndex, check_data_dir, heldout_split_name
from tune_pets.data import load_rgb, progress_bar, scan_split
from tune_pets import cli
from tune_pets.figures import figure_style, save
from tune_pets.utils import atomic_write_csv, atomic_write_json, cli_main, usable_cores

JPEG_EXTS = (".jpg", ".jpeg")
DRAFT_SIZE = 64  # decode JPEGs at reduced scale: every byte is still read, much faster
SMALL_SIDE = 224  # images whose shorter side is below the networks' input size are counted
GRID_THUMB = 160  # pixels per grid thumbnail
ISSUES = ("not_jpeg", "not_rgb", "unreadable", "ignored_non_image")
FACTS = ("format", "mode", "width", "height")  # an image's header facts


def inspect_image(path: str | os.PathLike) -> dict:
    """Header facts of one file (format, mode, width, height) and whether it decodes."""
    info: dict = dict.fromkeys([*FACTS, "error"])
    # An unidentifiable header leaves the facts empty: load_rgb below says why.
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):  # turned 90 degrees
                width, height = height, width  # as training sees it (load_rgb applies EXIF)
            info.update(format=img.format, mode=img.mode, width=width, height=height)
    try:
        load_rgb(path, draft_size=DRAFT_SIZE)
    except BadImageError as e:
        info["error"] = str(e)
    return info


def _issues(rel_path: str, info: dict) -> dict[str, str]:
    """Issue code -> what it means for this image file (empty: nothing odd)."""
    issues = {}
    suffix = Path(rel_path).suffix
    if info["format"] and suffix.lower() in JPEG_EXTS and info["format"] != "JPEG":
        issues["not_jpeg"] = f"named {suffix} but is {info['format']}"
    if info["mode"] and info["mode"] != "RGB":
        issues["not_rgb"] = f"mode {info['mode']} (converted to RGB when loaded)"
    if info["error"]:
        issues["unreadable"] = info["error"]
    return issues


def _inspect_all(data_dir: Path, paths: list[str], workers: int, progress: bool) -> list[dict]:
    # Threads: Pillow decodes with the GIL released, and threads need no pickling or fork.
    with ThreadPoolExecutor(workers) as pool:
        infos = pool.map(inspect_image, [data_dir / p for p in paths], chunksize=1)
        return list(progress_bar(infos, len(paths), "inspect images", progress, leave=False))


def size_stats(sizes: Sequence[tuple[int, int]]) -> dict:
    """min/median/max of width, height and aspect (w/h) of (w, h) pairs; count of small images."""
    if not sizes:
        return {"n": 0}
    w, h = np.asarray(sizes, dtype=float).T
    stats: dict = {"n": len(w)}
    for name, v in (("width", w), ("height", h), ("aspect", w / h)):
        for stat, f in (("min", np.min), ("median", np.median), ("max", np.max)):
            stats[f"{name}_{stat}"] = round(float(f(v)), 4) if name == "aspect" else float(f(v))
    stats[f"n_short_side_lt_{SMALL_SIDE}"] = int((np.minimum(w, h) < SMALL_SIDE).sum())
    return stats


def class_balance(counts: dict[str, int]) -> dict:
    """min/max images per class (with the class names), mean and median."""
    lo = min(counts, key=lambda c: (counts[c], c))
    hi = max(counts, key=lambda c: (counts[c], c))
    values = np.asarray(list(counts.values()), dtype=float)
    return {
        "min": counts[lo],
        "min_class": lo,
        "max": counts[hi],
        "max_class": hi,
        "mean": round(float(values.mean()), 2),
        "median": float(np.median(values)),
        "empty_classes": sorted(c for c, n in counts.items() if n == 0),
    }


def grid_sample(
    index: SplitIndex, n: int, seed: int = 0, exclude: set[str] | frozenset = frozenset()
) -> list[tuple[str, str]]:
    """A deterministic sample of ``n`` (path, class) pairs: each class shuffled with ``seed``,
    then taken round-robin over classes so the grid shows as many classes as it can."""
    rng = np.random.default_rng(seed)
    per_class: dict[int, list[str]] = {}
    for p, y in zip(index.paths, index.labels, strict=True):
        if p not in exclude:
            per_class.setdefault(y, []).append(p)
    queues = {y: [ps[i] for i in rng.permutation(len(ps))] for y, ps in sorted(per_class.items())}
    # Round-robin: every class's first pick in class order, then every class's second, ...
    picks = sorted((depth, y, p) for y, q in queues.items() for depth, p in enumerate(q))
    return [(p, index.classes[y]) for _, y, p in picks[:n]]


def save_grid(
    data_dir: Path, sample: list[tuple[str, str]], path: Path, title: str, odd: set[str]
) -> None:
    """Thumbnails titled by class name; odd files (not JPEG / not RGB) get a red title."""
    cols = math.ceil(math.sqrt(max(1, len(sample))))
    rows = math.ceil(max(1, len(sample)) / cols)
    with figure_style() as plt:
        fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.85 * rows + 0.4), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (rel, cls) in zip(axes.flat, sample, strict=False):  # more axes than images
            img = load_rgb(data_dir / rel, draft_size=GRID_THUMB)
            img.thumbnail((GRID_THUMB, GRID_THUMB))
            ax.imshow(np.asarray(img))
            label = cls if len(cls) <= 24 else cls[:23] + "."
            ax.set_title(label, fontsize=7, color="red" if rel in odd else "black")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        save(fig, path, dpi=100)


def run_sanity(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    grid_per_split: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Inspect every file of ``data_dir`` (train + held-out split), write the CSVs, grids and
    ``summary.json`` into ``out_dir``, and return the summary dict."""
    data_dir = check_data_dir(data_dir)
    out_dir = Path(out_dir)
    train = scan_split(data_dir, "train")
    splits = [train, scan_split(data_dir, heldout_split_name(data_dir), train.classes)]
    classes = train.classes
    workers = workers or min(usable_cores(), 8)

    size_rows, odd_rows = [], []
    counts, dims = {}, {}  # dims: (width, height) of each readable image, per split
    odd_paths, bad_paths = set(), set()  # paths relative to data_dir: unique across splits
    for index in splits:
        name = index.name
        infos = _inspect_all(data_dir, index.paths, workers, progress)
        counts[name] = per_class = dict.fromkeys(classes, 0)
        dims[name] = []
        for rel, y, info in zip(index.paths, index.labels, infos, strict=True):
            facts = {k: info[k] for k in FACTS}
            size_rows.append({"split": name, "path": rel, "class": classes[y], **facts})
            if info["width"] and not info["error"]:
                dims[name].append((info["width"], info["height"]))
            issues = _issues(rel, info)
            per_class[classes[y]] += "unreadable" not in issues  # the images training can use
            if issues:
                odd_paths.add(rel)
                if "unreadable" in issues:
                    bad_paths.add(rel)
                row = {"split": name, "path": rel, "issues": ";".join(issues)}
                odd_rows.append({**row, **facts, "detail": "; ".join(issues.values())})
        for rel in index.ignored:
            row = {"split": name, "path": rel, "issues": "ignored_non_image"}
            odd_rows.append({**row, "detail": "not an image: ignored by training"})
    sizes = {name: size_stats(d) for name, d in dims.items()}
    sizes["all"] = size_stats([wh for d in dims.values() for wh in d])

    names = [s.name for s in splits]
    count_rows = [
        {"class": c, **{s: counts[s][c] for s in names}, "total": sum(counts[s][c] for s in names)}
        for c in classes
    ]
    atomic_write_csv(out_dir / "class_counts.csv", count_rows, ["class", *names, "total"])
    atomic_write_csv(out_dir / "image_sizes.csv", size_rows, ["split", "path", "class", *FACTS])
    odd_fields = ["split", "path", "issues", *FACTS, "detail"]
    atomic_write_csv(out_dir / "odd_files.csv", odd_rows, odd_fields)

    grids = []
    for old in out_dir.glob("grid_*.png"):  # an earlier run's: the report embeds what is here
        old.unlink()
    if grid_per_split is None:
        grid_per_split = max(36, len(classes))  # every class appears at least once
    for index in splits:  # --grid-per-split 0: every sample is empty, no grid
        sample = grid_sample(index, grid_per_split, seed, exclude=bad_paths)
        if sample:
            path = out_dir / f"grid_{index.name}.png"
            title = (
                f"{data_dir.name}/{index.name}: {len(sample)} of {len(index.paths)} "
                f"images (seed {seed}; red title = odd file)"
            )
            save_grid(data_dir, sample, path, title, odd_paths)
            grids.append(path.name)

    by_issue = {k: sum(k in r["issues"].split(";") for r in odd_rows) for k in ISSUES}
    summary = {
        "data_dir": str(data_dir),
        "splits": names,
        "num_classes": len(classes),
        "classes": classes,
        "counts": {s: sum(counts[s].values()) for s in names},
        "per_class": {s: class_balance(counts[s]) for s in names},
        "sizes": sizes,
        "n_odd_files": len(odd_rows),
        "odd_by_issue": by_issue,
        "n_unreadable": by_issue["unreadable"],
        "n_ignored": by_issue["ignored_non_image"],
        "grid_seed": seed,
        "files": ["class_counts.csv", "image_sizes.csv", "odd_files.csv", *grids, "summary.json"],
    }
    atomic_write_json(out_dir / "summary.json", summary)
    summary["odd_files"] = odd_rows  # for callers and the printout; the CSV holds them on disk
    return summary


def print_summary(summary: dict, out_dir: Path, max_odd: int = 25) -> None:
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items())
    print(f"{summary['data_dir']}: {summary['num_classes']} classes; {counts} images")
    for split, b in summary["per_class"].items():
        empty = f"; no images for {', '.join(b['empty_classes'])}" if b["empty_classes"] else ""
        print(
            f"  {split:5s} per class: min {b['min']} ({b['min_class']}), max {b['max']} "
            f"({b['max_class']}), mean {b['mean']:.1f}{empty}"
        )
    s = summary["sizes"]["all"]
    if s.get("n"):
        print(
            f"  sizes: width {s['width_min']:.0f}/{s['width_median']:.0f}/{s['width_max']:.0f}, "
            f"height {s['height_min']:.0f}/{s['height_median']:.0f}/{s['height_max']:.0f} "
            f"(min/median/max), aspect {s['aspect_min']:.2f}..{s['aspect_max']:.2f}, "
            f"{s[f'n_short_side_lt_{SMALL_SIDE}']} with shorter side < {SMALL_SIDE}px"
        )
    odd = summary["odd_files"]
    issues = ", ".join(f"{n} {k}" for k, n in summary["odd_by_issue"].items() if n)
    print(f"  odd files: {len(odd)}" + (f" ({issues})" if issues else ""))
    for r in odd[:max_odd]:
        print(f"    {r['path']}: {r['detail']}")
    if len(odd) > max_odd:
        print(f"    ... and {len(odd) - max_odd} more in {out_dir / 'odd_files.csv'}")
    print(f"wrote {out_dir}/ ({', '.join(summary['files'])})")


def build_parser() -> cli.ArgumentParser:
    p = cli.command_parser(__doc__, "python -m tune_pets.sanity")
    p.add_argument(
        "--grid-per-split",
        type=cli.nonneg_int,
        help="images in each split's grid (default: max(36, number of classes), so every "
        "class appears; 0: no grids)",
    )
    p.add_argument("--seed", type=cli.seed_int, default=0, help="seed of the grid sample")
    workers_help = "threads inspecting files (default: the cores this process may use, at most 8)"
    p.add_argument("--workers", type=cli.positive_int, help=workers_help)
    cli.add_data_args(p, val_split=False, decode=False)
    cli.add_output_args(p, runs=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = cli.layout_from_args(args).data_sanity
    kw = {"seed": args.seed, "workers": args.workers, "progress": not args.no_progress}
    data_dir = cli.data_dir_from_args(args)
    summary = run_sanity(data_dir, out, grid_per_split=args.grid_per_split, **kw)
    print_summary(summary, out)
    return 0


if __name__ == "__main__":
    cli_main(main, prog="python -m tune_pets.sanity")
