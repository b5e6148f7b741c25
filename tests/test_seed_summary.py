"""benchmarks/seed_summary.py: pooling calibration.py runs, on the committed seed runs."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
from seed_summary import load_runs, paired, summarize  # noqa: E402

SEEDS = BENCH / "results" / "calibration_seeds"
TARGETS = {"default/W8A8": 0.03, "default/W6A6": 0.15}


def test_pooled_means_equal_the_runs_rows() -> None:
    dirs = [SEEDS / f"amd_mobileone_seed{n}" for n in range(3)]
    cells = {(c["method"], c["preset"], c["setting"], c["profile"]): c
             for c in summarize(load_runs(dirs, "mobileone_s0"), TARGETS)}
    raw = [json.loads((d / "mobileone_s0.json").read_text()) for d in dirs]
    key = ("repapq (equalize all)", "default", "W6A6", "onnxruntime")
    drops = [r["fp32"] - row["top1"] for r in raw for row in r["rows"]
             if (row["method"], row["preset"], row["setting"], row["profile"]) == key]
    cell = cells[key]
    assert cell["n"] == 3 and [r["seed"] for r in cell["runs"]] == [0, 1, 2]
    assert cell["mean_drop_pp"] == pytest.approx(statistics.fmean(drops), abs=1e-3)
    assert cell["sem_pp"] == pytest.approx(statistics.stdev(drops) / 3 ** 0.5, abs=1e-3)
    assert cell["meets_target"] is (cell["mean_drop_pp"] <= 0.15)
    # only repapq rows are held to the targets; a one-run row has no spread
    brecq = cells[("brecq (equalize all)", "default", "W6A6", "onnxruntime")]
    assert brecq["target_pp"] is None and brecq["meets_target"] is None
    assert cells[("repapq (equalize all)", "thorough", "W8A8", "tensorrt")]["sd_pp"] is None


def test_runs_of_different_checkpoints_are_refused() -> None:
    with pytest.raises(SystemExit, match="different checkpoints"):
        load_runs([SEEDS / "amd_mobileone_seed0", SEEDS / "eqall_seed1"], "mobileone_s0")
    with pytest.raises(SystemExit, match="not found"):
        load_runs([SEEDS / "amd_mobileone_seed0"], "no_such_arch")


def test_runs_with_other_weights_are_refused_even_at_equal_fp32(tmp_path: Path) -> None:
    run = json.loads((SEEDS / "amd_mobileone_t2_seed0" / "mobileone_s0.json").read_text())
    dirs = []
    for i, digest in enumerate(["aa" * 32, "bb" * 32]):
        rows = [{**{k: v for k, v in row.items() if k != "model_sha256"}, "model_digest": digest}
                for row in run["rows"]]
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "mobileone_s0.json").write_text(json.dumps({**run, "rows": rows}))
        dirs.append(tmp_path / str(i))
    with pytest.raises(SystemExit, match="2 values of model_digest"):
        load_runs(dirs, "mobileone_s0")
    # a run with a content digest pools with runs that recorded only a file hash or nothing
    assert len(load_runs([dirs[0], SEEDS / "amd_mobileone_t2_seed1", SEEDS / "amd_mobileone_seed0"],
                         "mobileone_s0")) == 3


def test_a_cuda_run_pools_with_the_cpu_runs_of_the_same_weights() -> None:
    cuda = BENCH / "results" / "calibration_cuda" / "repvgg_a0"
    dirs = [SEEDS / "amd_eqall_t2_seed2", cuda]
    cells = {(c["method"], c["preset"], c["setting"], c["profile"]): c
             for c in summarize(load_runs(dirs, "repvgg_a0"), TARGETS)}
    cell = cells[("repapq (equalize all)", "default", "W8A8", "tensorrt")]
    assert [r["device"] for r in cell["runs"]] == ["cpu", "cuda"]
    fp32 = json.loads((cuda / "repvgg_a0.json").read_text())["fp32"]
    assert cell["runs"][1]["drop_pp"] == pytest.approx(fp32 - 92.99, abs=1e-6)


def test_a_draw_in_two_folders_counts_once(capsys: pytest.CaptureFixture[str]) -> None:
    # the one-thread seed-0 run holds a fast W6A6 build; the fast-only folder built the same draw again
    dirs = [SEEDS / "amd_eqall_seed0", SEEDS / "amd_repvgg_w6trt_fast_t1_seed0",
            SEEDS / "amd_repvgg_w6trt_fast_t1_seed1"]
    cells = {(c["method"], c["preset"], c["setting"], c["profile"]): c
             for c in summarize(load_runs(dirs, "repvgg_a0"), TARGETS)}
    cell = cells[("repapq (equalize all)", "fast", "W6A6", "tensorrt")]
    assert [(r["seed"], r["dir"]) for r in cell["runs"]] == [(0, str(dirs[0])), (1, str(dirs[2]))]
    assert "counted once" in capsys.readouterr().err


def test_paired_differences_match_the_rows() -> None:
    # the ten CPU draws that both RepAPQ and BRECQ have on mobileone_s0 W6A6 ONNX Runtime
    dirs = ([SEEDS / f"amd_mobileone_{t}seed{n}" for t in ("", "t2_") for n in range(3)]
            + [SEEDS / f"amd_mobileone_{k}_t2_seed{n}" for k in ("brecq", "w6ort") for n in range(3, 7)])
    cells = summarize(load_runs(dirs, "mobileone_s0"), TARGETS)
    pairs = {(p["setting"], p["profile"], p["second"]["method"]): p for p in paired(cells)}
    p = pairs[("W6A6", "onnxruntime", "brecq (equalize all)")]
    assert p["first"] == {"method": "repapq (equalize all)", "preset": "default"} and p["n"] == 10
    by_key = {(c["method"], c["preset"], c["setting"], c["profile"]): c for c in cells}
    a = {(r["seed"], r["threads"]): r["drop_pp"]
         for r in by_key[("repapq (equalize all)", "default", "W6A6", "onnxruntime")]["runs"]}
    diffs = [r["drop_pp"] - a[(r["seed"], r["threads"])]
             for r in by_key[("brecq (equalize all)", "default", "W6A6", "onnxruntime")]["runs"]]
    assert p["mean_diff_pp"] == pytest.approx(statistics.fmean(diffs))
    assert p["sem_pp"] == pytest.approx(statistics.stdev(diffs) / 10 ** 0.5)
    # the figure quoted in docs/benchmarks.md
    assert round(p["mean_diff_pp"], 3) == 0.039 and round(p["sem_pp"], 3) == 0.027
    # W8A8 rows of one method only: nothing to pair
    assert not any(q["setting"] == "W8A8" for q in pairs.values())
