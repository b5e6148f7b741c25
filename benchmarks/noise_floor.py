"""How much top-1 moves under perturbations that are not quantization: the noise floor of a drop target.

    python benchmarks/noise_floor.py BUILD_DIR [--sigmas 0.001,0.002,0.003,0.005] [--draws 20] \
        [--holdout 10000] [--out benchmarks/results/noise_floor/NAME.json]

``BUILD_DIR`` is a build folder with a ``fused.pt`` (as for ``recipe_screen.py``). The FP32 model is
run in float16, and with every parameter multiplied by ``1 + sigma * N(0, 1)`` (independent draws,
seeded) for each ``sigma``. For each perturbation it counts the images whose top-1 differs from the
FP32 model's (flips) and the top-1 drop against the labels; per ``sigma`` it prints the median flips
and mean max-abs logit error (as ``quant_sensitivity.py`` and ``recipe_screen.py`` report it), the
mean, standard deviation and range of the drop over the draws, and the share of draws that lose at
most 0.03 pp (the project's W8A8 goal). A quantized build with as many flips as a row here
is as close to FP32 as that row's perturbation; where the row's mean drop is near 0 the drop of one
build is mostly the sign of its flips, and the row's standard deviation is how far a single
measurement of it can stray.
Prints a table and writes the draws as JSON.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import numpy as np
import torch
from _reference import ensure_holdout_set, ensure_test_set, write_results
from recipe_screen import logits
from rich.console import Console
from rich.table import Table

from repapq_deploy.verify.report import paired_drop


def _row(kind: str, sigma: float, draw: int, out: np.ndarray, ref: np.ndarray, y: np.ndarray) -> dict:
    return {"perturbation": kind, "sigma": sigma, "draw": draw,
            "flips": int((out.argmax(1) != ref.argmax(1)).sum()),
            "mean_max_abs_logit_error": float(np.abs(out - ref).max(1).mean()), **paired_drop(ref, out, y)}


def perturbed(model: torch.nn.Module, sigma: float, generator: torch.Generator) -> torch.nn.Module:
    """A copy of ``model`` with every parameter multiplied by ``1 + sigma * N(0, 1)``."""
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.mul_(1 + sigma * torch.randn(p.shape, generator=generator))
    return noisy


def noise_floor(model: torch.nn.Module, x: torch.Tensor, y: np.ndarray, sigmas: list[float], draws: int,
                seed: int = 0) -> list[dict]:
    """The float16 run and ``draws`` weight perturbations per sigma, each against FP32."""
    ref = logits(model, x)
    out16 = logits(copy.deepcopy(model).half(), x.half()).astype(np.float32)
    rows = [_row("float16", 0.0, 0, out16, ref, y)]
    generator = torch.Generator().manual_seed(seed)
    for sigma in sigmas:
        for d in range(draws):
            rows.append(_row("weights", sigma, d, logits(perturbed(model, sigma, generator), x), ref, y))
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per perturbation and sigma: median flips, drop mean / sd / min / max, share of draws losing at most 0.03 pp."""
    out = []
    for key in dict.fromkeys((r["perturbation"], r["sigma"]) for r in rows):
        group = [r for r in rows if (r["perturbation"], r["sigma"]) == key]
        drops = [r["drop_pp"] for r in group]
        out.append({"perturbation": key[0], "sigma": key[1], "draws": len(group),
                    "median_flips": statistics.median(r["flips"] for r in group),
                    "median_max_abs_logit_error": statistics.median(r["mean_max_abs_logit_error"] for r in group),
                    "drop_mean_pp": statistics.fmean(drops),
                    "drop_sd_pp": statistics.stdev(drops) if len(drops) > 1 else 0.0,
                    "drop_min_pp": min(drops), "drop_max_pp": max(drops),
                    "share_drop_le_0.03_pp": sum(d <= 0.03 + 1e-9 for d in drops) / len(drops)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build", type=Path)
    ap.add_argument("--sigmas", default="0.001,0.002,0.003,0.005",
                    help="comma-separated relative weight noise levels")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-count", type=int, default=1024, help="calibration set the hold-out excludes")
    ap.add_argument("--holdout", type=int, default=0, help="evaluate on this many held-out training images")
    ap.add_argument("--out", type=Path, help="JSON file of the draws and the summary")
    args = ap.parse_args()
    if not (args.build / "fused.pt").exists():
        raise SystemExit(f"{args.build}: no fused.pt; pass a build folder of repapq-deploy build")
    try:
        sigmas = [float(s) for s in args.sigmas.split(",")]
    except ValueError:
        raise SystemExit(f"--sigmas {args.sigmas}: not a comma-separated list of numbers") from None
    if args.draws < 1:
        raise SystemExit(f"--draws {args.draws}: must be at least 1")
    model = torch.load(args.build / "fused.pt", weights_only=False).eval()  # our own artifact
    data = np.load(ensure_holdout_set(args.holdout, args.calib_count, 0) if args.holdout else ensure_test_set())
    x, y = torch.from_numpy(data["x"]), data["y"]
    rows = noise_floor(model, x, y, sigmas, args.draws, args.seed)
    table = Table(title=f"top-1 against FP32 under perturbations ({'holdout' if args.holdout else 'test'}, "
                        f"{len(x)} images, {args.draws} draws per sigma)")
    for col in ("perturbation", "sigma", "median flips", "max |logit err|", "drop mean pp", "drop sd pp",
                "drop range pp", "drop <= 0.03 pp"):
        table.add_column(col)
    summ = summary(rows)
    for s in summ:
        table.add_row(s["perturbation"], f"{s['sigma']:g}", f"{s['median_flips']:g}",
                      f"{s['median_max_abs_logit_error']:.4f}", f"{s['drop_mean_pp']:+.3f}",
                      f"{s['drop_sd_pp']:.3f}", f"{s['drop_min_pp']:+.2f} .. {s['drop_max_pp']:+.2f}",
                      f"{s['share_drop_le_0.03_pp']:.0%}")
    Console(width=120).print(table)
    if args.out:
        write_results(args.out, args, {"summary": summ, "rows": rows})


if __name__ == "__main__":
    main()
