"""Time and memory of ``repapq`` at deployment resolution: timm ``repvgg_a0`` / ``mobileone_s0`` at 224x224.

    python benchmarks/calibration_cost.py [--archs repvgg_a0,mobileone_s0] [--images 1024] [--size 224]
        [--iters 0,20] [--device cpu|cuda] [--out benchmarks/results/calibration_cost.json]

Weights are timm's random initialisation with BatchNorm statistics drawn at random (time and memory do
not depend on what the weights learned); calibration images are crops of the scikit-image and foolbox
photos (``efficientnet_lite0.calibration_images``), ImageNet-normalised. Each build runs
``repapq-deploy``'s calibrate stage with ``method: repapq`` and ``holdout: 0`` in a fresh process (so
its peak RSS is its own), once per ``--iters`` value: the reconstruction time is ``fixed + per_iter *
iters`` (range initialisation and the caching of every unit's inputs are the fixed part), which gives
each preset's time (fast 200, default 1000, thorough 3000 iterations per unit) from two short runs.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import timm
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficientnet_lite0 import calibration_images, foolbox_photos, skimage_photos  # noqa: E402

from repapq_deploy.artifacts import write_json  # noqa: E402
from repapq_deploy.environment import hardware, versions  # noqa: E402

PRESET_ITERS = {"fast": 200, "default": 1000, "thorough": 3000}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
console = Console(stderr=True)


def make_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """A timm model with random BatchNorm statistics, saved as safetensors with its metadata."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=1000)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = folder / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={"arch": arch})
    return path


def make_images(count: int, size: int, folder: Path, seed: int = 0) -> Path:
    photos = skimage_photos()
    photos.update({f"foolbox{i}": im for i, im in enumerate(foolbox_photos()[0])})
    crops = [np.asarray(im.resize((size, size))) for _, im in calibration_images(count, seed, photos)]
    x = np.stack(crops).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)[None, :, None, None]) / np.asarray(IMAGENET_STD,
                                                                                       np.float32)[None, :, None, None]
    path = folder / f"calib_{count}_{size}.npz"
    np.savez(path, x=x.astype(np.float32))
    return path


def _calibrate(model: str, calib: str, out: str, iters: int, size: int, device: str) -> dict:
    """One calibrate stage in this (fresh) process."""
    import resource

    from repapq_deploy.options import BuildOptions
    from repapq_deploy.pipeline import Build

    t0 = time.perf_counter()
    opts = BuildOptions.from_flat(model=model, calib=calib, calib_count=None, method="repapq", out=out,
                                  device=device, input_size=(3, size, size), force=True, holdout=0.0,
                                  reconstruction={"iters": iters})
    result = Build(opts).run("calibrate")
    details = result["details"]
    return {"iters": iters, "calibration_seconds": result["seconds"],
            "reconstruction_seconds": details["reconstruction_seconds"],
            "units": [u["unit"] for u in details["units"]],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mib": details.get("peak_cuda_memory_mib"), "stage_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="repvgg_a0,mobileone_s0")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", default="0,20", help="two iteration counts per unit: the fixed and per-step cost")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/repapq-deploy/calibration_cost")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_cost.json"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    calib = make_images(args.images, args.size, args.work)
    low, high = (int(v) for v in args.iters.split(","))
    results = []
    ctx = multiprocessing.get_context("spawn")
    for arch in args.archs.split(","):
        model = make_model(arch, args.work)
        runs = []
        for iters in (low, high):
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                runs.append(pool.submit(_calibrate, str(model), str(calib), str(args.work / f"{arch}-{iters}"),
                                        iters, args.size, args.device).result())
            console.log(f"{arch} iters {iters}: {runs[-1]['reconstruction_seconds']:.0f} s, "
                        f"peak RSS {runs[-1]['peak_rss_mib']:.0f} MiB")
        per_iter = (runs[1]["reconstruction_seconds"] - runs[0]["reconstruction_seconds"]) / (high - low)
        fixed = runs[0]["reconstruction_seconds"] - per_iter * low
        results.append({"arch": arch, "runs": runs, "fixed_seconds": fixed, "seconds_per_iteration": per_iter,
                        "preset_seconds": {p: fixed + per_iter * n for p, n in PRESET_ITERS.items()},
                        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                        "peak_cuda_mib": max((r["peak_cuda_mib"] or 0) for r in runs) or None})
    table = Table(title=f"repapq at {args.size}x{args.size}, {args.images} images, {args.device} "
                        f"({hardware()['cpu']}, {hardware()['cores']} cores)")
    for col in ("arch", "fixed s", "s / iteration", "fast s", "default s", "thorough s", "peak RSS MiB"):
        table.add_column(col, justify="right")
    for r in results:
        p = r["preset_seconds"]
        table.add_row(r["arch"], f"{r['fixed_seconds']:.0f}", f"{r['seconds_per_iteration']:.2f}", f"{p['fast']:.0f}",
                      f"{p['default']:.0f}", f"{p['thorough']:.0f}", f"{r['peak_rss_mib']:.0f}")
    Console().print(table)
    write_json(args.out, {"command": " ".join(sys.argv), "images": args.images, "size": args.size,
                          "device": args.device, "hardware": hardware(), "versions": versions(), "results": results})
    console.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
