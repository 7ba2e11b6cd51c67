"""Runnable jobs (demo, harvest, train-adapter, analyze) behind the ``actstore`` command."""

from jobs.launcher import exit_with_torchrun

# Tied on the package's import, which ``python -m jobs.harvest`` (torchrun's command) runs before the job module's
# own: its imports (torch, transformers) take seconds, and a torchrun killed meanwhile would leave the rank running,
# reparented where it can no longer tell that its launcher is gone.
exit_with_torchrun()
