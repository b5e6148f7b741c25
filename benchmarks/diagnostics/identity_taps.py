"""Why fused kernels quantize badly: the identity tap's share of each kernel's weight range, and
what splitting it off (``reparam.split_identity``) does to each layer's output error.

    python benchmarks/diagnostics/identity_taps.py [--models repvgg_a0:15,mobileone_s0:15:w1] [--bits 8]
        [--out benchmarks/results/identity_taps.json]

For every conv of the fused reference model (trained by ``_reference.ensure_model``): how often the
centre diagonal tap (what a fused identity / BN-only branch adds) is the channel's largest weight,
and on the per-channel symmetric min-max grid the fraction of weights that round to zero and the
relative weight error ``||Q(W) - W|| / ||W||`` (mean over channels) — as fused, and with the
identity tap split off for every conv that can carry one. Then, per profile, the output-error ratio
(without / with the split) that ``quant.identity_split`` measures on 256 calibration images at
``--bits`` to decide the split (a "*" marks the convs it splits). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

from repapq_deploy.artifacts import write_json
from repapq_deploy.load import load_model
from repapq_deploy.quant.identity_split import decide_identity_split
from repapq_deploy.quant.scheme import QuantConfig
from repapq_deploy.reparam import fuse_model
from repapq_deploy.reparam.fuse import identity_taps, split_identity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _reference
from _reference import DEFAULT_MODELS, ensure_calib_set, ensure_model, parse_model_spec  # noqa: E402

PROFILES = ("tensorrt", "onnxruntime")


def grid_stats(weight: torch.Tensor, bits: int) -> tuple[float, float]:
    """(fraction of weights rounding to zero, mean per-channel relative error) on the min-max grid."""
    w = weight.detach().flatten(1)
    qmax = 2 ** (bits - 1) - 1
    step = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / qmax
    q = (w / step).round()
    err = ((q * step - w).norm(dim=1) / w.norm(dim=1).clamp_min(1e-12)).mean()
    return float((q == 0).float().mean()), float(err)


def layer_rows(gm: torch.nn.Module, bits: int) -> list[dict]:
    """One row per conv/linear of ``gm``, with the split's effect where it applies."""
    split = copy.deepcopy(gm)
    split_identity(split, only=[n for n, m in gm.named_modules() if isinstance(m, nn.Conv2d) and identity_taps(m)])
    rows = []
    for name, mod in gm.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        zero, err = grid_stats(mod.weight, bits)
        row = {"layer": name, "shape": list(mod.weight.shape), "zero_fraction": zero, "rel_error": err}
        taps = identity_taps(mod) if isinstance(mod, nn.Conv2d) else None
        if taps is not None:
            row["centre_is_max"] = float((taps[0].abs() >= mod.weight.detach().abs().flatten(1).amax(1)).float().mean())
        if f"{name}_identity" in dict(split.named_modules()):
            row["split_zero_fraction"], row["split_rel_error"] = grid_stats(split.get_submodule(name).weight, bits)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="ARCH:EPOCHS[:wWARMUP] specs")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/identity_taps.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    calib = torch.from_numpy(np.load(ensure_calib_set(1024, 0))["x"])
    samples = calib[:32]
    console = Console(width=150)
    payload = {"bits": args.bits, "models": {}}
    for spec in args.models.split(","):
        arch, epochs, warmup = parse_model_spec(spec)
        loaded = load_model(ensure_model(arch, epochs, warmup) / "model.safetensors")
        gm, _ = fuse_model(loaded.module, samples)
        rows = layer_rows(gm, args.bits)
        for profile in PROFILES:
            config, errors = decide_identity_split(gm, calib, QuantConfig(profile, args.bits, 8))
            chosen = config.split_layers
            for r in rows:
                if r["layer"] in errors:
                    plain, split = errors[r["layer"]]
                    r[f"output_error_{profile}"] = {"plain": plain, "split": split, "chosen": r["layer"] in chosen}
        payload["models"][arch] = rows
        table = Table(title=f"{arch}: fused weights on the {args.bits}-bit per-channel min-max grid; output error "
                            "without / with the split per profile (* = split)")
        for col in ("layer", "shape", "centre tap is max", "zero", "rel. error", "split: zero", "split: rel. error",
                    *(f"{p} ratio" for p in PROFILES)):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for r in rows:
            split = "split_rel_error" in r
            ratios = []
            for profile in PROFILES:
                e = r.get(f"output_error_{profile}")
                ratios.append(f"{e['plain'] / max(e['split'], 1e-30):.1f}{'*' if e['chosen'] else ''}" if e else "-")
            table.add_row(r["layer"], "x".join(map(str, r["shape"])),
                          f"{r['centre_is_max']:.0%}" if "centre_is_max" in r else "-",
                          f"{r['zero_fraction']:.0%}", f"{r['rel_error']:.2%}",
                          f"{r['split_zero_fraction']:.0%}" if split else "-",
                          f"{r['split_rel_error']:.2%}" if split else "-", *ratios)
        console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, payload)
    Console(stderr=True).print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
