"""The ``actstore`` command hands each job's options to the job's own parser."""

from __future__ import annotations

import pytest

from jobs.cli import main as cli


@pytest.mark.parametrize("job, option", [("harvest", "--n-images"), ("analyze", "--weight-dtype"),
                                         ("train-adapter", "--resume")])
def test_job_subcommands_parse_with_the_jobs_own_options(job, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli([job, "--help"])
    assert exit_.value.code == 0
    assert option in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli(["--help"])
    out = capsys.readouterr().out
    for command in ("info", "verify", "train-adapter", "harvest", "analyze", "report", "demo"):
        assert command in out


def test_a_job_with_a_missing_required_option_fails_by_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["harvest", "--out", "x.zarr"])
    assert exit_.value.code == 2
    assert "--config" in capsys.readouterr().err
