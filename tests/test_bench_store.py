"""The store benchmark runs end to end at tiny size and writes a well-formed report."""

from conftest import run_quick_benchmark


def test_bench_store_quick(tmp_path):
    report = run_quick_benchmark("bench_store", tmp_path, "--codecs", "none,zstd", "--dir", str(tmp_path), timeout=300)
    assert set(report["results"]) == {"none", "zstd"}
    for entry in report["results"].values():
        assert entry["raw_write_GBps"] > 0 and entry["write_GBps_logical"] > 0 and entry["read_GBps_logical"] > 0
        assert entry["read_zarr_GBps_logical"] > 0 and entry["read_ours_vs_zarr"] > 0
        assert entry["verify_GBps_logical"] > 0 and entry["verify_zarr_GBps_logical"] > 0
        assert entry["bytes_stored"] > 0 and entry["zarr_default"]["write_GBps_logical"] > 0
        assert entry["bound_by"] in ("disk", "cpu")
        assert entry["read_back_equal"] is True  # what was timed read the values written
    assert report["results"]["zstd"]["compression_ratio"] > report["results"]["none"]["compression_ratio"]
