"""Helper run as a separate process by the tests: opens or creates a test store with a given d_model, at a given time.

usage: create_process.py STORE D_MODEL START_TIME
Prints "created-or-opened" or the error's class name, so that processes started together race to create one store.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from actstore.errors import StoreError  # noqa: E402
from actstore.writer import StoreWriter  # noqa: E402
from conftest import small_schema  # noqa: E402


def main() -> None:
    """Wait for START_TIME, then open or create STORE and say how it went."""
    store, d_model, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    while time.time() < start:  # a busy wait: sleeping would wake the processes too far apart to race
        pass
    try:
        StoreWriter.open_or_create(store, small_schema(d_model=d_model), {"d_model": d_model}).close()
        print("created-or-opened", flush=True)
    except StoreError as exc:
        print(type(exc).__name__, flush=True)


if __name__ == "__main__":
    main()
