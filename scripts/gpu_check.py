"""The prepared GPU check: proves that the real paths use the GPU, in one run, one JSON.

    python scripts/gpu_check.py --out artifacts/gpu_check      # about 5 minutes on one GPU
    bash scripts/gpu_check.sh                                  # the same, plus nvidia-smi

Steps (each recorded in ``<out>/gpu_check.json`` with its wall time and exit code):
  1. the suite's GPU-marked tests (``pytest -m gpu``);
  2. ``pipeline --smoke`` on the shipped sample: every trial's ``device`` in trials.csv is cuda;
  3. ``reproduce cnn --baseline`` twice on CUDA, checkpoints compared bitwise; ``evaluate`` and
     ``profiling`` on CUDA;
  4. the homework CNN's train step, images/s in fp32 vs bf16 autocast (channels_last), through
     ``engine.Engine`` (what every trial runs);
  5. GPU utilisation sampled (nvidia-smi, every 0.5 s) during a 4-trial fractional search
     (``--gpus-per-trial 0.25``).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sh(out: Path, name: str, args: list[str], record: dict, timeout: float = 900) -> int:
    """Run ``python -m ARGS`` (or a plain command) with its log in ``out/<name>.log``."""
    t0 = time.time()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    record[name] = {"rc": rc.returncode, "seconds": round(time.time() - t0, 1)}
    print(f"{name}: exit {rc.returncode} in {record[name]['seconds']} s", flush=True)
    return rc.returncode


def tune(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def train_rate(precision_amp: bool, img_size: int, steps: int = 30) -> float:
    import torch

    from tune_pets.engine import Engine, FitData
    from tune_pets.models import get_spec

    spec = get_spec("cnn")
    cfg = spec.defaults.replace(img_size=img_size, amp=precision_amp)
    pre = spec.data_config(cfg)
    res = spec.cache_res(cfg)
    x = torch.randint(0, 256, (512, res, res, 3), dtype=torch.uint8).numpy()
    data = FitData("images", [str(i) for i in range(37)], x, (torch.arange(512) % 37).numpy(),
                   preprocess=pre)
    engine = Engine(cfg, data, torch.device("cuda"))
    batches = engine.batches.forever()
    for _ in range(5):
        engine.step(*next(batches))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step(*next(batches))
    torch.cuda.synchronize()
    return round(steps * cfg.batch_size / (time.perf_counter() - t0), 1)


def sample_utilisation(stop: threading.Event, samples: list[int]) -> None:
    while not stop.is_set():
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True, text=True,
        )
        if q.returncode == 0 and q.stdout.strip():
            samples.append(int(q.stdout.split()[0]))
        time.sleep(0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="artifacts/gpu_check", help="folder for logs and the JSON")
    args = p.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    assert torch.cuda.is_available(), "torch sees no CUDA device"
    rec: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    steps: dict = {}
    rec["steps"] = steps
    cache = ["--cache-dir", str(out / "cache"), "--no-progress"]
    rc = sh(out, "pytest_gpu", tune("pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"), steps)
    rec["gpu_tests_ok"] = rc in (0, 5)

    art = out / "pipeline"
    sh(out, "pipeline_smoke", tune("tune_pets.pipeline", "--smoke", "--artifacts-dir", str(art),
                                   "--runs-dir", str(out / "runs"), *cache), steps)
    devices = []
    for model in ("cnn", "vit"):
        rows = list(csv.DictReader(open(art / "search" / model / "trials.csv")))
        devices += [r.get("device") for r in rows]
    rec["pipeline_trial_devices"] = sorted(set(map(str, devices)))
    rec["pipeline_all_trials_on_cuda"] = bool(devices) and all(
        str(d).startswith("cuda") for d in devices)

    ckpts = []
    for run in ("a", "b"):
        a = out / f"reproduce_{run}"
        sh(out, f"reproduce_{run}", tune("tune_pets.reproduce", "cnn", "--baseline", "--data-dir",
                                         "sample", "--epochs", "3", "--img-size", "128",
                                         "--artifacts-dir", str(a), "--runs-dir",
                                         str(out / "runs"), "--device", "cuda", *cache), steps)
        ckpts.append(a / "cnn_baseline" / "checkpoint_best.pt")
    if all(c.is_file() for c in ckpts):
        sa, sb = (torch.load(c, weights_only=True)["state_dict"] for c in ckpts)
        rec["reproduce_bitwise_equal"] = sa.keys() == sb.keys() and all(
            torch.equal(sa[k], sb[k]) for k in sa)
        rec["reproduce_config"] = json.loads((ckpts[0].parent / "config.json").read_text())[
            "precision"]
    sh(out, "evaluate_cuda", tune("tune_pets.evaluate", "cnn", "--checkpoint", str(ckpts[0]),
                                  "--data-dir", "sample", "--device", "cuda", "--artifacts-dir",
                                  str(out / "eval"), *cache), steps)
    sh(out, "profiling_cuda", tune("tune_pets.profiling", "cnn", "--data-dir", "sample",
                                   "--device", "cuda", "--img-size", "128", "--artifacts-dir",
                                   str(out / "prof"), *cache), steps)
    summary = out / "prof" / "profiling" / "cnn" / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        rec["profiling"] = {k: s.get(k) for k in ("device", "images_per_s", "precision",
                                                  "peak_mem_mb")}

    rec["cnn_train_images_per_s"] = {
        f"{size}px": {"fp32": train_rate(False, size), "bf16_channels_last": train_rate(True, size)}
        for size in (128, 224)
    }

    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_utilisation, args=(stop, samples), daemon=True)
    sampler.start()
    sh(out, "search_fractional", tune("tune_pets.search", "cnn", "--data-dir", "sample",
                                      "--search-space", "search_spaces/smoke/cnn.yaml",
                                      "--gpus-per-trial", "0.25", "--num-samples", "4",
                                      "--overwrite", "--artifacts-dir", str(out / "search"),
                                      "--runs-dir", str(out / "runs"), *cache), steps)
    stop.set()
    sampler.join()
    rec["search_gpu_utilisation_pct"] = {
        "samples": len(samples),
        "mean": round(sum(samples) / len(samples), 1) if samples else None,
        "max": max(samples) if samples else None,
    }
    (out / "gpu_check.json").write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps(rec, indent=2))
    failed = [k for k, v in steps.items() if v["rc"] not in (0, 5)]
    print(f"gpu_check: {'OK' if not failed else 'FAILED: ' + ', '.join(failed)} ({out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
