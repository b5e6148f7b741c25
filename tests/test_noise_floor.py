"""benchmarks/noise_floor.py: top-1 against FP32 under float16 and random weight noise, on the bundled example."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from noise_floor import noise_floor, perturbed, summary  # noqa: E402


def test_perturbation_is_relative_seeded_and_leaves_the_model_alone(fused_example) -> None:
    gm, _ = fused_example
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    a = perturbed(gm, 0.01, torch.Generator().manual_seed(3))
    b = perturbed(gm, 0.01, torch.Generator().manual_seed(3))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
        ref = dict(gm.named_parameters())[name]
        rel = (p - ref)[ref != 0] / ref[ref != 0]
        assert rel.abs().max() < 0.1 and rel.std() > 0.005  # ~N(0, 0.01) relative, not zero
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())


def test_more_noise_flips_more_and_the_summary_counts_every_draw(fused_example, eval_xy) -> None:
    gm, _ = fused_example
    x, y = eval_xy
    rows = noise_floor(gm, x, y.numpy(), [1e-4, 0.3], draws=3, seed=0)
    assert [r["perturbation"] for r in rows] == ["float16"] + ["weights"] * 6
    assert all(0 <= r["flips"] <= len(x) for r in rows)
    summ = {(s["perturbation"], s["sigma"]): s for s in summary(rows)}
    assert summ[("weights", 1e-4)]["draws"] == 3
    # 30 % noise on every parameter scrambles the model; 0.01 % barely moves it
    assert summ[("weights", 0.3)]["median_flips"] > summ[("weights", 1e-4)]["median_flips"] + 5
    low = [r for r in rows if r["sigma"] == 1e-4]
    share = summ[("weights", 1e-4)]["share_drop_le_0.03_pp"]
    assert share == sum(r["drop_pp"] <= 0.03 + 1e-9 for r in low) / 3


def test_results_file_has_the_options_with_home_as_tilde(tmp_path) -> None:
    import argparse
    import json

    from _reference import write_results

    args = argparse.Namespace(build=Path.home() / "b", draws=3, out=tmp_path / "r.json")
    write_results(args.out, args, {"rows": [1, 2]})
    assert json.loads(args.out.read_text()) == {"build": "~/b", "draws": 3, "out": str(tmp_path / "r.json"),
                                                "rows": [1, 2]}
    assert not [p for p in tmp_path.iterdir() if p.name != "r.json"]  # no temporary file left
