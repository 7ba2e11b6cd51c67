"""The harvest benchmark runs end to end at tiny size on the CPU and writes a well-formed report."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_harvest.py"


def test_bench_harvest_quick(tmp_path):
    out = tmp_path / "harvest.json"
    subprocess.run([sys.executable, str(BENCH), "--quick", "--dir", str(tmp_path), "--out", str(out),
                    "--writer", "threads,process"], check=True, timeout=600)
    report = json.loads(out.read_text())
    rates = report["images_per_s"]
    assert rates["harvest"] > 0 and rates["forward_only"] > 0 and rates["disk_bound"] > 0
    assert report["config"]["states"] == 5 and report["config"]["image_tokens"] == 16
    assert report["ratios"]["harvest_vs_limit"] == rates["harvest"] / min(rates["forward_only"], rates["disk_bound"])
    assert report["bytes_per_image_logical"] == 5 * 64 * 2 * (16 + 4)  # 5 states x d 64 x bf16 x (16 image + 4 text)
    launches = report["launches_per_s"]
    assert launches["alone"] > 0 and launches["beside_writer"] > 0
    assert launches["ratio"] == launches["beside_writer"] / launches["alone"]
    steps = report["writer_seconds_per_block"]
    assert set(steps) == {"ready", "chunks", "coordinates", "flush", "marker"}
    assert all(0 <= v["mean"] <= v["max"] for v in steps.values()) and steps["chunks"]["max"] > 0
    assert set(report["sweep"]) == {"4-syncfs-threads", "4-syncfs-process"}
    assert report["images_per_s"]["harvest"] == report["sweep"]["4-syncfs-threads"]["images_per_s"]
    assert launches["process_ratio"] == launches["beside_process_writer"] / launches["alone"]
    for name, ratio in (("beside_writer", "ratio"), ("beside_process_writer", "process_ratio")):
        assert launches[f"{ratio}_short_switch"] == launches[f"{name}_short_switch"] / launches["alone"] > 0
