"""The analysis benchmark runs end to end at tiny size on the CPU and writes a well-formed report."""

from conftest import run_quick_benchmark


def test_bench_analyze_quick(tmp_path):
    report = run_quick_benchmark("bench_analyze", tmp_path)
    rates = report["tokens_per_s"]
    assert set(rates["analysis"]) == {"float32-threads", "bfloat16-threads", "float32-sync",
                                       "float32-threads-full", "bfloat16-threads-full"}
    assert min(rates["analysis"].values()) > 0 and min(rates["kernel_only"].values()) > 0 and rates["read_warm"] > 0
    assert report["config"]["tokens_total"] == 2 * (8 * 8 + 8 * 2)  # 2 states x (image + text tokens)
    for dtype in ("float32", "bfloat16"):
        for suffix in ("", "-full"):
            assert report["ratios"][dtype + suffix]["analysis_vs_limit"] == rates["analysis"][
                f"{dtype}-threads{suffix}"] / min(rates["kernel_only"][dtype], rates["read_cold"] or rates["read_warm"])
    assert 1 <= report["mean_l0_image"] <= 96
    # every run's statistics were checked against the plain-torch backend's on the warm-up block
    agreement = report["agreement_with_reference"]
    assert set(agreement) == set(rates["analysis"]) and report["results_agree"] is True
    assert all(a["fvu"] <= 1e-4 and a["l0_mean"] <= 1e-4 for name, a in agreement.items() if name.startswith("float32"))
    beyond = report["l0_beyond_code_buffer"]
    assert beyond["tokens_per_task"] == 4 * 8 and 1 <= beyond["slots_per_token"] <= 96  # one chunk of 4 images x 8
    for kind in ("image", "text"):
        assert 1 <= beyond[kind]["max_l0"] <= 96 and 0.0 <= beyond[kind]["share_beyond"] <= 1.0
