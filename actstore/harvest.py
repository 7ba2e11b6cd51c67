"""The harvester engine: run images (and their prompts) through the frozen model and stream the residual stream at
image-token and text-token positions, for every selected layer, into a store.

Layer convention: state 0 is the input of the first decoder block (the embedding output, after any embedding
scaling the model applies, e.g. Gemma's sqrt(d_model)); state i is the output of the i-th block (blocks.{i-1} in 0-based, TransformerLens naming). States are captured with
forward hooks on the decoder blocks, which gather only the image and text positions on the device. This equals
transformers' ``output_hidden_states`` for states 0..L-1 bit for bit; for state L transformers returns the output of
the final norm instead, while we store the residual itself (what residual-stream SAEs such as Gemma Scope read).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, Sequence

import torch

from actstore.devices import to_device
from actstore.models import VLMBatch
from actstore.writer import StoreWriter, TextTokens


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
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._unread: list[tuple[str, Any, Any]] = []  # (field, start event, end event) of GPU stages

    @staticmethod
    def clock(device: torch.device) -> Any:
        """A time mark: host seconds on a CPU; on a GPU a recorded CUDA event, since the work there runs
        asynchronously and the host's clock would only time launching it."""
        if device.type != "cuda":
            return time.perf_counter()
        mark = torch.cuda.Event(enable_timing=True)
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
            f"{len(self.skipped)} image(s) skipped"
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


@contextmanager
def capture_states(
    lm: torch.nn.Module, states: Sequence[int], image_positions: torch.Tensor, text_index: tuple[torch.Tensor, ...]
) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Hooks that store, per requested state, (image rows (B, T, d), text rows (m, d)) gathered on the device."""
    blocks = decoder_blocks(lm)
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rows, cols = text_index
    batch = torch.arange(image_positions.shape[0], device=image_positions.device)[:, None]

    def keep(state: int, hidden: torch.Tensor) -> None:
        got[state] = (hidden[batch, image_positions], hidden[rows, cols])

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
        vlm.run_decoder(batch)
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


class HostRing:
    """A few block-sized host buffers (pinned when the model is on a GPU) that device-to-host copies land in without
    blocking the next forward; a buffer is reused only once the writer has finished the block it held."""

    def __init__(self, slots: int, pin: bool) -> None:
        self.entries: list[dict[str, Any] | None] = [None] * max(1, slots)
        self.pin = pin
        self.turn = 0

    def acquire(self, image_shape: tuple[int, ...], text_shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Any]:
        """The next buffer pair, waiting for the writer if it still reads that slot's last block."""
        slot = self.turn % len(self.entries)
        self.turn += 1
        entry = self.entries[slot]
        if entry is not None and entry["future"] is not None:
            entry["future"].result()
        if entry is None or entry["image"].shape != image_shape or entry["text"].shape != text_shape \
                or entry["image"].dtype != dtype:
            entry = {"image": torch.empty(image_shape, dtype=dtype, pin_memory=self.pin),
                     "text": torch.empty(text_shape, dtype=dtype, pin_memory=self.pin), "future": None}
            self.entries[slot] = entry
        entry["future"] = None
        return entry


def harvest_block(
    vlm: Any, writer: StoreWriter, block: int, examples: Sequence[dict[str, Any]], prompts: Sequence[str],
    states: Sequence[int], batch_size: int, stats: HarvestStats, skipped: Sequence[dict[str, str]] = (),
    ring: HostRing | None = None,
) -> Any:
    """Run one block's images through the model and hand its activations to the writer (returns its future).

    ``stats`` gets the forward and copy times (device time on a GPU: call ``stats.settle(wait=True)`` at the end)
    and the time spent waiting for the writer (for a free host buffer, or to queue the block)."""
    schema = writer.schema
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[schema.dtype]
    ring = ring if ring is not None else HostRing(1, pin=False)
    device = vlm.device
    n = len(examples)
    t_wait = time.perf_counter()
    buffers = ring.acquire((len(states), schema.block_images, schema.image_tokens, schema.d_model),
                           (len(states), schema.text_slots_per_block, schema.d_model), dtype)
    stats.seconds_write_wait += time.perf_counter() - t_wait
    text_image, text_pos, text_ids, m = [], [], [], 0
    copied = None  # the mark after the block's last device-to-host copy
    for start in range(0, n, batch_size):
        part = examples[start : start + batch_size]
        t0 = stats.clock(device)
        batch = vlm.prepare([e["image"] for e in part], prompts[start : start + batch_size])
        img, txt = forward_states(vlm, batch, states)
        t1 = stats.clock(device)
        if m + txt.shape[1] > buffers["text"].shape[1]:
            raise ValueError(f"the prompts of block {block} have {m + txt.shape[1]} text tokens, more than the store's "
                             f"{schema.text_tokens_per_image} per image; raise harvest.text_tokens_per_image")
        # Asynchronous on a GPU (pinned buffers): the copies overlap the next micro-batch's forward.
        buffers["image"][:, start : start + len(part)].copy_(img.to(dtype), non_blocking=True)
        buffers["text"][:, m : m + txt.shape[1]].copy_(txt.to(dtype), non_blocking=True)
        m += txt.shape[1]
        # From the batch's CPU copies: nothing in this loop waits for the device, so the next micro-batch is prepared
        # while the device still runs this one.
        rows, cols = batch.host_text_index()
        text_image.append(rows + start)
        text_pos.append(cols)
        text_ids.append(batch.host_input_ids[rows, cols])
        copied = stats.clock(device)
        stats.charge("seconds_forward", t0, t1)
        stats.charge("seconds_copy", t1, copied)
    stats.settle()
    # On a GPU the writer waits for the copy's end mark (a CUDA event) on its own thread; this thread goes on to the next
    # block at once.
    ready = partial(wait_for_event, copied, device) if device.type == "cuda" else None
    image_resid = buffers["image"][:, :n]
    text = TextTokens(buffers["text"][:, :m], torch.cat(text_image), torch.cat(text_pos), torch.cat(text_ids))
    t2 = time.perf_counter()
    future = writer.submit_block(block, image_resid, [e["image_id"] for e in examples], list(prompts), text, skipped,
                                 ready=ready)
    buffers["future"] = future
    stats.seconds_write_wait += time.perf_counter() - t2  # submit blocks only when too many blocks are in flight
    stats.images += n
    stats.text_tokens += m
    stats.blocks += 1
    stats.bytes_logical += image_resid.numel() * image_resid.element_size() + text.resid.numel() * text.resid.element_size()
    return future
