"""Helper run as a separate process by the tests: writes the given blocks of a test store.

usage: writer_process.py STORE BLOCKS [HANG_KEY SENTINEL]
With HANG_KEY, the process stops for good in the middle of writing that key (its temporary file half written, or for
a completion marker, which zarr writes, zarr's temporary file written but not yet renamed), after creating SENTINEL,
so that the test can SIGKILL it there.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import actstore.sink as sink  # noqa: E402
from actstore.schema import BLOCK_STATUS  # noqa: E402
from actstore.writer import StoreWriter  # noqa: E402
from conftest import small_schema, write_blocks  # noqa: E402


def install_hang(hang_key: Path, sentinel: str) -> None:
    """Make this process stop for good halfway through writing ``hang_key``'s temporary file."""
    real_writev = os.writev

    def write_half_then_hang(fd: int, buffers) -> int:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        # the temporary file of HANG_KEY is ".<name>.<host>.<pid>.<random>.partial" beside it
        if str(target.parent).endswith(str(hang_key.parent)) and target.name.startswith(f".{hang_key.name}.") \
                and target.name.endswith(sink.PARTIAL_SUFFIX):
            data = b"".join(buffers)
            real_writev(fd, [data[: len(data) // 2]])
            Path(sentinel).touch()
            time.sleep(3600)
        return real_writev(fd, buffers)

    sink.os.writev = write_half_then_hang


def install_zarr_hang(key: str, sentinel: str) -> None:
    """Make this process stop for good inside zarr's atomic write of ``key``: zarr's temporary file is written, the
    rename onto ``key`` not yet done."""
    real_replace = Path.replace

    def hang_before_rename(self: Path, target) -> Path:
        if str(target).endswith(key) and self.name.endswith(".partial"):
            Path(sentinel).touch()
            time.sleep(3600)
        return real_replace(self, target)

    Path.replace = hang_before_rename


def kill_at_hang_point(proc, sentinel: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` once it has reached its hang point (``sentinel`` exists)."""
    import signal

    deadline = time.time() + timeout
    while not sentinel.exists():
        assert proc.poll() is None, "the process exited before reaching its hang point"
        assert time.time() < deadline, "the process never reached its hang point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def main() -> None:
    """Write blocks, optionally hanging mid-chunk."""
    store, blocks = sys.argv[1], [int(b) for b in sys.argv[2].split(",")]
    if len(sys.argv) > 3 and sys.argv[3].startswith(BLOCK_STATUS):
        install_zarr_hang(sys.argv[3], sys.argv[4])
    elif len(sys.argv) > 3:
        install_hang(Path(sys.argv[3]), sys.argv[4])
    with StoreWriter.open_or_create(store, small_schema(capacity=32), {"model": "test"}, threads=2) as writer:
        write_blocks(writer, blocks)


if __name__ == "__main__":
    main()
