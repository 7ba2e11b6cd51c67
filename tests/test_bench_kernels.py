"""The kernel benchmark runs end to end at tiny size on the CPU and writes a well-formed report."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_kernels.py"


def test_bench_kernels_quick(tmp_path):
    out = tmp_path / "kernels.json"
    subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)], check=True, timeout=600)
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert {"ours", "reference", "encode_gemm_only", "dense_eager", "sae_lens"} <= set(result["contenders"])
    assert all(c["tokens_per_s"] > 0 for c in result["contenders"].values())
    assert 2 <= result["mean_l0"] <= 30  # thresholds were set for L0 ~ 8
    assert result["ratios"]["ours_vs_reference"] > 0
