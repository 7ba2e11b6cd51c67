"""The loader benchmark runs end to end at tiny size and writes a well-formed report."""

from conftest import run_quick_benchmark


def test_bench_loader_quick(tmp_path):
    report = run_quick_benchmark("bench_loader", tmp_path, timeout=300)
    step = report["seconds_per_step"]
    assert step["load"] > 0 and step["device"] == step["load"]  # by default the device waits as long as loading
    assert set(step["overlapped_by_threads"]) == {"1", "2"}
    # every step waits for its device step, overlapped or not (timings beyond that are the benchmark's to report)
    assert step["serial"] >= step["device"] and min(step["overlapped_by_threads"].values()) >= step["device"]
    assert report["ratios"]["speedup_vs_serial"] == step["serial"] / min(step["overlapped_by_threads"].values())
