"""The writer-pipeline benchmark runs end to end at tiny size and writes a well-formed report."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_writer_pipeline.py"


def test_bench_writer_pipeline_quick(tmp_path):
    out = tmp_path / "pipeline.json"
    subprocess.run([sys.executable, str(BENCH), "--quick", "--dir", str(tmp_path), "--out", str(out),
                    "--durability", "syncfs,fsync"], check=True, timeout=300)
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"threads-syncfs", "threads-fsync", "process-syncfs", "process-fsync"}
    assert report["ops_per_s_alone"] > 0 and report["forward_ops_per_batch"] > 0
    for name, (run,) in report["runs"].items():
        assert run["images_per_s"] == 32 / run["seconds"], name
        assert run["bytes_stored"] > 0 and run["raw_write_GBps"] > 0
        limit = min(run["disk_bound_images_per_s"], report["config"]["batch"] / report["config"]["forward_seconds"])
        assert run["ratio_to_limit"] == run["images_per_s"] / limit
        assert set(run["writer_seconds_per_block"]) == {"ready", "chunks", "coordinates", "flush", "marker"}
    assert not list(tmp_path.glob("bench-pipeline-*"))  # its store and raw file removed
