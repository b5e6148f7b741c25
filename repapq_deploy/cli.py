"""Command line: ``repapq-deploy build`` and one subcommand per stage.

A stage subcommand runs the pipeline up to that stage in the same output folder, so
``repapq-deploy calibrate model.pt --out DIR`` followed by ``repapq-deploy build model.pt --out DIR``
does the calibration once.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click
from rich.markup import escape

from repapq_deploy import __version__
from repapq_deploy.calibrate.augment import AUGMENTATIONS
from repapq_deploy.calibrate.methods import all_methods
from repapq_deploy.errors import DeployError
from repapq_deploy.pipeline import STAGES, Build, BuildOptions
from repapq_deploy.progress import console, log
from repapq_deploy.quant.scheme import OFFSET_RELU_MODES
from repapq_deploy.reparam.equalize import EQUALIZE_MODES


def _floats(ctx, param, value: str | None) -> tuple[float, ...] | None:  # noqa: ARG001
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers") from None


def _views(ctx, param, value: str | None) -> tuple[str, ...] | None:  # noqa: ARG001
    if value is None:
        return None
    if value == "none":
        return ()
    names = tuple(v.strip() for v in value.split(","))
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise click.BadParameter(f"{','.join(unknown)}: unknown view; choose from {', '.join(AUGMENTATIONS)} or none")
    return names


def _ints(ctx, param, value: str | None) -> tuple[int, ...] | None:  # noqa: ARG001
    floats = _floats(ctx, param, value)
    if floats is None:
        return None
    if len(floats) != 3 or any(f != int(f) or f < 1 for f in floats):
        raise click.BadParameter(f"{value!r}: expected three positive integers")
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
        click.option("--add-bits", type=click.Choice(["8", "6"]), default="8", show_default=True,
                     help="Bits of tensors quantized only because an integer Add needs them (no weighted "
                          "layer reads them); 6 makes --bits 6 quantize those too."),
        click.option("--offset-relu", type=click.Choice(["auto", *OFFSET_RELU_MODES]), default="auto",
                     show_default=True,
                     help="TensorRT profile, 8-bit activations: give post-ReLU tensors all 256 int8 levels by "
                          "storing x - 128 s and adding the constant back through the reading layers' biases "
                          "('unpadded': only tensors read by linear layers and unpadded convs; 'all': padded "
                          "convs too, with a constant border map after them; 'none': they use [0, 127]). "
                          "'auto' is 'unpadded' on tensorrt and 'none' on onnxruntime (uint8 already)."),
        click.option("--split-identity/--no-split-identity", default=True, show_default=True,
                     help="Keep each fused kernel's dominant identity tap as a depthwise 1x1 conv beside it, "
                          "so it does not set the kernel's quantization range (one extra conv and add per "
                          "RepVGG/MobileOne block)."),
        click.option("--equalize", type=click.Choice(["auto", *EQUALIZE_MODES]), default="auto", show_default=True,
                     help="Cross-layer equalization before calibration (exact rescaling of conv pairs across a "
                          "ReLU): depthwise = pairs whose second conv is depthwise (free for the weights), "
                          "all = every conv pair; auto = all for repapq/brecq, and for a range method the mode "
                          "whose logits are closest to FP32 on the calibration images."),
        click.option("--method", type=click.Choice(all_methods()), default="repapq", show_default=True,
                     help="Calibration method: reconstruction (repapq, brecq) or a range method (minutes vs "
                          "seconds; percentile is the quickest good one)."),
        click.option("--preset", type=click.Choice(["fast", "default", "thorough"]), default="default",
                     show_default=True, help="Reconstruction effort (repapq, brecq): time vs accuracy."),
        click.option("--adaround/--no-adaround", default=None,
                     help="Learn weight rounding (AdaRound) during reconstruction (default: on for brecq, "
                          "off for repapq)."),
        click.option("--qdrop", type=click.FloatRange(0, 1), default=None,
                     help="QDrop probability during reconstruction (default: the method's, 0)."),
        click.option("--gptq/--no-gptq", default=None,
                     help="Round each unit's weights by GPTQ before reconstruction trains its steps and affine "
                          "(weights then stay fixed; default: the method's)."),
        click.option("--calib-augment", callback=_views,
                     help="Extra views of the calibration images that reconstruction also fits, applied "
                          "cumulatively: comma-separated hflip, shift (2 px), mixup, or none (default: the method's)."),
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
        click.option("--threads", type=click.IntRange(min=1),
                     help="CPU threads for calibration and ONNX Runtime (default: all cores)."),
        click.option("--bench-seconds", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
                     help="Time budget per latency measurement."),
        click.option("--trt-batch", callback=_ints, default="1,8,32", show_default=True,
                     help="TensorRT optimization profile batch sizes: min,opt,max."),
        click.option("--workspace-mib", type=click.IntRange(min=1), default=4096, show_default=True,
                     help="TensorRT builder workspace limit."),
        click.option("--builder-opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
                     help="TensorRT builder optimization level."),
        click.option("--hardware-compatible", is_flag=True, help="TensorRT engine runs on any Ampere+ GPU."),
        click.option("--version-compatible", is_flag=True,
                     help="TensorRT engine runs on later TensorRT releases of the same major version."),
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
    kwargs["add_bits"] = int(kwargs["add_bits"])
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
    if acc.get("drop"):
        d = acc["drop"]
        table.add_row("drop vs FP32 (paired, ± std. error)",
                      f"{d['drop_pp']:+.2f} ± {d['drop_se_pp']:.2f} pp ({d['lost']} lost, {d['gained']} gained)")
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


def _batches(ctx, param, value: str) -> tuple[int, ...]:  # noqa: ARG001
    try:
        batches = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated batch sizes, e.g. 1,32") from None
    if not batches or min(batches) < 1:
        raise click.BadParameter(f"{value!r}: batch sizes must be >= 1")
    return batches


def _percent(ctx, param, value: str) -> float:  # noqa: ARG001
    try:
        pct = float(value.strip().rstrip("%"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a percentage such as 10%") from None
    if pct < 0:
        raise click.BadParameter(f"{value!r}: must be >= 0")
    return pct


@main.command()
@click.argument("engine", type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "onnxruntime-reference", "tensorrt"]),
              default="auto", show_default=True, help="auto: from the file name (.ref.onnx, .plan, else ORT).")
@click.option("--batch", "batches", default="1,32", show_default=True, callback=_batches,
              help="Comma-separated batch sizes.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--iters", type=click.IntRange(min=1), help="Timed iterations per batch size (instead of --seconds).")
@click.option("--seconds", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Time budget per batch size when --iters is not given.")
@click.option("--reference", type=click.Path(dir_okay=False),
              help="FP32 ONNX timed interleaved with the engine, so the speed-up is measured in one run.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for ONNX Runtime (default: all cores).")
@click.option("--out", type=click.Path(dir_okay=False), help="JSON output (default: bench.json beside ENGINE).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON on stdout instead of a table.")
@_guard
def bench(engine, backend, batches, warmup, iters, seconds, reference, seed, threads, out, as_json) -> None:
    """Latency percentiles (p50/p90/p99) and throughput of ENGINE at each batch size."""
    from pathlib import Path

    from rich.table import Table

    from repapq_deploy.artifacts import write_json
    from repapq_deploy.bench import BenchSettings, run_bench
    from repapq_deploy.environment import limit_threads

    limit_threads(threads)

    result = run_bench(engine, backend=backend, reference=reference,
                       settings=BenchSettings(batches, warmup, iters, seconds, seed))
    out = Path(out) if out else Path(engine).parent / "bench.json"
    write_json(out, result)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    hw = result["hardware"]
    table = Table(title=f"{engine} ({result['backend']}) on {hw['gpu'] or hw['cpu']}, {hw['cores']} cores")
    for col in ("batch", "model", "p50 ms", "p90 ms", "p99 ms", "images/s", "iterations", "speed-up"):
        table.add_column(col, justify="right")
    for bs, entry in result["batches"].items():
        for name in ("engine", "reference"):
            if name not in entry:
                continue
            s = entry[name]
            speedup = f"{entry['speedup']:.2f}x" if name == "engine" and "speedup" in entry else ""
            table.add_row(bs, name, f"{s['p50_ms']:.3f}", f"{s['p90_ms']:.3f}", f"{s['p99_ms']:.3f}",
                          f"{s['throughput']:.1f}", str(s["iterations"]), speedup)
    click.echo(_render(table))
    log(f"wrote {out}")


def _render(renderable) -> str:
    from rich.console import Console

    buffer = Console(width=120, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    buffer.print(renderable)
    return buffer.export_text()


@main.command()
@click.argument("report", type=click.Path())
@click.option("--baseline", required=True, type=click.Path(dir_okay=False), help="Baseline JSON to compare with.")
@click.option("--max-latency-regression", default="10%", show_default=True, callback=_percent,
              help="Allowed loss of the engine's speed-up over FP32, in percent.")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), default=0.3, show_default=True,
              help="Allowed drop of top-1 and of agreement with FP32, in percentage points.")
@click.option("--update-baseline", is_flag=True, help="Write REPORT's figures as the new baseline (atomically).")
@click.option("--summary", type=click.Path(dir_okay=False), help="Write (append) a Markdown summary here.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON on stdout.")
def check(report, baseline, max_latency_regression, max_accuracy_drop, update_baseline, summary, as_json) -> None:
    """Compare a build's REPORT (report.json or its folder) with a stored baseline.

    Exit codes: 0 pass, 1 regression, 2 baseline from different hardware (latency not compared),
    3 unusable report or baseline.
    """
    from rich.table import Table

    from repapq_deploy import gate

    try:
        data = gate.load_report(report)
        current = gate.baseline_from_report(data, str(report))
        if update_baseline:
            gate.update_baseline(data, str(report), baseline)
            log(f"baseline written: {baseline}")
            return
        base = gate.load_baseline(baseline)
        code, checks, diffs = gate.compare(base, current, max_latency_regression, max_accuracy_drop)
        if summary:
            gate.write_summary(summary, gate.summary_markdown(checks, diffs, code, str(report), str(baseline)))
    except DeployError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(gate.BAD_INPUT)
    if as_json:
        click.echo(json.dumps({"exit_code": code, "hardware_differences": diffs,
                               "checks": [c.__dict__ | {"delta": c.delta} for c in checks]}, indent=2))
    else:
        table = Table(title=f"repapq-deploy check: {report} vs {baseline}")
        for col in ("metric", "baseline", "this build", "delta", "limit", "result"):
            table.add_column(col, justify="right" if col not in ("metric", "limit") else "left")
        for ch in checks:
            result = "not compared" if not ch.compared else "ok" if ch.ok else "REGRESSION"
            table.add_row(ch.metric, gate._num(ch.baseline), gate._num(ch.current), ch.delta, ch.limit, result)
        click.echo(_render(table))
    for d in diffs:
        log(f"[yellow]hardware differs:[/yellow] {escape(d)}")
    verdict = {gate.PASS: "[green]pass[/green]", gate.REGRESSION: "[red]regression[/red]",
               gate.OTHER_HARDWARE: "[yellow]baseline from different hardware: latency not compared[/yellow]"}
    log(f"check: {verdict[code]}")
    sys.exit(code)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", type=click.Choice(["tensorrt", "onnxruntime"]), required=True,
              help="Backend whose Q/DQ placement rules to check.")
@click.option("--json", "as_json", is_flag=True, help="Print the violations as JSON on stdout.")
@_guard
def lint(model, target, as_json) -> None:
    """Check a QDQ ONNX graph against a backend's Q/DQ placement rules (exit 1 on violations)."""
    from repapq_deploy.export.lint import lint_model

    violations = lint_model(model, target)
    if as_json:
        click.echo(json.dumps([v.__dict__ | {"nodes": list(v.nodes)} for v in violations], indent=2))
    else:
        for v in violations:
            click.echo(str(v))
        log(f"{model}: {len(violations)} violation(s) of the {target} rules")
    sys.exit(1 if violations else 0)
