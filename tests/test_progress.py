"""Progress of long jobs: a bar on a terminal, plain lines in a log file."""

from __future__ import annotations

import sys

import pytest

from actstore.progress import LineProgress, progress


def test_line_progress_writes_a_line_per_interval_and_one_at_the_end(monkeypatch):
    lines, now = [], [100.0]
    monkeypatch.setattr("actstore.progress.time.monotonic", lambda: now[0])
    bar = LineProgress(8, "harvest", "block", interval=60, write=lines.append)
    bar.update(2)
    assert lines == []  # not a minute yet
    now[0] += 61
    bar.set_postfix(img_s="35.2", GB_s="1.10")
    bar.update(2)
    assert lines == ["[harvest] 4/8 blocks (50%), img_s=35.2, GB_s=1.10, 0:01:01 elapsed, ~0:01:01 left"]
    now[0] += 30
    bar.update(4)
    bar.close()
    bar.close()
    assert lines[1:] == ["[harvest] 8/8 blocks (100%), img_s=35.2, GB_s=1.10, 0:01:31 elapsed"]
    done = LineProgress(2, "verify", "chunk", interval=0, write=lines.append)
    done.update(2)
    done.close()  # the update's line already said it all
    assert lines[2:] == ["[verify] 2/2 chunks (100%), 0:00:00 elapsed"]


def test_a_log_file_gets_lines_and_a_terminal_a_bar(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress(3, "verify", "chunk"), LineProgress)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert not isinstance(progress(3, "verify", "chunk"), LineProgress)
    assert progress(3, "verify", "chunk", enabled=False).disable


def test_verify_in_a_log_shows_progress_lines(tmp_path, monkeypatch, capsys):
    from jobs.cli import main as cli
    from actstore.integrity import verify
    from actstore.writer import StoreWriter
    from conftest import small_schema, write_blocks

    with StoreWriter.create(tmp_path / "s.zarr", small_schema()) as writer:
        write_blocks(writer, range(2))
    monkeypatch.setenv("ACTSTORE_PROGRESS_INTERVAL", "0")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert cli(["verify", str(tmp_path / "s.zarr")]) == 0
    err = capsys.readouterr().err.splitlines()
    total = verify(tmp_path / "s.zarr").chunks_checked  # the lines count what the report counts, coordinates included
    assert total > 24  # 4 blocks x 3 states x image and text chunks, and the coordinate chunks
    assert err[0].startswith(f"[verify] 1/{total} chunks ({100 // total}%)")
    assert err[-1].startswith(f"[verify] {total}/{total} chunks (100%)")


@pytest.mark.parametrize("terminal", [True, False])
def test_a_clusters_tasks_show_as_distributeds_bar_on_a_terminal_and_as_lines_in_a_log(terminal, monkeypatch, capsys):
    import dask
    from distributed import Client, LocalCluster

    from actstore.progress import wait_with_progress

    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal, raising=False)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        futures = client.compute([dask.delayed(sum)([i, 1]) for i in range(5)])
        wait_with_progress(futures, "stats")
        assert client.gather(futures) == [1, 2, 3, 4, 5]
    captured = capsys.readouterr()
    if terminal:
        assert "100% Completed" in captured.out and "[stats]" not in captured.err
    else:
        assert "[stats] 5/5 tasks (100%)" in captured.err and "Completed" not in captured.out


def test_a_resumed_job_counts_what_was_done_but_times_only_this_run(monkeypatch):
    from actstore.progress import counted

    lines, now = [], [0.0]
    monkeypatch.setattr("actstore.progress.time.monotonic", lambda: now[0])
    bar = LineProgress(10, "train-adapter", "step", interval=60, write=lines.append, initial=6)
    seen = []
    for step in counted(range(6, 10), bar):
        if step == 7:
            continue  # a skipped step still counts once its turn is over
        now[0] += 30
        seen.append(step)
    assert seen == [6, 8, 9]
    assert lines == ["[train-adapter] 9/10 steps (90%), 0:01:00 elapsed, ~0:00:20 left",  # 3 steps of this run in 60 s
                     "[train-adapter] 10/10 steps (100%), 0:01:30 elapsed"]
