"""The kernel benchmark runs end to end at tiny size on the CPU and writes a well-formed report."""

from conftest import run_quick_benchmark


def test_bench_kernels_quick(tmp_path):
    report = run_quick_benchmark("bench_kernels", tmp_path)
    (result,) = report["results"]
    assert {"ours", "reference", "encode_gemm_only", "dense_eager", "sae_lens"} <= set(result["contenders"])
    assert all(c["tokens_per_s"] > 0 for c in result["contenders"].values())
    assert 2 <= result["mean_l0"] <= 30  # thresholds were set for L0 ~ 8
    assert result["ratios"]["ours_vs_reference"] > 0
