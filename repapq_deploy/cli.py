"""Command line: ``repapq-deploy build`` and one subcommand per stage.

A stage subcommand runs the pipeline up to that stage in the same output folder, so
``repapq-deploy calibrate model.pt --out DIR`` followed by ``repapq-deploy build model.pt --out DIR``
does the calibration once.
"""

from __future__ import annotations

import functools
import json
import sys

import click
from rich.markup import escape

from repapq_deploy import __version__
from repapq_deploy.calibrate import METHODS
from repapq_deploy.errors import DeployError
from repapq_deploy.pipeline import STAGES, Build, BuildOptions
from repapq_deploy.progress import console, log


def _floats(ctx, param, value: str | None) -> tuple[float, ...] | None:  # noqa: ARG001
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers") from None


def _ints(ctx, param, value: str | None) -> tuple[int, ...] | None:  # noqa: ARG001
    floats = _floats(ctx, param, value)
    if floats is None:
        return None
    if len(floats) != 3 or any(f != int(f) or f < 1 for f in floats):
        raise click.BadParameter(f"{value!r}: expected C,H,W as three positive integers")
    return tuple(int(f) for f in floats)


def build_options(fn):
    """The options every pipeline command shares."""
    options = [
        click.argument("model", type=click.Path(dir_okay=False)),
        click.option("--arch", help="timm model name for state dicts (e.g. repvgg_a0, mobileone_s0)."),
        click.option("--num-classes", type=click.IntRange(min=1),
                     help="Classifier size (default: from the checkpoint)."),
        click.option("--in-chans", type=click.IntRange(min=1), help="Input channels (default: from the checkpoint)."),
        click.option("--calib", default="calib", show_default=True,
                     help="Calibration data: image folder, or .npz/.npy/.pt of preprocessed N,C,H,W tensors."),
        click.option("--calib-count", type=int, default=256, show_default=True,
                     help="Calibration samples drawn (seeded) from --calib."),
        click.option("--eval", "eval_", help="Evaluation data with labels: class-folder images or .npz with x,y "
                                             "(default: agreement-only on --calib)."),
        click.option("--eval-count", type=int, help="Evaluate on this many samples (default: all)."),
        click.option("--bits", type=click.Choice(["8", "6"]), default="8", show_default=True,
                     help="Weight and activation bits; 6 is emulated exactly on INT8 kernels."),
        click.option("--first-last-bits", type=click.Choice(["8", "6"]), default="8", show_default=True,
                     help="Bits of the first conv and the classifier."),
        click.option("--method", type=click.Choice(sorted(METHODS)), default="percentile", show_default=True,
                     help="Calibration method."),
        click.option("--profile", type=click.Choice(["tensorrt", "onnxruntime"]),
                     help="Quantization scheme (default: the backend's)."),
        click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
                     show_default=True, help="Engine backend; auto = TensorRT if usable here, else ONNX Runtime."),
        click.option("--out", help="Output folder (default: engines/<model file name>)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="Where calibration runs."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Calibration batch size."),
        click.option("--opset", type=click.IntRange(min=13), default=17, show_default=True),
        click.option("--input-size", callback=_ints, help="C,H,W the model expects (default: timm data config)."),
        click.option("--mean", callback=_floats, help="Per-channel normalization mean, comma-separated."),
        click.option("--std", callback=_floats, help="Per-channel normalization std, comma-separated."),
        click.option("--resize", type=int, help="Resize the shorter side to this before the center crop."),
        click.option("--bench-seconds", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
                     help="Time budget per latency measurement."),
        click.option("--trust-pickle", is_flag=True, help="Allow unpickling whole modules (runs code from the file)."),
        click.option("--force", is_flag=True, help="Re-run every stage even if up to date."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run(until: str, kwargs: dict) -> None:
    as_json = kwargs.pop("as_json")
    kwargs["eval"] = kwargs.pop("eval_")
    kwargs["bits"] = int(kwargs["bits"])
    kwargs["first_last_bits"] = int(kwargs["first_last_bits"])
    if kwargs["bits"] == 8:
        kwargs["first_last_bits"] = 8
    build = Build(BuildOptions(**kwargs))
    result = build.run(until)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    elif until == "verify":
        _summary(result, build.out)


def _summary(report: dict, out: str) -> None:
    from rich.table import Table

    acc, lat = report["accuracy"], report["latency_ms"]
    table = Table(title=f"repapq-deploy: {report['config']['model']}")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def pct(v):
        return "n/a" if v is None else f"{v:.2f} %"

    table.add_row("top-1 FP32 / fake-quant / engine",
                  f"{pct(acc['fp32']['top1'])} / {pct(acc['fake_quant']['top1'])} / {pct(acc['engine']['top1'])}")
    table.add_row("agreement with FP32, cosine", f"{acc['agreement_top1']:.2f} %, {acc['cosine']:.5f}")
    table.add_row("engine", f"{report['engine']['backend']}, int8 ops {report['engine']['int8_op_fraction']:.0%}")
    for bs in ("bs1", "bs32"):
        table.add_row(f"p50 latency {bs} FP32 -> engine",
                      f"{lat['fp32'][bs]:.3f} -> {lat['engine'][bs]:.3f} ms ({lat['speedup'][bs]:.2f}x)")
    console.print(table)
    for w in report.get("warnings", []):
        log(f"[yellow]warning:[/yellow] {w}")
    log(f"report: {out}/report.md, {out}/report.json")


def _guard(fn):
    """Turn DeployError into a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeployError as exc:
            console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="repapq-deploy")
def main() -> None:
    """Deploy reparameterizable CNNs (RepVGG, MobileOne, ...) as verified INT8 / INT6-emulated engines."""


@main.command()
@build_options
@_guard
def build(**kwargs) -> None:
    """Run every stage: load, reparam, calibrate, export, engine, verify."""
    _run("verify", kwargs)


def _stage_command(stage: str, doc: str) -> None:
    @build_options
    @_guard
    def command(**kwargs) -> None:
        _run(stage, kwargs)

    command.__doc__ = doc
    main.command(name=stage)(command)


STAGE_HELP = {
    "reparam": "Load MODEL and fuse it to a single-branch network (fused.pt), checking exactness.",
    "calibrate": "Run the stages up to calibration (qstate.pt).",
    "export": "Run the stages up to ONNX export (model.fp32.onnx, model.qdq.onnx) and check it.",
    "engine": "Run the stages up to the engine build.",
    "verify": "Run every stage and write report.json / report.md (same as build).",
}
for _stage in STAGES:
    _stage_command(_stage, STAGE_HELP[_stage])


if __name__ == "__main__":
    main()
