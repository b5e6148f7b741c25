"""Screen calibration recipes quickly: fake-quant top-1 on the full Fashion-MNIST test set, no export.

    python benchmarks/recipe_screen.py BUILD_DIR --profile tensorrt --bits 8 --method repapq --preset fast \
        [--recipe '{"adaround": true}'] [--split] [--holdout 10000] [--no-split-identity] [--add-bits 8|6] \
        [--equalize none|depthwise|all] [--equalize-alpha 0.5] [--offset-relu none|unpadded|all] [--seed 0]

``BUILD_DIR`` is a build folder of ``benchmarks/calibration.py`` (its ``fused.pt`` is used), e.g.
``~/.cache/repapq-deploy/fmnist/calibration/repvgg_a0-e15/minmax---tensorrt-w8-fl8``. ``--recipe``
changes fields of the reconstruction settings (``ReconSettings``). ``--split`` additionally reports
the accuracy and the mean max-abs logit error with only the weights and with only the activations
quantized. The fake-quant top-1
equals the engine's in the benchmark's builds, so this ranks recipes without building engines.
``--holdout N`` measures on N labelled training images outside the calibration set instead of the
test set, so that choosing a recipe does not tune it to the test images. Besides top-1 it reports the
top-1 agreement with FP32 and the images lost and gained against FP32 (with the paired drop and its
standard error, as build's report), and the mean max-abs logit error against FP32 on the evaluation
images and on the calibration images (the gap between the two shows over-fitting). ``--equalize``
applies cross-layer equalization (``reparam.equalize``) to the fused model first, as build's option of
that name.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _reference import ensure_calib_set, ensure_holdout_set, ensure_test_set, logit_error, logits

from repapq_deploy.calibrate import calibrate
from repapq_deploy.calibrate import reconstruct as R
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.quant.identity_split import decide_identity_split
from repapq_deploy.quant.scheme import OFFSET_RELU_MODES, QuantConfig
from repapq_deploy.reparam.equalize import EQUALIZE_MODES, equalize
from repapq_deploy.verify.report import paired_drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build", type=Path)
    ap.add_argument("--profile", default="tensorrt")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--method", default="repapq")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--recipe", default="{}", help="JSON object of ReconSettings fields")
    ap.add_argument("--split", action="store_true")
    ap.add_argument("--split-identity", action=argparse.BooleanOptionalAction, default=True,
                    help="split fused kernels' identity taps off before quantizing (build's default)")
    ap.add_argument("--add-bits", type=int, choices=[8, 6], default=8, help="build's --add-bits")
    ap.add_argument("--equalize", choices=EQUALIZE_MODES, default="none", help="build's --equalize")
    ap.add_argument("--equalize-alpha", type=float, default=0.5,
                    help="migration strength of dense equalization pairs (reparam.equalize)")
    ap.add_argument("--offset-relu", choices=OFFSET_RELU_MODES, default="none",
                    help="build's --offset-relu (whose TensorRT default is unpadded)")
    ap.add_argument("--calib-count", type=int, default=1024)
    ap.add_argument("--holdout", type=int, default=0, help="evaluate on this many held-out training images")
    ap.add_argument("--seed", type=int, default=0,
                    help="calibration seed (batch draws); the calibration images stay the seed-0 draw")
    args = ap.parse_args()
    fused = torch.load(args.build / "fused.pt", weights_only=False).eval()  # our own artifact
    calib = torch.from_numpy(np.load(ensure_calib_set(args.calib_count, 0))["x"])
    test = np.load(ensure_holdout_set(args.holdout, args.calib_count, 0) if args.holdout else ensure_test_set())
    x, y = torch.from_numpy(test["x"]), test["y"]
    fused, eq_report = equalize(fused, calib, args.equalize, alpha=args.equalize_alpha)
    method, recipe = args.method, json.loads(args.recipe)
    # the fold writes the dequantized weights over the float ones, after which switching the weight
    # quantizers off changes nothing: --split measures the unfolded model (identical outputs)
    unfold = {"fold": False} if args.split and method in R.RECONSTRUCTION else {}
    if recipe or unfold:
        R.RECONSTRUCTION["screened"] = replace(R.RECONSTRUCTION[method], **recipe, **unfold)
        method = "screened"
    # the identity split decided on the calibration images, as build does
    config, _ = decide_identity_split(fused, calib, QuantConfig(args.profile, args.bits, 8, args.split_identity,
                                                                  add_bits=args.add_bits,
                                                                  offset_relu=args.offset_relu))
    qm = quantize_model(fused, config)
    t0 = time.perf_counter()
    calibrate(qm, calib, method, preset=args.preset, seed=args.seed)
    result = {"build": str(args.build), "profile": args.profile, "bits": args.bits, "method": args.method,
              "split_identity": args.split_identity, "split_layers": len(config.split_layers or ()),
              "add_bits": args.add_bits, "offset_relu": args.offset_relu, "equalize": args.equalize,
              "offset_tensors": sum(q.fmt.offset > 0 for q in qm.act_quantizers.values()),
              "act_quantizers": len(qm.act_quantizers),
              "equalize_alpha": args.equalize_alpha, "equalized_pairs": len(eq_report.pairs),
              "preset": args.preset, "recipe": recipe, "seed": args.seed,
              "eval": f"holdout{args.holdout}" if args.holdout else "test10k",
              "calib_seconds": round(time.perf_counter() - t0, 1)}
    # agreement with FP32 and the images lost / gained: a top-1 drop is their difference, so these
    # tell recipes apart where the drop alone is within noise
    ref, out = logits(fused, x), logits(qm.module, x)
    result.update({"fp32": float((ref.argmax(1) == y).mean() * 100), "top1": float((out.argmax(1) == y).mean() * 100),
                   "agreement": float((ref.argmax(1) == out.argmax(1)).mean() * 100), **paired_drop(ref, out, y),
                   # a continuous measure of the same closeness: it ranks recipes whose flip counts tie
                   "mean_max_abs_logit_error": logit_error(out, ref),
                   # the same on the calibration images: far below the evaluation figure = over-fitted
                   "calib_mean_max_abs_logit_error": logit_error(logits(qm.module, calib), logits(fused, calib))})
    if args.split:
        for q in qm.act_quantizers.values():
            q.mode = "off"
        out = logits(qm.module, x)
        result["weights_only"] = float((out.argmax(1) == y).mean() * 100)
        result["weights_only_logit_error"] = logit_error(out, ref)
        qm.set_mode("quant")
        for layer in qm.weight_layers.values():
            layer.weight_quantizer.enabled = False
        out = logits(qm.module, x)
        result["activations_only"] = float((out.argmax(1) == y).mean() * 100)
        result["activations_only_logit_error"] = logit_error(out, ref)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
