"""Command line: ``repapq-deploy build`` (and one subcommand per stage), ``bench``, ``check``, ``lint``.

A thin shell over the library: options become :class:`~repapq_deploy.pipeline.BuildOptions` and a
:class:`~repapq_deploy.recipe.Recipe`; library errors come back as one line naming this command's own
flag for the setting at fault. A stage subcommand runs the pipeline up to that stage in the same output
folder, so ``repapq-deploy calibrate model.pt --out DIR`` followed by ``repapq-deploy build model.pt
--out DIR`` calibrates once.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click
from rich.markup import escape

from repapq_deploy import __version__
from repapq_deploy.errors import DeployError
from repapq_deploy.progress import console, log

STAGES = ("reparam", "calibrate", "export", "engine", "verify")
METHODS = ("auto", "minmax", "percentile", "entropy", "mse", "mae", "brecq", "repapq")
TENSORRT = "TensorRT builder"


def _floats(value: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers", param_hint=option) from None


def _size(ctx, param, value: str | None) -> tuple[int, ...] | None:  # noqa: ARG001
    if value is None:
        return None
    floats = _floats(value, param.opts[0])
    if len(floats) != 3 or any(f != int(f) or f < 1 for f in floats):
        raise click.BadParameter(f"{value!r}: expected three positive integers")
    return tuple(int(f) for f in floats)


def _normalize(ctx, param, value: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:  # noqa: ARG001
    if value is None:
        return None
    mean, sep, std = value.partition("/")
    if not sep:
        raise click.BadParameter(f"{value!r}: expected MEAN/STD, e.g. 0.5/0.5 or 0.485,0.456,0.406/0.229,0.224,0.225")
    return _floats(mean, "--normalize"), _floats(std, "--normalize")


class _Option(click.Option):
    """An option that knows its help section (``group``)."""

    def __init__(self, *args, group: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


class _Command(click.Command):
    """Help with the TensorRT builder options in their own section."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                sections.setdefault(getattr(param, "group", None) or "Options", []).append(record)
        for name, records in sections.items():
            with formatter.section(f"{name} options" if name == TENSORRT else name):
                formatter.write_dl(records)


def _opt(*decls, **kwargs):
    return click.option(*decls, cls=_Option, **kwargs)


# Settings that moved into the recipe keep their old flags, hidden, so existing scripts still run.
RECIPE_FLAGS = {
    "preset": click.Choice(["fast", "default", "thorough"]), "eval_count": int, "resize": int,
    "batch_size": int, "opset": int, "bench_seconds": float, "add_bits": click.Choice(["8", "6"]),
    "offset_relu": click.Choice(["auto", "none", "unpadded", "all"]), "equalize":
    click.Choice(["auto", "none", "depthwise", "all"]), "qdrop": float, "calib_augment": str,
}
RECIPE_SWITCHES = ("split_identity", "adaround", "gptq")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_options(fn):
    """The options of ``build`` and the stage subcommands, defined once."""
    options = [
        click.argument("model", type=click.Path(dir_okay=False)),
        _opt("--arch", help="timm model name for state dicts (e.g. repvgg_a0, mobileone_s0)."),
        _opt("--input-size", callback=_size, help="C,H,W the model takes (default: timm's data config)."),
        _opt("--normalize", callback=_normalize,
             help="Per-channel normalization MEAN/STD, e.g. 0.5/0.5 (default: timm's data config)."),
        _opt("--calib", default="calib", show_default=True,
             help="Calibration data: image folder, or .npz/.npy/.pt of preprocessed N,C,H,W tensors."),
        _opt("--calib-count", type=click.IntRange(min=1), default=256, show_default=True,
             help="Calibration samples drawn (seeded) from --calib."),
        _opt("--eval", "eval_", help="Evaluation data with labels: class-folder images or .npz with x,y "
                                     "(default: agreement with FP32 on --calib)."),
        _opt("--bits", type=click.Choice(["8", "6"]), default="8", show_default=True,
             help="Weight and activation bits; 6 is emulated exactly on INT8 kernels."),
        _opt("--first-last-bits", type=click.Choice(["8", "6"]), default="8", show_default=True,
             help="Bits of the first conv and the classifier under --bits 6."),
        _opt("--method", type=click.Choice(METHODS), default="auto", show_default=True,
             help="Calibration: auto = the candidate closest to FP32 on held-out calibration images; "
                  "reconstruction (repapq, brecq; minutes) or a range method (seconds)."),
        _opt("--max-drop", type=click.FloatRange(min=0), metavar="PP",
             help="Accuracy budget: the engine's top-1 drop vs FP32 in pp (with --eval labels; else 100 - "
                  "agreement %). Missed: the most sensitive tensors are raised to 8 bits / float until it "
                  "holds, else exit 1."),
        _opt("--recipe", help="Expert settings: a named recipe (fast, thorough, ...) or a .yaml/.json file "
                              "(docs/recipes.md)."),
        _opt("--profile", type=click.Choice(["tensorrt", "onnxruntime"]),
             help="Quantization scheme (default: the backend's)."),
        _opt("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
             show_default=True, help="Engine backend; auto = TensorRT if usable here, else ONNX Runtime."),
        _opt("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
             help="Where calibration runs."),
        _opt("--threads", type=click.IntRange(min=1), help="CPU threads for PyTorch and ONNX Runtime (default: all)."),
        _opt("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sample and training."),
        _opt("--out", help="Output folder (default: engines/<model file name>)."),
        _opt("--trust-pickle", is_flag=True, help="Allow unpickling whole modules (runs code from the file)."),
        _opt("--force", is_flag=True, help="Re-run every stage even if up to date."),
        _opt("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
        _opt("--trt-batch", callback=_size, default="1,8,32", show_default=True, group=TENSORRT,
             help="Optimization profile batch sizes: min,opt,max."),
        _opt("--workspace-mib", type=click.IntRange(min=1), default=4096, show_default=True, group=TENSORRT,
             help="Builder workspace limit."),
        _opt("--builder-opt-level", type=click.IntRange(0, 5), default=3, show_default=True, group=TENSORRT,
             help="Builder optimization level."),
        _opt("--hardware-compatible", is_flag=True, group=TENSORRT, help="Engine runs on any Ampere+ GPU."),
        _opt("--version-compatible", is_flag=True, group=TENSORRT,
             help="Engine runs on later TensorRT releases of the same major version."),
        # hidden: earlier flags, kept working
        _opt("--in-chans", type=click.IntRange(min=1), hidden=True),
        _opt("--num-classes", type=click.IntRange(min=1), hidden=True),  # read from the checkpoint's weights
        _opt("--mean", hidden=True),
        _opt("--std", hidden=True),
        *[_opt(_flag(k), k, type=t, hidden=True) for k, t in RECIPE_FLAGS.items()],
        *[_opt(f"{_flag(k)}/--no-{_flag(k)[2:]}", k, default=None, hidden=True) for k in RECIPE_SWITCHES],
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def cli_name(setting: str) -> str:
    """How this command line spells a library setting in an error message."""
    from repapq_deploy.recipe import Recipe

    if setting in Recipe.__dataclass_fields__:
        return f"recipe key {setting}"
    return {"recipe_key": "recipe key", "mean": "--normalize", "std": "--normalize", "in_chans": "--input-size",
            "onnx_path": "--onnx_path"}.get(setting, _flag(setting))


def _options(kwargs: dict):
    """BuildOptions from the parsed command line (a recipe file plus any old recipe flags on top)."""
    from repapq_deploy.options import BuildOptions
    from repapq_deploy.recipe import Recipe

    kwargs["eval"] = kwargs.pop("eval_")
    for key in ("bits", "first_last_bits"):
        kwargs[key] = int(kwargs[key])
    normalize = kwargs.pop("normalize")
    mean, std = kwargs.pop("mean"), kwargs.pop("std")
    if normalize:
        mean, std = normalize
    kwargs["mean"] = _floats(mean, "--mean") if isinstance(mean, str) else mean
    kwargs["std"] = _floats(std, "--std") if isinstance(std, str) else std
    recipe = Recipe.load(kwargs.pop("recipe")) if kwargs.get("recipe") else Recipe()
    kwargs.pop("recipe", None)
    moved = {k: kwargs.pop(k) for k in (*RECIPE_FLAGS, *RECIPE_SWITCHES)}
    moved = {k: v for k, v in moved.items() if v is not None}
    if "add_bits" in moved:
        moved["add_bits"] = int(moved["add_bits"])
    if "calib_augment" in moved:
        moved["calib_augment"] = [] if moved["calib_augment"] == "none" else moved["calib_augment"].split(",")
    for key in moved:
        log(f"[dim]note: {_flag(key)} is the recipe key {key} now (--recipe FILE); it still works here[/dim]")
    return BuildOptions(**kwargs, recipe=recipe.replace(**moved) if moved else recipe)


def _run(until: str, kwargs: dict) -> None:
    from repapq_deploy.pipeline import Build

    as_json = kwargs.pop("as_json")
    build = Build(_options(kwargs))
    result = build.run(until)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    elif until == "verify":
        _summary(result, build.out)


def _summary(report: dict, out) -> None:
    from rich.table import Table

    from repapq_deploy.verify.report import slower_note

    acc, lat, eng = report["accuracy"], report["latency_ms"], report["engine"]
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
    if eng.get("int8_op_fraction") is not None:
        table.add_row("engine", f"{eng['backend']}, conv/gemm in integer kernels {eng['int8_op_fraction']:.0%}")
    else:
        table.add_row("engine", f"{eng['backend']} (float kernels), conv/gemm inputs quantized "
                                f"{eng.get('qdq_coverage') or 0:.0%}")
    reference = {"tensorrt-fp16": "FP16", "onnxruntime-fp32": "FP32"}.get(lat.get("reference"), "FP32")
    for bs in ("bs1", "bs32"):
        table.add_row(f"p50 latency {bs} {reference} -> engine",
                      f"{lat['fp32'][bs]:.3f} -> {lat['engine'][bs]:.3f} ms ({lat['speedup'][bs]:.2f}x)")
    console.print(table)
    note = slower_note(lat["speedup"], report["reparam"].get("flops_after"))
    if note:
        log(f"note: {note}")
    for w in report.get("warnings", []):
        log(f"[yellow]warning:[/yellow] {escape(w)}")
    log(f"report: {out}/report.md, {out}/report.json")


def _fail(exc: DeployError, code: int = 1):
    console.print(f"[red]error:[/red] {escape(exc.render(cli_name))}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _guard(fn):
    """Turn a DeployError into a one-line message naming this command's flags, and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeployError as exc:
            _fail(exc)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="repapq-deploy")
def main() -> None:
    """Deploy reparameterizable CNNs (RepVGG, MobileOne, ...) as verified INT8 / INT6-emulated engines."""


@main.command(cls=_Command)
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
    main.command(name=stage, cls=_Command)(command)


STAGE_HELP = {
    "reparam": "Load MODEL and fuse it to a single-branch network (fused.pt), checking exactness.",
    "calibrate": "Run the stages up to calibration (qstate.pt).",
    "export": "Run the stages up to ONNX export (model.fp32.onnx, model.qdq.onnx) and check it.",
    "engine": "Run the stages up to the engine build.",
    "verify": "Run every stage and write report.json / report.md (same as build).",
}
for _stage in STAGES:
    _stage_command(_stage, STAGE_HELP[_stage])


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
        _fail(exc, gate.BAD_INPUT)
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
