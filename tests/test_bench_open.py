"""The open benchmark runs end to end at tiny size and writes a well-formed report."""

from conftest import run_quick_benchmark


def test_bench_open_quick(tmp_path):
    report = run_quick_benchmark("bench_open", tmp_path, "--dir", str(tmp_path), timeout=300)
    blocks = report["config"]["blocks"]
    assert set(report["results"]) == {"0ms", "10ms", "local"}
    local = report["results"].pop("local")
    assert local["open_s"] > 0 and local["zarr_reads_s"] > 0 and local["speedup_vs_zarr_reads"] > 0
    for entry in report["results"].values():
        assert entry["open_s"] > 0 and entry["zarr_reads_s"] > 0 and entry["speedup_vs_zarr_reads"] > 0
        # a marker, image ids and prompts per block, and a few metadata documents: nothing asked twice
        assert 3 * blocks <= entry["gets"] <= 3 * blocks + 12 and entry["zarr_gets"] >= 3 * blocks
    assert report["results"]["10ms"]["latency_floor_s"] > report["results"]["0ms"]["latency_floor_s"] == 0
