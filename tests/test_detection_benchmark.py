"""The detection benchmark's quick size end to end (issue 10): gradwatch meets its targets on fresh runs."""

import json

import pytest
import torch

from benchmarks import detection


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("detection")
    threads = torch.get_num_threads()
    try:
        code = detection.main(["--quick", "--cache", str(out / "cache"), "--out", str(out / "result.json")])
    finally:
        torch.set_num_threads(threads)
    return code, json.loads((out / "result.json").read_text())


def test_quick_benchmark_meets_the_targets(quick):
    code, result = quick
    assert detection.check(result) == [] and code == 0
    ours = result["scores"]["gradwatch (defaults)"]
    for cls in ("whole_x10",) + detection.MUST_CATCH:
        assert ours["total"][cls] == len(result["models"]) and ours["caught"][cls] == ours["total"][cls], cls
    assert ours["fp"] == 0 and ours["clean"] > 500


def test_quick_benchmark_scores_every_detector_on_the_same_faults(quick):
    _, result = quick
    assert set(result["scores"]) == set(detection.DETECTOR_NAMES)
    totals = {name: s["total"] for name, s in result["scores"].items()}
    assert len({json.dumps(t, sort_keys=True) for t in totals.values()}) == 1  # same faults for all
    # The seed's fixed rule cannot see a x30 of one parameter, and NaN is caught by every rule.
    seed = result["scores"][detection.SeedRule.name]
    assert seed["caught"].get("bias_x30", 0) == 0 and seed["caught"]["nan"] == seed["total"]["nan"]


def test_check_reports_a_miss():
    result = {
        "scores": {
            "gradwatch (defaults)": {"caught": {"nan": 0}, "total": {"nan": 1}, "fp": 1, "long_fp": 0},
            detection.ZClipPackage.name: {"caught": {}, "total": {}, "fp": 0, "long_fp": 0},
        },
        "fp_steps": {"gradwatch (defaults)": ["mlp/s0@5"]},
        "fp_by_run": {"gradwatch (defaults)": {"mlp/s0": 1}, detection.ZClipPackage.name: {"mlp/s0": 0}},
    }
    failures = detection.check(result)
    assert "nan: caught 0 of 1" in failures and "mlp/s0: 1 false positives, ZClip 0" in failures
