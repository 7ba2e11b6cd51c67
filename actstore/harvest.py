"""The harvester engine: run images (and their prompts) through the frozen model and stream the residual stream at
image-token and text-token positions, for every selected layer, into a store.

Layer convention: state 0 is the input of the first decoder block (the embedding output, after any embedding
scaling the model applies, e.g. Gemma's sqrt(d_model)); state i is the output of the i-th block (blocks.{i-1} in
0-based, TransformerLens naming). States are captured with forward hooks on the decoder blocks, which gather only the
image and text positions on the device. This equals transformers' ``output_hidden_states`` for states 0..L-1 bit
for bit; for state L transformers returns the output of the final norm instead, while we store the residual itself
(what residual-stream SAEs such as Gemma Scope read).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch

from actstore.devices import to_device
from actstore.models import VLMBatch
from actstore.process_writer import ProcessWriter
from actstore.writer import StoreWriter, TextTokens

# Which text tokens a harvest stores, recorded in the store's provenance: a resume must not mix two rules in one store
# (earlier harvests stored whole prompts while their block had room and failed otherwise).
TEXT_TOKEN_RULE = "the first text_tokens_per_image tokens of each prompt"


@dataclass
class HarvestStats:
    """What a harvest did and where its time went."""

    images: int = 0
    text_tokens: int = 0
    blocks: int = 0
    bytes_logical: int = 0
    bytes_stored: int = 0  # the activation chunks' encoded bytes, once the writer has finished
    seconds_forward: float = 0.0
    seconds_copy: float = 0.0
    seconds_write_wait: float = 0.0
    seconds_total: float = 0.0
    prompts_cut: int = 0  # prompts longer than the store's text tokens per image: only their first ones are stored
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._unread: list[tuple[str, Any, Any]] = []  # (field, start event, end event) of GPU stages

    @staticmethod
    def clock(device: torch.device) -> Any:
        """A time mark: host seconds on a CPU; on a GPU a recorded CUDA event, since the work there runs
        asynchronously and the host's clock would only time launching it."""
        if device.type != "cuda":
            return time.perf_counter()
        # blocking: a thread that waits for the mark sleeps instead of spinning. The writer's threads wait for each
        # block's last copy mark, up to a whole forward pass each; spinning, they would take cores from the encoders
        # and from the thread that launches the GPU's work.
        mark = torch.cuda.Event(enable_timing=True, blocking=True)
        mark.record(torch.cuda.current_stream(device))
        return mark

    def charge(self, name: str, begun: Any, ended: Any) -> None:
        """Add the time between two marks to the field ``name`` (GPU times once their events have completed)."""
        if isinstance(begun, float):
            setattr(self, name, getattr(self, name) + ended - begun)
        else:
            self._unread.append((name, begun, ended))

    def settle(self, wait: bool = False) -> None:
        """Add the GPU stage times whose events have completed; with ``wait``, wait for all of them."""
        unread = []
        for name, begun, ended in self._unread:
            if wait or ended.query():
                ended.synchronize()
                setattr(self, name, getattr(self, name) + begun.elapsed_time(ended) / 1e3)
            else:
                unread.append((name, begun, ended))
        self._unread = unread

    def summary(self) -> str:
        """One paragraph for the end of a job."""
        total = max(self.seconds_total, 1e-9)
        return (
            f"{self.images} images, {self.text_tokens} text tokens, {self.blocks} blocks, "
            f"{self.bytes_logical / 1e9:.3f} GB logical ({self.bytes_stored / 1e9:.3f} GB on disk) in {total:.1f} s "
            f"({self.images / total:.1f} images/s, "
            f"{self.bytes_logical / total / 1e9:.3f} GB/s); forward {self.seconds_forward:.1f} s, copy to host "
            f"{self.seconds_copy:.1f} s, waiting for the writer {self.seconds_write_wait:.1f} s; "
            f"{len(self.skipped)} image(s) skipped, {self.prompts_cut} prompt(s) cut to the store's text tokens per "
            "image"
        )


def decoder_blocks(lm: torch.nn.Module) -> Any:
    """The list of decoder blocks of a causal LM (``layers`` in Llama/Gemma/Mistral, ``h`` in GPT-2)."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
    for name in ("layers", "h"):
        if hasattr(decoder, name):
            return getattr(decoder, name)
    raise ValueError(f"cannot find the decoder blocks of {type(lm).__name__}")


def n_states(lm: torch.nn.Module) -> int:
    """Number of residual states: blocks + 1."""
    return len(decoder_blocks(lm)) + 1


class StatesCaptured(Exception):
    """Raised by the hook of the last requested state, so that the forward pass stops there: the blocks after it
    compute nothing that a harvest stores (a harvest of states 0-12 of a 26-block LM runs half its blocks)."""


@contextmanager
def capture_states(
    lm: torch.nn.Module, states: Sequence[int], image_positions: torch.Tensor, text_index: tuple[torch.Tensor, ...]
) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Hooks that store, per requested state, (image rows (B, T, d), text rows (m, d)) gathered on the device; the
    hook of the last state raises :class:`StatesCaptured` when blocks follow it."""
    blocks = decoder_blocks(lm)
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rows, cols = text_index
    batch = torch.arange(image_positions.shape[0], device=image_positions.device)[:, None]
    last = max(states)

    def keep(state: int, hidden: torch.Tensor) -> None:
        got[state] = (hidden[batch, image_positions], hidden[rows, cols])
        if state == last < len(blocks):
            raise StatesCaptured

    handles = []
    if 0 in states:
        def pre_hook(module, args, kwargs):  # noqa: ANN001 - torch hook signature
            keep(0, args[0] if args else kwargs["hidden_states"])
        handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
    for i, block in enumerate(blocks):
        if i + 1 in states:
            def hook(module, args, output, state=i + 1):  # noqa: ANN001
                keep(state, output[0] if isinstance(output, tuple) else output)
            handles.append(block.register_forward_hook(hook))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def forward_states(vlm: Any, batch: VLMBatch, states: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals of ``states`` at the batch's image positions (S, B, T, d) and text positions (S, m, d)."""
    device = batch.image_positions.device
    text_index = tuple(to_device(t, device) for t in batch.host_text_index())  # no device sync
    with torch.inference_mode(), capture_states(vlm.lm, states, batch.image_positions, text_index) as got:
        try:
            vlm.run_decoder(batch)
        except StatesCaptured:
            pass
    missing = [s for s in states if s not in got]
    if missing:
        raise RuntimeError(f"states {missing} were not produced by the forward pass")
    return torch.stack([got[s][0] for s in states]), torch.stack([got[s][1] for s in states])


def wait_for_event(event: Any, device: torch.device) -> None:
    """Wait for a CUDA ``event`` recorded on ``device``, from any thread. The thread makes that device current first:
    CUDA's current device is per thread, and a thread that never chose one opens a context on GPU 0 at its first CUDA
    call, so every rank of a multi-GPU harvest would take memory on GPU 0 for its writer's waits."""
    with torch.cuda.device(device):
        event.synchronize()


_HELD = object()  # a ring entry's "future" while its block is still being filled, before the writer has it


class HostRing:
    """A few block-sized host buffers (pinned when the model is on a GPU) that device-to-host copies land in without
    blocking the next forward; a buffer is reused only once the writer has finished the block it held. ``allocate``
    (image shape, text shape, dtype) gives a buffer pair, or None to fall back to this ring's own."""

    def __init__(self, slots: int, pin: bool,
                 allocate: Callable[[tuple[int, ...], tuple[int, ...], torch.dtype], Any] | None = None) -> None:
        self.entries: list[dict[str, Any] | None] = [None] * max(1, slots)
        self.pin = pin
        self.allocate = allocate
        self.turn = 0

    def reserve(self, slots: int) -> None:
        """Hold at least ``slots`` buffers (as many as blocks can be open at once, plus those the writer holds)."""
        self.entries += [None] * (slots - len(self.entries))

    def acquire(self, image_shape: tuple[int, ...], text_shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Any]:
        """The next buffer pair, waiting for the writer if it still reads that slot's last block."""
        slot = self.turn % len(self.entries)
        self.turn += 1
        entry = self.entries[slot]
        if entry is not None and entry["future"] is _HELD:
            raise RuntimeError(f"all {len(self.entries)} host buffers hold blocks that are still being filled; "
                               "reserve more slots than blocks a micro-batch spans")
        if entry is not None and entry["future"] is not None:
            entry["future"].result()
        if entry is None or entry["image"].shape != image_shape or entry["text"].shape != text_shape \
                or entry["image"].dtype != dtype:
            buffers = self.allocate(image_shape, text_shape, dtype) if self.allocate is not None else None
            image, text = buffers or (torch.empty(image_shape, dtype=dtype, pin_memory=self.pin),
                                      torch.empty(text_shape, dtype=dtype, pin_memory=self.pin))
            entry = {"image": image, "text": text, "future": None}
            self.entries[slot] = entry
        entry["future"] = _HELD
        return entry


def host_ring(writer: Any, slots: int, pin: bool) -> HostRing:
    """A HostRing for ``writer``: for a ProcessWriter, its buffers in the writer's shared memory, which its child
    reads in place (a block is then not copied once more on its way to the disk); else in this process's memory."""
    allocate = partial(writer.host_buffers, pin=pin) if isinstance(writer, ProcessWriter) else None
    return HostRing(slots, pin, allocate)


def copy_to_host(destination: torch.Tensor, source: torch.Tensor) -> None:
    """Queue the copy of ``source`` (states, rows, ...) into the host buffer region ``destination``.

    A device-to-host copy whose source or destination is strided goes through a pageable temporary: it waits for the
    device and runs at pageable speed (1.3 GB/s against 55 GB/s pinned on the H100 host), so the harvester could not
    prepare its next micro-batch meanwhile. A region of a block's buffer is strided whenever it holds fewer rows than
    the buffer, so such regions are copied state by state, each a contiguous run of rows."""
    if destination.shape != source.shape:
        raise ValueError(f"cannot copy {tuple(source.shape)} into {tuple(destination.shape)}")
    pairs = [(destination, source)] if destination.is_contiguous() and source.is_contiguous() \
        else list(zip(destination, source))
    for dst, src in pairs:
        if not (dst.is_contiguous() and src.is_contiguous()):
            raise ValueError("copy_to_host copies runs of whole rows: the rows of one state must be contiguous")
        dst.copy_(src, non_blocking=True)


@dataclass
class BlockJob:
    """One block of a harvest: its index, its images (dicts with ``image_id`` and ``image``, and where a loader
    preprocessed them, ``model_inputs``: the model's inputs of the image and its prompt, on the host), their prompts
    and the inputs skipped.
    ``write=False`` runs the block's images without storing them: a resumed harvest runs a block that is already
    stored when its images share micro-batches with a missing block, so that the missing block's batches, and with
    them its values, are those of an uninterrupted run."""

    block: int
    examples: Sequence[dict[str, Any]]
    prompts: Sequence[str]
    skipped: Sequence[dict[str, str]] = ()
    write: bool = True


class _FillingBlock:
    """A block whose host buffers micro-batches are filling; the text coordinates gathered so far."""

    def __init__(self, buffers: dict[str, Any]) -> None:
        self.buffers = buffers
        self.text_tokens = 0
        self.text_image: list[torch.Tensor] = []
        self.text_position: list[torch.Tensor] = []
        self.text_ids: list[torch.Tensor] = []


def _runs(owners: Sequence[int]) -> list[tuple[int, int, int]]:
    """(owner, first, end) of each run of equal consecutive owners."""
    runs: list[tuple[int, int, int]] = []
    for row, owner in enumerate(owners):
        if runs and runs[-1][0] == owner:
            runs[-1] = (owner, runs[-1][1], row + 1)
        else:
            runs.append((owner, row, row + 1))
    return runs


def block_groups(n_blocks: int, block_images: int, batch_size: int) -> list[range]:
    """The blocks that share micro-batches: aligned runs of ceil(batch_size / block_images) blocks.

    A harvest runs each group whole (see :class:`BlockJob`'s ``write``) and hands groups, not blocks, to ranks: a
    block's micro-batches, and so its values to the last bit, never depend on which blocks a rerun finds missing or
    on how many processes share the harvest (a GEMM's reduction order may change with its batch's shape)."""
    size = max(1, -(-batch_size // block_images))
    return [range(first, min(first + size, n_blocks)) for first in range(0, n_blocks, size)]


def model_batch(vlm: Any, examples: Sequence[dict[str, Any]], prompts: Sequence[str]) -> Any:
    """The model's batch of ``examples`` with ``prompts``: from their ``model_inputs`` (the model's ``host_inputs``,
    prepared ahead) where every example carries them, else from their images."""
    if examples and all("model_inputs" in e for e in examples):
        return vlm.batch_from_host([e["model_inputs"] for e in examples], prompts)
    return vlm.prepare([e["image"] for e in examples], prompts)


def harvest_blocks(
    vlm: Any, writer: StoreWriter, jobs: Sequence[BlockJob], states: Sequence[int], batch_size: int,
    stats: HarvestStats, ring: HostRing | None = None,
) -> list[Any]:
    """Run consecutive blocks' images through the model in micro-batches of ``batch_size`` and hand each block to the
    writer as soon as its last image is copied to the host; returns the writer's futures of the blocks written.

    Micro-batches run across block boundaries, so blocks smaller than an efficient batch do not make the forward
    launch-bound (on the H100 host a Gemma-2-2B-size forward took 5.7 ms per image in micro-batches of 16 against
    4.9 ms in 64). ``stats`` gets the forward and copy times (device time on a GPU: call ``stats.settle(wait=True)``
    at the end) and the time spent waiting for the writer (for a free host buffer, or to queue a block)."""
    schema = writer.schema
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[schema.dtype]
    device = vlm.device
    items = [(j, i) for j, job in enumerate(jobs) for i in range(len(job.examples))]
    batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    ring = ring if ring is not None else HostRing(1, pin=False)
    ring.reserve(max((len({j for j, _ in part}) for part in batches), default=1))
    filling: dict[int, _FillingBlock] = {}
    # A block whose every input was skipped (a corrupt shard, a run of failed downloads) has no image in any
    # micro-batch: it is stored now, empty, with its skipped inputs, so that the harvest goes on and a rerun finds it
    # done.
    futures = [_submit_empty(writer, job, dtype, stats) for job in jobs if job.write and not job.examples]
    for part in batches:
        t0 = stats.clock(device)
        batch = model_batch(vlm, [jobs[j].examples[i] for j, i in part], [jobs[j].prompts[i] for j, i in part])
        if schema.text_tokens_per_image:
            # A long caption must neither fail the harvest hours in nor take other images' text slots.
            cut = (batch.host_text_mask.sum(1) > schema.text_tokens_per_image).tolist()
            stats.prompts_cut += sum(c for c, (j, _) in zip(cut, part) if jobs[j].write)
            batch = batch.first_text_tokens(schema.text_tokens_per_image)
        img, txt = forward_states(vlm, batch, states)
        img, txt = img.to(dtype), txt.to(dtype)
        t1 = stats.clock(device)
        # From the batch's CPU copies: nothing in this loop waits for the device, so the next micro-batch is prepared
        # while the device still runs this one.
        rows, cols = batch.host_text_index()  # row-major: each run of batch rows owns a run of text tokens
        token_ids = batch.host_input_ids[rows, cols]
        done = []
        for j, first, end in _runs([j for j, _ in part]):
            job = jobs[j]
            if not job.write:
                continue
            if j not in filling:
                t_wait = time.perf_counter()
                filling[j] = _FillingBlock(ring.acquire(
                    (len(states), schema.block_images, schema.image_tokens, schema.d_model),
                    (len(states), schema.text_slots_per_block, schema.d_model), dtype))
                stats.seconds_write_wait += time.perf_counter() - t_wait
            block, offset = filling[j], part[first][1]  # offset: the run's first image within its block
            copy_to_host(block.buffers["image"][:, offset : offset + end - first], img[:, first:end])
            if schema.text_tokens_per_image:  # else a store of image tokens only
                t_first, t_end = (int(torch.searchsorted(rows, r)) for r in (first, end))
                m, k = block.text_tokens, t_end - t_first
                copy_to_host(block.buffers["text"][:, m : m + k], txt[:, t_first:t_end])
                block.text_tokens += k
                block.text_image.append(rows[t_first:t_end] - first + offset)
                block.text_position.append(cols[t_first:t_end])
                block.text_ids.append(token_ids[t_first:t_end])
            if offset + end - first == len(job.examples):
                done.append(j)
        copied = stats.clock(device)
        stats.charge("seconds_forward", t0, t1)
        stats.charge("seconds_copy", t1, copied)
        stats.settle()
        for j in done:
            futures.append(_submit(writer, jobs[j], filling.pop(j), copied, device, stats))
    return futures


def _submit_empty(writer: StoreWriter, job: BlockJob, dtype: torch.dtype, stats: HarvestStats) -> Any:
    """Hand the writer a block of no images (all of them skipped)."""
    s = writer.schema
    empty = torch.zeros((len(s.layers), 0, s.image_tokens, s.d_model), dtype=dtype)
    none = torch.zeros(0, dtype=torch.int64)
    text = TextTokens(torch.zeros((len(s.layers), 0, s.d_model), dtype=dtype), none, none, none) \
        if s.text_tokens_per_image else None
    stats.blocks += 1
    return writer.submit_block(job.block, empty, [], [], text, job.skipped)


def _submit(writer: StoreWriter, job: BlockJob, block: _FillingBlock, copied: Any, device: torch.device,
            stats: HarvestStats) -> Any:
    """Hand a filled block to the writer; on a GPU the writer's thread waits for the copies' end mark (a CUDA event),
    and this thread goes on at once."""
    ready = partial(wait_for_event, copied, device) if device.type == "cuda" else None
    n, m = len(job.examples), block.text_tokens
    image_resid = block.buffers["image"][:, :n]
    text = TextTokens(block.buffers["text"][:, :m], torch.cat(block.text_image), torch.cat(block.text_position),
                      torch.cat(block.text_ids)) if writer.schema.text_tokens_per_image else None
    t_wait = time.perf_counter()
    future = writer.submit_block(job.block, image_resid, [e["image_id"] for e in job.examples], list(job.prompts),
                                 text, job.skipped, ready=ready)
    # The host buffer is free again once the writer has its data: with a ProcessWriter, when the data is copied out.
    block.buffers["future"] = getattr(future, "released", future)
    stats.seconds_write_wait += time.perf_counter() - t_wait  # submit blocks only when too many blocks are in flight
    stats.images += n
    stats.text_tokens += m
    stats.blocks += 1
    stats.bytes_logical += sum(t.numel() * t.element_size() for t in (image_resid, block.buffers["text"][:, :m]))
    return future
