"""The writer-pipeline benchmark runs end to end at tiny size and writes a well-formed report."""

from conftest import run_quick_benchmark


def test_bench_writer_pipeline_quick(tmp_path):
    report = run_quick_benchmark("bench_writer_pipeline", tmp_path, "--dir", str(tmp_path), "--durability",
                                 "syncfs,fsync", timeout=300)
    assert set(report["runs"]) == {"threads-syncfs", "threads-fsync", "process-syncfs", "process-fsync"}
    assert report["ops_per_s_alone"] > 0 and report["forward_ops_per_batch"] > 0
    for name, (run,) in report["runs"].items():
        assert run["images_per_s"] == 32 / run["seconds"], name
        assert run["bytes_stored"] > 0 and run["raw_write_GBps"] > 0
        limit = min(run["disk_bound_images_per_s"], report["config"]["batch"] / report["config"]["forward_seconds"])
        assert run["ratio_to_limit"] == run["images_per_s"] / limit
        assert set(run["writer_seconds_per_block"]) == {"ready", "chunks", "coordinates", "flush", "marker"}
        assert run["blocks_copied_for_the_child"] == (0 if name.startswith("process") else None), name
    assert report["errors"] == {}
    assert not list(tmp_path.glob("bench-pipeline-*"))  # its store and raw file removed
