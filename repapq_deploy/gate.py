"""``repapq-deploy check``: the CI regression gate comparing a build's report with a baseline.

Latency is compared as the engine's speed-up over the FP32 reference measured in the same run
(a ratio holds across machines of the same kind; absolute milliseconds do not). Accuracy is
compared in percentage points, and the integer-op fraction must not fall.

Exit codes: 0 pass, 1 regression, 2 baseline from different hardware (latency not compared;
accuracy still checked), 3 unusable report or baseline.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from repapq_deploy.artifacts import write_json, write_text
from repapq_deploy.errors import InputError

SCHEMA = 1
PASS, REGRESSION, OTHER_HARDWARE, BAD_INPUT = 0, 1, 2, 3
FINGERPRINT_KEYS = ("cpu", "cores", "isa", "machine", "gpu")


class GateInputError(InputError):
    """A report or baseline that cannot be used (exit code 3)."""


@dataclass
class Check:
    """One compared metric."""

    metric: str
    baseline: float | None
    current: float | None
    limit: str
    ok: bool
    compared: bool = True

    @property
    def delta(self) -> str:
        if self.baseline is None or self.current is None:
            return "n/a"
        return f"{self.current - self.baseline:+.3f}"


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GateInputError(f"{what} {path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GateInputError(f"{what} {path}: not valid JSON ({exc}); restore it or re-create it with "
                             "`update_baseline`") from None
    if not isinstance(data, dict):
        raise GateInputError(f"{what} {path}: expected a JSON object")
    return data


def load_report(path: str | Path) -> dict:
    """A build's ``report.json`` (``path`` may be the build folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    report = _read_json(path, "report")
    for key in ("accuracy", "engine", "latency_ms", "hardware"):
        if key not in report:
            raise GateInputError(f"report {path}: has no '{key}' section; is it a repapq-deploy report.json?")
    return report


def baseline_from_report(report: dict, source: str) -> dict:
    """The facts of a report that the gate compares, with the hardware they were measured on."""
    acc, lat = report["accuracy"], report["latency_ms"]
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source,
        "hardware": {k: report["hardware"].get(k) for k in FINGERPRINT_KEYS},
        "engine_backend": report["engine"]["backend"],
        "config": {k: report.get("config", {}).get(k) for k in ("profile", "bits", "first_last_bits", "method")},
        "accuracy": {"engine_top1": acc["engine"]["top1"], "agreement_top1": acc["agreement_top1"],
                     "cosine": acc["cosine"], "samples": acc["samples"]},
        "int8_op_fraction": report["engine"]["int8_op_fraction"],
        "latency": {"speedup": dict(lat["speedup"]), "engine_ms": dict(lat["engine"]),
                    "fp32_ms": dict(lat["fp32"])},
    }


def load_baseline(path: str | Path) -> dict:
    """A baseline file, validated."""
    path = Path(path)
    data = _read_json(path, "`baseline`")
    if data.get("schema") != SCHEMA:
        raise GateInputError(f"`baseline` {path}: schema {data.get('schema')!r}, expected {SCHEMA}; "
                             "re-create it with `update_baseline`")
    for key in ("hardware", "accuracy", "int8_op_fraction", "latency", "engine_backend"):
        if key not in data:
            raise GateInputError(f"`baseline` {path}: missing '{key}'; re-create it with `update_baseline`")
    return data


def hardware_differences(baseline: dict, current: dict) -> list[str]:
    """Human-readable differences between two hardware fingerprints (plus the engine backend)."""
    diffs = [f"{k}: baseline {baseline['hardware'].get(k)!r}, this run {current['hardware'].get(k)!r}"
             for k in FINGERPRINT_KEYS if baseline["hardware"].get(k) != current["hardware"].get(k)]
    if baseline["engine_backend"] != current["engine_backend"]:
        diffs.append(f"engine backend: baseline {baseline['engine_backend']}, this run {current['engine_backend']}")
    return diffs


def compare(baseline: dict, current: dict, max_latency_regression: float, max_accuracy_drop: float
            ) -> tuple[int, list[Check], list[str]]:
    """Compare; returns (exit code, checks, hardware differences)."""
    diffs = hardware_differences(baseline, current)
    checks: list[Check] = []
    for key, label in (("engine_top1", "engine top-1 %"), ("agreement_top1", "agreement with FP32 %")):
        b, c = baseline["accuracy"].get(key), current["accuracy"].get(key)
        if b is None or c is None:
            continue
        checks.append(Check(label, b, c, f"drop <= {max_accuracy_drop:g} pp", b - c <= max_accuracy_drop + 1e-9))
    b, c = baseline["int8_op_fraction"], current["int8_op_fraction"]
    # None: the backend runs no integer kernels it can count (reference execution); nothing to compare
    measured = b is not None and c is not None
    checks.append(Check("int8 op fraction", b, c, "no drop", not measured or c >= b - 1e-9, compared=measured))
    for bs, b in sorted(baseline["latency"]["speedup"].items()):
        c = current["latency"]["speedup"].get(bs)
        if c is None:
            continue
        # regression = how much slower the engine got relative to FP32, in percent
        regression = (b / c - 1.0) * 100
        checks.append(Check(f"speed-up vs FP32 ({bs})", b, c, f"slower by <= {max_latency_regression:g} %",
                            regression <= max_latency_regression, compared=not diffs))
    failed = [ch for ch in checks if ch.compared and not ch.ok]
    code = REGRESSION if failed else OTHER_HARDWARE if diffs else PASS
    return code, checks, diffs


def summary_markdown(checks: list[Check], diffs: list[str], code: int, report_path: str, baseline_path: str) -> str:
    """A Markdown summary for a CI job page (e.g. ``$GITHUB_STEP_SUMMARY``)."""
    verdict = {PASS: "passed", REGRESSION: "FAILED: regression",
               OTHER_HARDWARE: "latency not compared (baseline from different hardware)"}[code]
    lines = [f"### repapq-deploy gate: {verdict}", "", f"Report `{report_path}` vs baseline `{baseline_path}`.", "",
             "| metric | baseline | this build | delta | limit | result |", "| --- | --- | --- | --- | --- | --- |"]
    for ch in checks:
        result = "not compared" if not ch.compared else "ok" if ch.ok else "**REGRESSION**"
        lines.append(f"| {ch.metric} | {_num(ch.baseline)} | {_num(ch.current)} | {ch.delta} | {ch.limit} | {result} |")
    if diffs:
        lines += ["", "Hardware differs from the baseline's:"] + [f"- {d}" for d in diffs]
    return "\n".join(lines) + "\n"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def update_baseline(report: dict, source: str, path: str | Path) -> dict:
    """Write a new baseline atomically."""
    data = baseline_from_report(report, source)
    write_json(path, data)
    return data


def write_summary(path: str | Path, text: str) -> None:
    """Append when the file exists (CI summary files collect several steps), else create it."""
    path = Path(path)
    if path.exists():
        with path.open("a") as f:
            f.write(text)
    else:
        write_text(path, text)
