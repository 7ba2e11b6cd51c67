"""Runnable jobs (demo, and later harvest, train-adapter, analyze) behind the ``actstore`` command."""
