"""ProcessWriter: a StoreWriter in a child process, fed through shared memory.

A harvest's Python thread launches the GPU's work op by op, and torch releases the GIL around every op; a writer's
encode threads in the same process take it whenever they come back from compressing or writing, and the launching
thread then waits for them. On the H100 host one thread's launch rate beside a busy in-process writer was 0.18-0.33x
its rate alone, and the harvest's forward pass took 3-4x longer than alone (benchmarks/results/harvest-gpu-h100-*).

A harvest's host buffers can live in shared memory themselves (:meth:`ProcessWriter.host_buffers`, pinned for the
GPU's copies with cudaHostRegister): a block submitted from them goes to the child as a name and two counts, and the
child reads it in place. Other arrays are copied into a shared-memory slot first, on one feeder thread. Either way the
parent sends the block's coordinates down a pipe; the child writes it with an ordinary StoreWriter and answers with
its marker. Blocks complete exactly as they do in-process (a marker only once the block is durable), so resuming
after a crash of either process works as before. When the parent dies, the child finishes the blocks it holds and
exits.

Not the default: on the 2-core dev VM the forward pass beside the child runs faster than beside in-process threads
(3.5-4.2 against 4.7-5.2 s), but the pipeline is slower (29.4-33.6 against 37.0-38.5 images/s, without the copy:
benchmarks/results/writer-pipeline-cpu-2core-vm-in-place.json; 31.2-31.4 against 34.8-42.4 with it): on two cores
the child's encode threads get less of the CPU than threads that the forward pass waits for. ``bench_harvest.py
--writer threads,process`` measures both on a GPU host, whose cores the writer does not have to share.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import shutil
import threading
from concurrent.futures import Future
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Callable, Sequence

import numpy as np

from actstore.bfloat16 import to_numpy
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
        self._max_pending_blocks = max(1, max_pending_blocks)
        # Shared memory the child reads blocks from, by name: slots that blocks given as other arrays are copied into
        # (made at the first such block), and the host buffers handed out by host_buffers (read in place).
        self._slots: list[SharedMemory] = []
        self._slot_views: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._free: queue.Queue[str] = queue.Queue()
        self._shared: list[SharedMemory] = []
        self._shared_views: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._shared_bases: list[Any] = []  # their tensors, kept mapped until close unpins them
        self._pinned: list[int] = []  # addresses registered with CUDA
        self._futures: dict[int, tuple[Future, str | None]] = {}  # per block in flight: its future, its copy slot
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self._bytes_written = 0
        self._copied = 0
        self._timings: list[dict[str, float]] = []
        self._closed = False
        self._dead: StoreWriteError | None = None  # set once the child is gone
        context = multiprocessing.get_context("spawn")  # not fork: this process has CUDA and many threads
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=serve, name="actstore-writer", daemon=True,
            args=(writer.location, storage_options, threads, max_pending_blocks, child_conn))
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

    @property
    def copied_blocks(self) -> int:
        """How many blocks were copied into a slot (not submitted from :meth:`host_buffers`) so far."""
        with self._lock:
            return self._copied

    def missing_blocks(self, n_images: int | None = None) -> list[int]:
        """Blocks still to write to hold ``n_images`` images (default: the whole capacity)."""
        return self._writer.missing_blocks(n_images)

    def completed_blocks(self) -> list[int]:
        """Blocks whose completion marker exists."""
        return self._writer.completed_blocks()

    def block_images(self, block: int) -> range:
        """Global image indices that block ``block`` covers."""
        return self._writer.block_images(block)

    # ---- shared memory --------------------------------------------------------------------------------------
    def _new_segment(self, what: str) -> SharedMemory:
        size = self.schema.block_bytes()
        free = shared_memory_free()
        if free is not None and free < size:
            raise StoreWriteError(
                f"the writer process needs {size / 1e9:.2f} GB more shared memory for {what}; /dev/shm has "
                f"{free / 1e9:.2f} GB free (a block is {size / 1e9:.2f} GB, and up to max_pending_blocks + 1 blocks "
                "are in flight, or as many as the harvest's host buffers). Enlarge it (docker: --shm-size) or write "
                "from this process (harvest.writer: threads)")
        return SharedMemory(create=True, size=max(1, size))

    def host_buffers(self, image_shape: tuple[int, ...], text_shape: tuple[int, ...], dtype: Any,
                     pin: bool = False) -> tuple[Any, Any] | None:
        """A block's host buffers (image and text activations, as torch tensors of a block's full shape) in shared
        memory that the child writes from in place: a block submitted from them is not copied again. Pinned for
        asynchronous device-to-host copies when ``pin``. None where this cannot be had (shapes other than a block's,
        no /dev/shm file system or too little free there, a pinning that fails): the caller then allocates its own."""
        import torch

        s = self.schema
        if (tuple(image_shape) != (len(s.layers), s.block_images, s.image_tokens, s.d_model)
                or tuple(text_shape) != (len(s.layers), s.text_slots_per_block, s.d_model)
                or to_numpy(torch.empty(0, dtype=dtype)).dtype != s.numpy_dtype):
            return None
        try:
            shm = self._new_segment("a harvest's host buffer")
        except StoreWriteError:  # no room in /dev/shm: the caller's own buffers, and copy slots if they fit
            return None
        path = f"/dev/shm/{shm.name}"
        if not os.path.exists(path):  # POSIX shared memory elsewhere than Linux's /dev/shm
            shm.close()
            shm.unlink()
            return None
        # Mapped by torch itself (not a view of shm.buf), so that the segment's own mapping closes at once and the
        # tensors may outlive this writer without holding it open.
        base = torch.from_file(path, shared=True, size=shm.size, dtype=torch.uint8)
        shm.close()
        if pin:
            try:
                error = int(torch.cuda.cudart().cudaHostRegister(base.data_ptr(), base.numel(), 0))
            except Exception:  # noqa: BLE001 - no CUDA runtime to ask: the caller's own pinned buffers instead
                error = -1
            if error:
                shm.unlink()
                return None
            self._pinned.append(base.data_ptr())
        item = torch.empty(0, dtype=dtype).element_size()
        image_bytes, text_bytes = int(np.prod(image_shape)) * item, int(np.prod(text_shape)) * item
        image = base[:image_bytes].view(dtype).view(image_shape)  # the layout of slot_views, which the child reads
        text = base[image_bytes : image_bytes + text_bytes].view(dtype).view(text_shape)
        self._shared.append(shm)
        self._shared_bases.append(base)
        self._shared_views[shm.name] = (to_numpy(image), to_numpy(text))
        return image, text

    def _shared_segment(self, images: np.ndarray, text: tuple[np.ndarray, ...] | None) -> str | None:
        """The host_buffers segment that ``images`` (and the text activations) are the leading images of, if any."""
        for name, (image_view, text_view) in self._shared_views.items():
            if _same_view(images, image_view[:, : images.shape[1]]) and (
                    text is None or _same_view(text[0], text_view[:, : text[0].shape[1]])):
                return name
        return None

    def _copy_slot(self) -> str:
        """A free slot to copy a block into (waiting while every one holds a block in flight)."""
        with self._lock:
            if not self._slots:
                for _ in range(self._max_pending_blocks + 1):  # the blocks the child writes, and one being copied in
                    shm = self._new_segment(f"{self._max_pending_blocks + 1} blocks in flight")
                    self._slots.append(shm)
                    self._slot_views[shm.name] = slot_views(shm.buf, self.schema)
                    self._free.put(shm.name)
        return self._free.get()

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
        future's ``released`` future is done once the arrays may be reused: when they are copied out, or, for arrays
        of :meth:`host_buffers`, which the child reads in place, when the block is durable."""
        if self._closed:
            raise StoreWriteError(f"the writer of {self.location} is closed")
        images, text_arrays = self._writer.check_block(block, image_resid, image_ids, prompts, text)
        shared = self._shared_segment(images, text_arrays)
        slot = None if shared is not None else self._copy_slot()
        if self._dead is not None:
            if slot is not None:
                self._free.put(slot)
            raise self._dead
        future: Future = Future()
        future.released = future if shared is not None else Future()  # type: ignore[attr-defined]
        token = next(self._tokens)
        with self._lock:
            self._futures[token] = (future, slot)
        self._feed.put((token, shared or slot, shared is None, block, images, text_arrays, list(image_ids),
                        list(prompts or [""] * len(image_ids)), [dict(x) for x in skipped], ready, future))
        return future

    def _feed_blocks(self) -> None:
        while True:
            item = self._feed.get()
            if item is None:
                self._send(("close",))
                return
            token, segment, copy, block, images, text, ids, prompts, skipped, ready, future = item
            try:
                if ready is not None:
                    ready()
                n, m = images.shape[1], 0 if text is None else text[0].shape[1]
                if copy:
                    image_view, text_view = self._slot_views[segment]
                    np.copyto(_bits(image_view[:, :n]), _bits(images))
                    if text is not None:
                        np.copyto(_bits(text_view[:, :m]), _bits(text[0]))
                    with self._lock:
                        self._copied += 1
                    future.released.set_result(None)
                coords = None if text is None else tuple(np.asarray(c) for c in text[1:])
                if not self._send(("block", token, segment, block, n, m, ids, prompts, coords, skipped)):
                    self._finish(token, exc=self._dead or self._died())
            except BaseException as exc:  # noqa: BLE001 - handed to the block's future
                self._finish(token, exc=exc)

    def _send(self, message: tuple) -> bool:
        try:
            self._conn.send(message)
            return True
        except (OSError, ValueError):  # the child is gone
            return False

    def _finish(self, token: int, result: Any = None, exc: BaseException | None = None) -> None:
        with self._lock:
            future, slot = self._futures.pop(token, (None, None))
        if slot is not None:
            self._free.put(slot)
        if future is None:
            return
        if future.released is not future and not future.released.done():
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
                _, token, marker, written, timing = message
                with self._lock:
                    self._bytes_written = written
                    self._timings.append(timing)
                self._finish(token, result=marker)
            elif message[0] == "error":
                self._finish(message[1], exc=message[2])
            elif message[0] == "closed":
                with self._lock:
                    self._bytes_written = message[1]
                return
        self._dead = self._dead or self._died()
        with self._lock:
            tokens = list(self._futures)
        for token in tokens:
            self._finish(token, exc=self._dead)

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
            raise message[2] or self._died()

    def _died(self) -> StoreWriteError:
        self._process.join(timeout=5)
        return StoreWriteError(
            f"the writer process of {self.location} stopped (exit code {self._process.exitcode}); blocks it had not "
            "marked complete stay missing and a rerun writes them")

    def _free_shared_memory(self) -> None:
        if self._pinned:
            import torch

            torch.cuda.synchronize()  # no copy of an abandoned block may still land in a buffer being unpinned
            for address in self._pinned:
                torch.cuda.cudart().cudaHostUnregister(address)
            self._pinned.clear()
        self._shared_bases.clear()  # the caller's tensors keep their mapping; the names go below
        for shm in self._slots:
            shm.close()
        for shm in self._slots + self._shared:
            shm.unlink()
        self._slots, self._shared = [], []

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
        self._free_shared_memory()
        self._writer.close()
        if self._process.exitcode not in (0, None):
            raise self._died()

    def __enter__(self) -> "ProcessWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays are the same view of the same memory."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.shape == b.shape
            and a.strides == b.strides and a.dtype == b.dtype)


def serve(location: str, storage_options: dict[str, Any] | None, threads: int | None, max_pending_blocks: int,
          conn: Any) -> None:
    """The child: write each block the parent sends from its shared memory, answer with the block's marker or
    error."""
    try:
        writer = StoreWriter.open(location, threads=threads, max_pending_blocks=max_pending_blocks,
                                  storage_options=storage_options)
    except BaseException as exc:  # noqa: BLE001 - answered, the parent raises it
        conn.send(("error", None, _picklable(exc)))
        return
    attached: list[SharedMemory] = []
    views: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    lock = threading.Lock()
    conn.send(("ready",))

    def reply(message: tuple) -> None:
        with lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                pass

    def done(future: Future, token: int, block: int) -> None:
        exc = future.exception()
        if exc is not None:
            reply(("error", token, _picklable(exc)))
            return
        timing = next((t for t in reversed(writer.block_timings) if t["block"] == block), {})
        reply(("done", token, future.result(), writer.bytes_written, timing))

    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break  # the parent is gone: finish what is in flight, then stop
            if message[0] == "close":
                break
            _, token, segment, block, n, m, ids, prompts, coords, skipped = message
            try:
                if segment not in views:
                    # Attached, not created: a spawned child shares its parent's resource tracker, which unlinks the
                    # segments if both processes die without the parent's close.
                    attached.append(SharedMemory(name=segment))
                    views[segment] = slot_views(attached[-1].buf, writer.schema)
                image_view, text_view = views[segment]
                text = None if coords is None else TextTokens(text_view[:, :m], *coords)
                future = writer.submit_block(block, image_view[:, :n], ids, prompts, text, skipped)
            except BaseException as exc:  # noqa: BLE001 - answered, not raised
                reply(("error", token, _picklable(exc)))
                continue
            future.add_done_callback(lambda f, token=token, block=block: done(f, token, block))
    finally:
        writer.close()
        reply(("closed", writer.bytes_written))
        conn.close()
        views.clear()
        for shm in attached:
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
