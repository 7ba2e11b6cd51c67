"""Helper run as a separate process: ``harvest_process.py CONFIG STORE HANG_KEY SENTINEL`` harvests and stops for
good halfway through writing HANG_KEY, so that the test can SIGKILL it mid-run."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from writer_process import install_hang  # noqa: E402

from jobs.harvest import main  # noqa: E402

if __name__ == "__main__":
    install_hang(Path(sys.argv[3]), sys.argv[4])
    main(["--config", sys.argv[1], "--out", sys.argv[2]])
