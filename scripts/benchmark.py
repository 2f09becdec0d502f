"""Side-by-side benchmarks: the project's way vs the homework's naive way, in one process. The
JSON records the machine, library versions, load average and the raw times behind every ratio.

    python scripts/benchmark.py                      # every figure (3.5-7 min on 2 cores)
    python scripts/benchmark.py --quick              # about 3 min; smaller, noisier
    python scripts/benchmark.py --only input_pipeline_speedup --out /tmp/bench.json
    python scripts/benchmark.py --smoke              # seconds; what the tests run (no numbers)

Result of record (the README's Performance table): 1 full run (205 s), 2026-11-28, 2 cores of
an AMD EPYC, no GPU, machine otherwise idle; real photos from --data-dir (570 train JPEGs, 200
of them for the ViT search); torch 2.14.1, torchvision 0.29.1, timm 1.0.31, ray 2.60.0,
optuna 5.0.0.

    figure                                   homework way    tune_pets way           ratio  goal
    vit_probe_search_speedup (16 trials x 2) 128 s           4.1 s                   31.1x  >= 30
    input_pipeline_speedup @128px            611 img/s       9,692 img/s             15.9x  >= 4
    input_pipeline_speedup_224 @224px        648 img/s       2,901 img/s             4.5x   >= 4
    trial_overhead_s (24 trials, 2 at once)  optuna 0.002 s  Ray + make_tuner 0.16 s        <= 0.5
    cnn_train_images_per_s (CPU, batch 32)                   30 img/s @128, 7.9 @224

input_pipeline_speedup_busy came later and is not in that run. Under load the ratios moved (ViT
36.9x and 58.5x; 224 px 1.09-1.10x before the CPU augmentation was reworked to resize crops on
uint8, 4.5x after; see docs/benchmark-investigation.md). Two --quick runs on a shared 2-core Intel
Xeon VM (2026-11-29, 570 photos, 64 for the ViT search: 4 trials x 2 epochs, so that ratio tops out
near 8; not of record) gave ViT 3.9x / 5.8x, 128 px 0.67x / 1.01x, 224 px 5.4x / 0.60x, busy 0.44x
/ 0.92x, trial overhead 0.104 / 0.218 s: under load the 2-thread cached pipeline stalls (issue 10
item 7); with 1 torch thread the same cached epochs ran 3,642 img/s at 128 px (19-36x faster).

Each figure's module in scripts/bench/ says what it measures. Without photos at --data-dir the
shipped sample is used, else synthetic JPEGs (``data.source`` in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import cnn_train, input_pipeline, trial_overhead, vit_probe_search
from bench.harness import (DEFAULT_DATA, REPO_ROOT, Context, format_table, machine_record,
                           now, resolve_data, settings, table_rows)
from tune_pets.utils import atomic_write_json

# name: (runner, reads photos). Run order: cheap first; Ray last (it starts a local cluster).
FIGURES = {
    "optuna_trial_overhead_s": (trial_overhead.run_optuna, False),
    "cnn_train_images_per_s": (cnn_train.run, False),
    "input_pipeline_speedup": (input_pipeline.run, True),  # also writes ..._224
    "input_pipeline_speedup_busy": (input_pipeline.run_busy, True),
    "vit_probe_search_speedup": (vit_probe_search.run, True),
    "trial_overhead_s": (trial_overhead.run_ray, False),
}
MODE_NOTES = {
    "full": "full run",
    "quick": "--quick: fewer images/trials/epochs; ratios (especially the ViT search speedup, "
             "which scales with trials x epochs) are smaller and noisier than the full run's",
    "smoke": "--smoke: tiny sizes to check that every figure runs; the numbers mean nothing",
}
LOAD_WARNING = (
    "load average {} on {} cores at start: other jobs share this machine, so rates are low and "
    "noisy; multi-threaded torch code (the cached ways) suffers more than multi-process "
    "DataLoader workers (see loadavg_* per figure, images_per_s_with_1_torch_thread and "
    "input_pipeline_speedup_busy)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/benchmark.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO_ROOT / "artifacts/bench/bench.json"),
                   help="JSON output, written atomically after every figure (default: %(default)s)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes: ~3 minutes, noisier")
    size.add_argument("--smoke", action="store_true", help="tiny sizes for tests: seconds")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA),
                   help="ImageFolder root with train/; 'sample' is the package's shipped photos, "
                        "used (or synthetic JPEGs) when this is missing (default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=list(FIGURES), metavar="NAME",
                   help=f"run only these figures: {', '.join(FIGURES)} (default: all)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    s = settings(mode)
    selected = [name for name in FIGURES if name in (args.only or FIGURES)]
    machine, env = machine_record()
    out_path, t_start = Path(args.out), now()
    result = {
        "benchmark": "scripts/benchmark.py", "created": dt.datetime.now().isoformat("T", "seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv), "quick": args.quick, "mode": mode,
        "settings": {k: {str(a): b for a, b in v.items()} if isinstance(v, dict) else v
                     for k, v in s.items()},
        "machine": machine, "versions": env, "data": None, "figures": {}, "note": MODE_NOTES[mode],
    }
    la, cores = machine["loadavg_at_start"], machine["cpu_count"] or 1
    if la and la[0] > 0.5 * cores:
        result["load_warning"] = LOAD_WARNING.format(la[0], cores)
    with tempfile.TemporaryDirectory(prefix="tune_pets_bench_") as tmp:
        ctx = Context(s, Path(tmp))
        if any(FIGURES[name][1] for name in selected):
            ctx.data_dir, result["data"] = resolve_data(args.data_dir, ctx.tmp)
        for name in selected:
            runner, reads_photos = FIGURES[name]
            for f in (figs := runner(ctx)).values():
                f["machine"], f["versions"] = machine, env
                f["data"] = result["data"] if reads_photos else None
            result["figures"].update(figs)
            result["total_wall_s"] = now() - t_start
            atomic_write_json(out_path, result)
    rows = table_rows(result["figures"])
    cols = ("figure", "way_a", "way_b", "ratio", "goal", "met")
    result["table"] = [dict(zip(cols, r, strict=True)) for r in rows]
    result["total_wall_s"] = now() - t_start
    atomic_write_json(out_path, result)
    src = (result["data"] or {}).get("source", "n/a")
    print(f"\n{mode} run, {result['total_wall_s']:.0f} s; {machine['cpu']} "
          f"({machine['cpu_count']} cores), GPU: {machine['gpu'] or 'none'}; data: {src}; "
          f"torch {env['torch']}")
    print(format_table(rows))
    for note in (mode != "full" and result["note"], result.get("load_warning")):  # why a goal
        if note:  # may read NO here
            print(f"note: {note}")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
