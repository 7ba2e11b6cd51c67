"""The harvest benchmark runs end to end at tiny size on the CPU and writes a well-formed report."""

from pathlib import Path

from conftest import run_quick_benchmark


def test_bench_harvest_quick(tmp_path):
    report = run_quick_benchmark("bench_harvest", tmp_path, "--dir", str(tmp_path), "--writer", "threads,process")
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
    assert report["reported_setting"] == "4-syncfs-threads" and report["partial"] is False
    best = max(report["sweep"], key=lambda k: report["sweep"][k]["images_per_s"])
    assert report["ratios"]["best_setting"] == best
    assert report["ratios"]["best_vs_limit"] == report["sweep"][best]["images_per_s"] / min(
        rates["forward_only"], rates["disk_bound"]) >= report["ratios"]["harvest_vs_limit"]
    assert launches["process_ratio"] == launches["beside_process_writer"] / launches["alone"]
    # what was timed stored the model's residuals: bit-equal to output_hidden_states, with either writer
    for setting in ("4-syncfs-threads", "4-syncfs-process"):
        assert report["sweep"][setting]["stored_vs_forward"] == {"images": 4, "states": 4, "max_abs_diff": 0.0,
                                                                 "bit_equal": True}
    assert report["results_agree"] is True
    # the child writer read the harvest's host buffers in place
    assert report["sweep"]["4-syncfs-process"]["blocks_copied_for_the_child"] == 0
    assert report["sweep"]["4-syncfs-threads"]["blocks_copied_for_the_child"] is None
    for name, ratio in (("beside_writer", "ratio"), ("beside_process_writer", "process_ratio")):
        assert launches[f"{ratio}_short_switch"] == launches[f"{name}_short_switch"] / launches["alone"] > 0


def test_a_setting_that_fails_is_reported_and_the_others_still_measured(tmp_path, monkeypatch):
    """One device call runs the whole benchmark: a writer that cannot run there (say, /dev/shm too small for a child
    writer) costs its own setting, not the harvest's other numbers."""
    import json
    import sys

    from actstore.errors import StoreWriteError
    from actstore.process_writer import ProcessWriter

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import bench_harvest

    def no_room(self, *args, **kwargs):
        raise StoreWriteError("the writer process needs more shared memory (test)")

    monkeypatch.setattr(ProcessWriter, "submit_block", no_room)
    out = tmp_path / "h.json"
    monkeypatch.setattr(sys, "argv", ["bench_harvest.py", "--quick", "--dir", str(tmp_path), "--writer",
                                      "threads,process", "--out", str(out)])
    bench_harvest.main()
    report = json.loads(out.read_text())
    assert "needs more shared memory" in report["sweep"]["4-syncfs-process"]["error"]
    assert report["images_per_s"]["harvest"] == report["sweep"]["4-syncfs-threads"]["images_per_s"] > 0
    assert report["ratios"]["best_setting"] == "4-syncfs-threads" and report["partial"] is False
    launches = report["launches_per_s"]
    assert launches["beside_writer"] > 0 and "needs more shared memory" in launches["beside_process_writer_error"]
