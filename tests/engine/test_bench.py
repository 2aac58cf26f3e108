"""The benchmark runs (small configuration) and its two attribution methods agree; timings are not asserted."""
import json

from workers.engine import bench


def test_the_benchmark_runs_and_the_fast_attribution_equals_full_backprop(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(["--images", "64", "--batch-size", "32", "--sae-steps", "40", "--n-latents", "64",
                       "--compare-images", "4", "--check", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    subset = result["attribution"]["probe_subset"]
    assert subset["max_abs_diff"] <= 1e-5 and subset["max_abs_value"] > 1e-3  # agree, and not on zeros
    for key in ("encode_image", "extraction", "sae", "attribution", "audit", "run"):
        assert key in result
    assert result["audit"]["ratio_to_encode"] > 0 and result["run"]["command"].startswith("python -m")
    assert "speed-up (same images)" in capsys.readouterr().out
