"""ProcessWriter: a StoreWriter in a child process, fed through shared memory.

A harvest's Python thread launches the GPU's work op by op, and torch releases the GIL around every op; a writer's
encode threads in the same process take it whenever they come back from compressing or writing, and the launching
thread then waits for them. On the H100 host one thread's launch rate beside a busy in-process writer was 0.18-0.33x
its rate alone, and the harvest's forward pass took 3-4x longer than alone (benchmarks/results/harvest-gpu-h100-*).

Here the parent only copies each block from its (pinned) host buffer into a shared-memory slot, on one feeder thread,
and sends the block's coordinates down a pipe; the child writes it with an ordinary StoreWriter and answers with its
marker. Blocks complete exactly as they do in-process (a marker only once the block is durable), so resuming after a
crash of either process works as before. When the parent dies, the child finishes the blocks it holds and exits.

Not the default: on the 2-core dev VM (benchmarks/results/writer-pipeline-cpu-2core-vm-writers.json) the forward pass
beside the child ran 3.3-3.9 s against 3.9-4.3 s beside in-process threads (2.8 s alone), but the extra copy of every
block cost more than that on two cores (23.4-23.7 against 26.4-29.4 images/s). ``bench_harvest.py --writer
threads,process`` measures both on a GPU host.
"""

from __future__ import annotations

import multiprocessing
import queue
import shutil
import threading
from concurrent.futures import Future
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Callable, Sequence

import numpy as np

from actstore.errors import StoreWriteError
from actstore.schema import StoreSchema
from actstore.writer import DEFAULT_PENDING_BLOCKS, StoreWriter, TextTokens


def slot_views(buffer: Any, schema: StoreSchema) -> tuple[np.ndarray, np.ndarray]:
    """The image and text regions of one slot's shared memory (``schema.block_bytes()``) as arrays of the store's
    dtype."""
    L, dtype = len(schema.layers), schema.numpy_dtype
    images = np.ndarray((L, schema.block_images, schema.image_tokens, schema.d_model), dtype=dtype, buffer=buffer)
    text = (L, schema.text_slots_per_block, schema.d_model)
    return images, np.ndarray(text, dtype=dtype, buffer=buffer, offset=images.nbytes)


def shared_memory_free(path: str = "/dev/shm") -> int | None:
    """Free bytes of the shared-memory file system, or None where there is none to ask."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _bits(array: np.ndarray) -> np.ndarray:
    """The array as unsigned integers of its item size: a plain copy that releases the GIL whatever the dtype."""
    return array.view(np.dtype(f"u{array.dtype.itemsize}"))


class ProcessWriter:
    """Writes blocks of a store from a child process (see the module's docstring); the same calls as a StoreWriter's
    that a harvest makes. ``writer`` is this process's StoreWriter of the store (already created or opened and checked),
    used for the schema, validation and progress; the child opens the store itself."""

    def __init__(self, writer: StoreWriter, threads: int | None = None,
                 max_pending_blocks: int = DEFAULT_PENDING_BLOCKS,
                 storage_options: dict[str, Any] | None = None) -> None:
        self._writer = writer
        size = writer.schema.block_bytes()
        slots = max(1, max_pending_blocks) + 1  # the blocks the child writes, and one being copied in
        free = shared_memory_free()
        if free is not None and free < slots * size:
            raise StoreWriteError(
                f"the writer process needs {slots * size / 1e9:.2f} GB of shared memory ({slots} blocks of "
                f"{size / 1e9:.2f} GB); /dev/shm has {free / 1e9:.2f} GB free. Enlarge it (docker: --shm-size) or "
                "write from this process (harvest.writer: threads)")
        self._slots = [SharedMemory(create=True, size=max(1, size)) for _ in range(slots)]
        self._views = [slot_views(shm.buf, writer.schema) for shm in self._slots]
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(slots):
            self._free.put(slot)
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._bytes_written = 0
        self._timings: list[dict[str, float]] = []
        self._closed = False
        self._dead: StoreWriteError | None = None  # set once the child is gone
        context = multiprocessing.get_context("spawn")  # not fork: this process has CUDA and many threads
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=serve, name="actstore-writer", daemon=True,
            args=(writer.location, storage_options, threads, max_pending_blocks, [s.name for s in self._slots],
                  child_conn))
        self._process.start()
        child_conn.close()
        self._await_ready()
        self._feed: queue.Queue = queue.Queue()
        self._feeder = threading.Thread(target=self._feed_blocks, name="actstore-feeder", daemon=True)
        self._receiver = threading.Thread(target=self._receive, name="actstore-receiver", daemon=True)
        self._feeder.start()
        self._receiver.start()

    # ---- what a harvest reads ------------------------------------------------------------------------------
    @property
    def schema(self) -> StoreSchema:
        """The store's schema."""
        return self._writer.schema

    @property
    def location(self) -> str:
        """Where the store is."""
        return self._writer.location

    @property
    def bytes_written(self) -> int:
        """Encoded bytes of the activation chunks written so far (by the child)."""
        with self._lock:
            return self._bytes_written

    @property
    def block_timings(self) -> list[dict[str, float]]:
        """Seconds each written block spent per commit step in the child (see ``StoreWriter.block_timings``)."""
        with self._lock:
            return list(self._timings)

    def missing_blocks(self, n_images: int | None = None) -> list[int]:
        """Blocks still to write to hold ``n_images`` images (default: the whole capacity)."""
        return self._writer.missing_blocks(n_images)

    def completed_blocks(self) -> list[int]:
        """Blocks whose completion marker exists."""
        return self._writer.completed_blocks()

    def block_images(self, block: int) -> range:
        """Global image indices that block ``block`` covers."""
        return self._writer.block_images(block)

    # ---- writing --------------------------------------------------------------------------------------------
    def write_block(self, block: int, image_resid: Any, image_ids: Sequence[str], prompts: Sequence[str] | None = None,
                    text: TextTokens | None = None, skipped: Sequence[dict[str, str]] = ()) -> dict[str, Any]:
        """Write one block and wait until it is durable and marked complete; returns its marker."""
        return self.submit_block(block, image_resid, image_ids, prompts, text, skipped).result()

    def submit_block(
        self, block: int, image_resid: Any, image_ids: Sequence[str], prompts: Sequence[str] | None = None,
        text: TextTokens | None = None, skipped: Sequence[dict[str, str]] = (),
        ready: Callable[[], object] | None = None,
    ) -> Future:
        """As ``StoreWriter.submit_block``: validate now, write in the background, wait when every slot is taken. The
        future's ``released`` future is done once the arrays have been copied out (they may then be reused), before
        the block is durable."""
        if self._closed:
            raise StoreWriteError(f"the writer of {self.location} is closed")
        images, text_arrays = self._writer.check_block(block, image_resid, image_ids, prompts, text)
        slot = self._free.get()
        if self._dead is not None:
            self._free.put(slot)
            raise self._dead
        future: Future = Future()
        future.released = Future()  # type: ignore[attr-defined]
        with self._lock:
            self._futures[slot] = future
        self._feed.put((slot, block, images, text_arrays, list(image_ids), list(prompts or [""] * len(image_ids)),
                        [dict(x) for x in skipped], ready, future))
        return future

    def _feed_blocks(self) -> None:
        while True:
            item = self._feed.get()
            if item is None:
                self._send(("close",))
                return
            slot, block, images, text, ids, prompts, skipped, ready, future = item
            try:
                if ready is not None:
                    ready()
                image_view, text_view = self._views[slot]
                n = images.shape[1]
                np.copyto(_bits(image_view[:, :n]), _bits(images))
                m, coords = 0, None
                if text is not None:
                    m = text[0].shape[1]
                    np.copyto(_bits(text_view[:, :m]), _bits(text[0]))
                    coords = tuple(np.asarray(c) for c in text[1:])
                future.released.set_result(None)
                if not self._send(("block", slot, block, n, m, ids, prompts, coords, skipped)):
                    self._finish(slot, exc=self._dead or self._died())
            except BaseException as exc:  # noqa: BLE001 - handed to the block's future
                self._finish(slot, exc=exc)

    def _send(self, message: tuple) -> bool:
        try:
            self._conn.send(message)
            return True
        except (OSError, ValueError):  # the child is gone
            return False

    def _finish(self, slot: int, result: Any = None, exc: BaseException | None = None) -> None:
        with self._lock:
            future = self._futures.pop(slot, None)
        self._free.put(slot)
        if future is None:
            return
        if not future.released.done():
            future.released.set_result(None)
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def _receive(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # noqa: BLE001 - an answer that does not unpickle: stop, failing what is pending
                self._dead = StoreWriteError(f"cannot read the writer process's answer for {self.location}: {exc}")
                break
            if message[0] == "done":
                _, slot, marker, written, timing = message
                with self._lock:
                    self._bytes_written = written
                    self._timings.append(timing)
                self._finish(slot, result=marker)
            elif message[0] == "error":
                self._finish(message[1], exc=message[2])
            elif message[0] == "closed":
                with self._lock:
                    self._bytes_written = message[1]
                return
        self._dead = self._dead or self._died()
        with self._lock:
            slots = list(self._futures)
        for slot in slots:
            self._finish(slot, exc=self._dead)

    def _await_ready(self, timeout: float = 300.0) -> None:
        """Wait until the child has opened the store, so that a harvest's clock and its first block do not wait for
        the child's start, and a child that cannot open the store fails here."""
        try:
            ready = self._conn.poll(timeout)
            message = self._conn.recv() if ready else ("error", None, StoreWriteError(
                f"the writer process of {self.location} did not start within {timeout:.0f} s"))
        except (EOFError, OSError):
            message = ("error", None, None)
        except Exception as exc:  # noqa: BLE001 - an answer that does not unpickle
            message = ("error", None, StoreWriteError(f"the writer process of {self.location} failed to start: {exc}"))
        if message[0] != "ready":
            self._process.kill()
            for shm in self._slots:
                shm.close()
                shm.unlink()
            raise message[2] or self._died()

    def _died(self) -> StoreWriteError:
        self._process.join(timeout=5)
        return StoreWriteError(
            f"the writer process of {self.location} stopped (exit code {self._process.exitcode}); blocks it had not "
            "marked complete stay missing and a rerun writes them")

    def close(self) -> None:
        """Wait for the blocks in flight, stop the child and free the shared memory."""
        if self._closed:
            return
        self._closed = True
        self._feed.put(None)
        self._feeder.join()
        self._receiver.join()
        self._process.join()
        self._conn.close()
        for shm in self._slots:
            shm.close()
            shm.unlink()
        self._writer.close()
        if self._process.exitcode not in (0, None):
            raise self._died()

    def __enter__(self) -> "ProcessWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(location: str, storage_options: dict[str, Any] | None, threads: int | None, max_pending_blocks: int,
          slot_names: list[str], conn: Any) -> None:
    """The child: write each block the parent sends from its slot, answer with the block's marker or error."""
    try:
        writer = StoreWriter.open(location, threads=threads, max_pending_blocks=max_pending_blocks,
                                  storage_options=storage_options)
    except BaseException as exc:  # noqa: BLE001 - answered, the parent raises it
        conn.send(("error", None, _picklable(exc)))
        return
    # Attached, not created: a spawned child shares its parent's resource tracker, which unlinks the segments if
    # both processes die without the parent's close.
    slots = [SharedMemory(name=name) for name in slot_names]
    views = [slot_views(shm.buf, writer.schema) for shm in slots]
    lock = threading.Lock()
    conn.send(("ready",))

    def reply(message: tuple) -> None:
        with lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                pass

    def done(future: Future, slot: int, block: int) -> None:
        exc = future.exception()
        if exc is not None:
            reply(("error", slot, _picklable(exc)))
            return
        timing = next((t for t in reversed(writer.block_timings) if t["block"] == block), {})
        reply(("done", slot, future.result(), writer.bytes_written, timing))

    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break  # the parent is gone: finish what is in flight, then stop
            if message[0] == "close":
                break
            _, slot, block, n, m, ids, prompts, coords, skipped = message
            image_view, text_view = views[slot]
            text = None if coords is None else TextTokens(text_view[:, :m], *coords)
            try:
                future = writer.submit_block(block, image_view[:, :n], ids, prompts, text, skipped)
            except BaseException as exc:  # noqa: BLE001 - answered, not raised
                reply(("error", slot, _picklable(exc)))
                continue
            future.add_done_callback(lambda f, slot=slot, block=block: done(f, slot, block))
    finally:
        writer.close()
        reply(("closed", writer.bytes_written))
        conn.close()
        for shm in slots:
            shm.close()


WRITERS = ("threads", "process")  # where a store's chunks are encoded and written: this process, or a child


def writer_of_kind(writer: StoreWriter, kind: str, threads: int | None = None,
                   max_pending_blocks: int = DEFAULT_PENDING_BLOCKS) -> StoreWriter | ProcessWriter:
    """``writer`` itself ("threads"), or a ProcessWriter that writes its store from a child ("process")."""
    if kind not in WRITERS:
        raise ValueError(f"writer must be one of {WRITERS}, got {kind!r}")
    return writer if kind == "threads" else ProcessWriter(writer, threads, max_pending_blocks)


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` in a form that crosses a pipe: itself, the same error without its chained causes (which may not
    unpickle), or a StoreWriteError with its message."""
    import pickle

    for candidate in (exc, _unchained(exc)):
        try:
            if candidate is not None:
                pickle.loads(pickle.dumps(candidate))
                return candidate
        except Exception:  # noqa: BLE001 - any pickling failure: try the next form
            pass
    return StoreWriteError(f"{type(exc).__name__}: {exc}")


def _unchained(exc: BaseException) -> BaseException | None:
    """A new exception of ``exc``'s type and arguments, without cause, context or traceback."""
    try:
        return type(exc)(*exc.args)
    except Exception:  # noqa: BLE001 - a type that cannot be rebuilt from its args
        return None
