"""Harvest residual streams into a store.

    actstore harvest --config jobs/configs/demo.yaml --out STORE
    torchrun --nproc-per-node N -m jobs.harvest --config ... --out STORE

    srun --ntasks-per-node N python -m jobs.harvest --config ... --out STORE      # Slurm, one task per GPU

Blocks that share micro-batches form a group (``batch_size / block_images`` consecutive blocks); rank 0 creates the
store and tells the other ranks which blocks are missing, and the groups that miss one are dealt to the ranks in turn
(ranks that cannot rendezvous, started by RANK and WORLD_SIZE alone or as the tasks of an srun step without
MASTER_ADDR / MASTER_PORT, wait for the store and take the groups ``g`` with ``g % world_size == rank``).
Rerunning the same command after a crash writes only the missing blocks; a run with another model, adapter, data or
harvest setting into the same store is refused with the list of differences.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from actstore import world
from actstore.data import image_text_source, prefetched
from actstore.errors import NotAStoreError, StoreWriteError
from actstore.harvest import (
    TEXT_TOKEN_RULE, BlockJob, HarvestStats, block_groups, harvest_blocks, host_ring, n_states)
from actstore.location import free_bytes
from actstore.models import LLAVA_TEMPLATE, adapter_sha256
from actstore.progress import progress
from actstore.schema import StoreSchema
from actstore.writer import DEFAULT_PENDING_BLOCKS, StoreWriter
from actstore.process_writer import WRITERS, writer_of_kind
from jobs.config import parse_sections
from jobs.train_adapter import DataSection, ModelSection, build_model, local_device


@dataclass
class HarvestSection:
    """What to capture and how to store it."""

    layers: list[int] | None = None  # residual states; None = all (0 .. n_blocks)
    prompt: str = "describe the image ."  # "{caption}" feeds each image's caption
    n_images: int = 512
    block_images: int = 32
    batch_size: int = 32
    dtype: str = "bfloat16"
    codec: str = "zstd"
    clevel: int = 1
    chunk_images: int | None = None
    text_tokens_per_image: int = 16
    threads: int | None = None  # encoder threads (default: twice the cores of this rank, see default_threads)
    pending_blocks: int = DEFAULT_PENDING_BLOCKS  # blocks the writer commits at once, each holding a host buffer
    writer: str = "threads"  # "process": encode and write in a child process (see actstore.process_writer)

    def __post_init__(self) -> None:
        if self.writer not in WRITERS:
            raise ValueError(f"harvest.writer must be one of {WRITERS}, got {self.writer!r}")
        try:  # at load time, not at the first image
            self.prompt.format(caption="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"harvest.prompt {self.prompt!r} is not a valid template ({type(exc).__name__}: {exc}); "
                             "its one placeholder is {caption} (write {{ and }} for literal braces)") from None


@dataclass
class HarvestConfig:
    """A harvest job (YAML sections model, data, harvest; ``adapter`` is the trained adapter's folder)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    harvest: HarvestSection = field(default_factory=HarvestSection)
    adapter: str | None = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "HarvestConfig":
        """Load the harvest-relevant sections of a job YAML (other sections, e.g. ``train``, are ignored)."""
        raw = yaml.safe_load(Path(path).read_text()) or {}
        sections = {"model": ModelSection, "data": DataSection, "harvest": HarvestSection}
        return cls(**parse_sections(raw, sections, str(path)), adapter=raw.get("adapter"))


@dataclass(frozen=True)
class Launch:
    """Where this process stands among the harvest's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # The ranks can rendezvous (torch.distributed's env://: MASTER_ADDR and MASTER_PORT), so rank 0 can deal the work
    rendezvous: bool = False


def this_launch(env: Mapping[str, str] = os.environ) -> Launch:
    """This process's place: torchrun's RANK / WORLD_SIZE / LOCAL_RANK; else, as one task of a multi-task srun step,
    SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID; else a single process."""
    if "RANK" in env:
        rank, world_size, local_rank = int(env["RANK"]), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    elif int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1 and "SLURM_PROCID" in env:
        # The step's tasks, not the allocation's SLURM_NTASKS: a batch script sees SLURM_NTASKS and SLURM_PROCID=0 too,
        # but is one process, which must harvest everything rather than the first rank's share.
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
        local_rank = int(env.get("SLURM_LOCALID", 0))
    else:
        return Launch()
    return Launch(rank, world_size, local_rank, world_size > 1 and "MASTER_ADDR" in env and "MASTER_PORT" in env)


def wait_for_store(location: str, n_images: int, timeout: float = 600.0) -> None:
    """Block until rank 0 has created the store at ``location`` and made it hold ``n_images`` images."""
    from actstore.location import open_zarr_store
    from actstore.writer import open_group, read_attributes

    deadline = time.time() + timeout
    while True:
        try:
            stored = read_attributes(open_group(open_zarr_store(location, read_only=True), location, "r"), location)
            if stored.schema.capacity >= n_images:
                return
            problem = f"{location} holds {stored.schema.capacity} images, not yet the {n_images} asked for"
        except NotAStoreError as exc:
            problem = str(exc)
        if time.time() > deadline:
            raise TimeoutError(f"rank 0 did not create or grow the store in {timeout:.0f} s: {problem}")
        time.sleep(0.5)


def space_warning(needed: int, free: int | None, out: str) -> str | None:
    """A warning when the blocks still to write may not fit on the store's file system, else None."""
    if free is None or needed <= free:
        return None
    # Only a warning: compression shrinks the need by an amount known only once chunks are written, and a harvest that
    # fills the disk stops with an error and resumes where it stopped.
    return (f"[harvest] warning: the blocks still to write hold {needed / 1e9:.1f} GB before compression, and the "
            f"file system of {out} has {free / 1e9:.1f} GB free (zstd stores bf16 residuals at ~0.75-0.8 of their "
            "size); select fewer states (harvest.layers) or images, or free space")


def marked_blocks(out: str) -> set[int]:
    """The blocks of ``out`` that readers see as complete."""
    from actstore.location import open_zarr_store
    from actstore.reader import read_markers
    from actstore.writer import open_group

    return set(read_markers(open_group(open_zarr_store(out, read_only=True), out, "r")))


def check_marked(out: str, blocks: list[int]) -> set[int]:
    """The blocks of ``out`` that readers see as complete; raises StoreWriteError unless every one of ``blocks`` is."""
    # Read as readers do (the markers' values), not as the writer decides what is missing (by listing keys): a
    # harvest never reports success for a block that a reader would leave out.
    marked = marked_blocks(out)
    unmarked = sorted(set(blocks) - marked)
    if unmarked:
        raise StoreWriteError(f"blocks {unmarked} of {out} were written but readers see no completion marker for "
                              "them; rerun the same command to write them again")
    return marked


def missing_from_rank_0(missing: set[int] | None, launch: Launch) -> set[int]:
    """Rank 0's ``missing`` blocks, on every rank of a launch that can rendezvous (a collective: every rank calls
    it)."""
    import torch.distributed as dist

    ours = not dist.is_initialized()
    if ours:  # the backend train-adapter's ranks use: where its training runs, this runs
        # rank and world size given, since an srun step's tasks have no RANK / WORLD_SIZE for env:// to read
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=launch.rank,
                                world_size=launch.world_size)
    try:
        shared = [sorted(missing) if missing is not None else None]
        dist.broadcast_object_list(shared, src=0)
    finally:
        if ours:
            dist.destroy_process_group()
    return set(shared[0])


def groups_of_rank(groups: list[range], missing: set[int], rank: int, world_size: int, dealt: bool) -> list[range]:
    """The groups that miss a block which rank ``rank`` harvests: with ``dealt`` (every rank holds the same
    ``missing``) they are dealt round-robin, so that a rerun after one rank failed shares its work among all;
    otherwise (ranks that cannot agree on what is missing, since others may be writing while they look) each rank
    takes every ``world_size``-th group of the whole store, a split that needs no agreement."""
    if dealt:
        return [group for group in groups if missing.intersection(group)][rank::world_size]
    return [group for g, group in enumerate(groups) if g % world_size == rank and missing.intersection(group)]


def block_job(examples: Any, block: int, images: range, prompt: str, write: bool,
              preprocess: Callable[[Any, str], Any] | None = None) -> BlockJob:
    """Block ``block``'s images of the dataset (those of ``images`` it has) with their prompts; the undecodable ones
    are left out and listed as skipped (the block holds the others, named by their image_id, or none at all). With
    ``preprocess``, each example also carries the model's inputs of its image and prompt (``model_inputs``)."""
    indices = [i for i in images if i < len(examples)]
    loaded = [examples[i] for i in indices]
    chosen = [e for e in loaded if e is not None]
    skipped = [examples.skipped_rows[i] for i, e in zip(indices, loaded) if e is None]
    prompts = [prompt.format(caption=e["caption"]) for e in chosen]
    if preprocess is not None:  # copies: a source's examples are not ours to change
        chosen = [{**e, "model_inputs": preprocess(e["image"], p)} for e, p in zip(chosen, prompts)]
    return BlockJob(block, chosen, prompts, skipped, write=write)


def unfinished(futures: list[Any]) -> list[Any]:
    """The writer's futures of blocks still being written; raises the error of a block that failed."""
    # A block the disk refused (full, read-only, gone) stops the harvest at once: the blocks after it would fail alike,
    # after their forward passes (the process writer's host buffers are free before their block is written, so
    # nothing else would wait for the failed one until the harvest's end).
    running = []
    for future in futures:
        if future.done():
            future.result()
        else:  # kept whatever it does next, so that a failure after this look is raised at the next or the end
            running.append(future)
    return running


def open_store_of_rank(out: str, schema: StoreSchema, provenance: dict[str, Any], h: HarvestSection,
                       launch: Launch) -> tuple[StoreWriter, set[int]]:
    """This rank's writer of the store and the blocks missing from it: rank 0 creates or reopens the store and makes
    it hold ``h.n_images``; the other ranks open it after that, and (with a rendezvous) take rank 0's missing
    blocks."""
    rank, writer, missing = launch.rank, None, None
    if rank == 0:
        writer = StoreWriter.open_or_create(out, schema, provenance, threads=h.threads,
                                            max_pending_blocks=h.pending_blocks)
        # A rerun with more images grows the store here, once, before the other ranks open it: ranks growing it at
        # once, each to its own size, would race on the arrays' shapes and the recorded capacity.
        writer.reserve(h.n_images)
        missing = set(writer.missing_blocks(h.n_images))
    if launch.rendezvous:  # given once the store is created and grown, so it also tells the other ranks to open it
        missing = missing_from_rank_0(missing, launch)
    elif rank != 0:  # nobody tells this rank: it looks
        wait_for_store(out, h.n_images)
    if rank != 0:
        writer = StoreWriter.open(out, schema, provenance, threads=h.threads, max_pending_blocks=h.pending_blocks)
    if missing is None:  # a rank without rank 0's list reads the store itself
        missing = set(writer.missing_blocks(h.n_images))
    return writer, missing


def harvest_examples(section: DataSection, n_images: int) -> Any:
    """The first ``n_images`` examples of the data section's split: a harvest takes them all, holding none out."""
    if section.source == "world":
        return world.generate(n_images, seed=section.seed)  # the adapter's training examples, as before
    return image_text_source(section, limit=n_images)


# Settings that stores made before them do not record: left out at these defaults, so that such stores reopen.
LATER_DATA_DEFAULTS = {"split": "train", "name": None, "revision": None}
LATER_MODEL_DEFAULTS = {"llava_template": LLAVA_TEMPLATE}


def recorded_settings(section: Any, later_defaults: Mapping[str, Any], unrecorded: tuple[str, ...] = ()
                      ) -> dict[str, Any]:
    """A config section as a store records it: without ``unrecorded`` keys, nor later ones left at their defaults."""
    return {k: v for k, v in asdict(section).items()
            if k not in unrecorded and not (k in later_defaults and v == later_defaults[k])}


def dataset_provenance(section: DataSection) -> dict[str, Any]:
    """What a store records of its data: which examples, in order; not how many (a rerun with more images extends the
    store, since the first n images of a source are the same whatever n: tests/test_harvest.py holds this) nor what
    training holds out."""
    return recorded_settings(section, LATER_DATA_DEFAULTS, ("n_eval", "n_train", "eval_split", "eval_path"))


def run_harvest(cfg: HarvestConfig, out: str, *, log: Callable[..., None] = print) -> dict[str, Any]:
    """Harvest this process's share of the missing blocks into ``out``."""
    launch = this_launch()
    rank, world_size = launch.rank, launch.world_size
    say = log if rank == 0 else (lambda *_: None)
    h = cfg.harvest
    device = local_device(launch.local_rank)
    vlm = build_model(cfg.model, adapter=cfg.adapter, log=say)
    vlm.to(device).eval()
    if device.type == "cuda" and cfg.model.dtype == "float32":
        vlm.to(torch.bfloat16)  # inference in bf16 on GPUs, the store's dtype
    examples = harvest_examples(cfg.data, h.n_images)
    if len(examples) < h.n_images:  # a dataset smaller than asked for: all of it, not a crash at its end
        if not len(examples):
            raise ValueError(f"the dataset of {cfg.data.source!r} ({cfg.data.path}) has no examples")
        say(f"[harvest] the dataset has {len(examples)} examples, fewer than harvest.n_images = {h.n_images}: "
            f"harvesting all {len(examples)}")
        h = replace(h, n_images=len(examples))
    available = n_states(vlm.lm)
    states = h.layers if h.layers is not None else list(range(available))
    unknown = [x for x in states if not 0 <= x < available]
    if unknown:  # before the store is created with them
        raise ValueError(f"harvest.layers asks for state(s) {unknown}; this LM has states 0..{available - 1} "
                         "(0 = embedding output, i = output of block i)")
    first = next(e for e in examples if e is not None)
    probe = vlm.prepare([first["image"]], [h.prompt.format(caption=first["caption"])])
    schema = StoreSchema(
        layers=tuple(states), image_tokens=probe.image_positions.shape[1], d_model=vlm.lm.config.hidden_size,
        dtype=h.dtype, capacity=h.n_images,
        block_images=h.block_images, chunk_images=h.chunk_images, text_tokens_per_image=h.text_tokens_per_image,
        codec=h.codec, clevel=h.clevel,
    )
    provenance = {
        "model": recorded_settings(cfg.model, LATER_MODEL_DEFAULTS),
        "adapter_sha256": adapter_sha256(cfg.adapter) if cfg.adapter else None,
        "dataset": dataset_provenance(cfg.data),
        # Not how many images nor how fast they are written.
        "harvest": {k: v for k, v in asdict(h).items() if k not in ("threads", "pending_blocks", "writer", "n_images")},
        "text_tokens": TEXT_TOKEN_RULE,
    }
    if vlm.commits:  # what an unpinned hub name resolved to: a rerun after the hub moved on is refused, not mixed
        provenance["weights"] = dict(vlm.commits)
    data_commit = examples.commit if cfg.data.source == "hub" else None
    if data_commit:  # likewise for the examples: a dataset revised on the hub does not fill one store twice
        provenance["data_commit"] = data_commit
    writer, missing = open_store_of_rank(out, schema, provenance, h, launch)
    writer = writer_of_kind(writer, h.writer, h.threads, h.pending_blocks)
    all_groups = block_groups(schema.blocks_for(h.n_images), h.block_images, h.batch_size)
    groups = groups_of_rank(all_groups, missing, rank, world_size, dealt=launch.rendezvous)
    todo = [b for group in groups for b in group if b in missing]
    say(f"[harvest] {len(states)} states x {schema.image_tokens} image tokens x d_model {schema.d_model} -> {out}; "
        f"{len(todo)} block(s) to write on rank 0 of {world_size}")
    warning = space_warning(len(missing) * schema.block_bytes(), free_bytes(out), out)
    if warning:
        say(warning)
    stats = HarvestStats()
    # Buffers for the blocks one group's micro-batches fill, plus the blocks the writer keeps in flight.
    ring = host_ring(writer, max(map(len, groups), default=1) + h.pending_blocks, pin=device.type == "cuda")
    start = time.perf_counter()
    futures = []
    bar = progress(len(todo), "harvest", "block", enabled=rank == 0)

    def load(group: range) -> list[BlockJob]:
        return [block_job(examples, block, writer.block_images(block), h.prompt, block in missing, vlm.host_inputs)
                for block in group]

    # The next group's images are decoded and preprocessed while this group runs on the device, so that the thread that
    # launches the model's work only moves their inputs to it.
    try:
        for jobs in prefetched(load, groups, "harvest-loader"):
            futures = unfinished(futures) + harvest_blocks(vlm, writer, jobs, states, h.batch_size, stats, ring)
            bar.update(sum(job.write for job in jobs))
            elapsed = time.perf_counter() - start
            bar.set_postfix(img_s=f"{stats.images / elapsed:.1f}", GB_s=f"{stats.bytes_logical / elapsed / 1e9:.3f}")
    except BaseException:
        # The blocks in flight still complete (durable, then marked), so the rerun has less to do; an error of the
        # writer's own closing must not hide the one that stopped the harvest.
        with contextlib.suppress(Exception):
            writer.close()
        raise
    bar.close()
    t0 = time.perf_counter()
    for f in futures:
        f.result()
    writer.close()
    marked = check_marked(out, todo)
    stats.bytes_stored = writer.bytes_written
    stats.settle(wait=True)
    stats.seconds_write_wait += time.perf_counter() - t0
    stats.seconds_total = time.perf_counter() - start
    stats.skipped = list(getattr(getattr(examples, "skips", None), "skipped", []))
    if stats.skipped:
        log(f"[harvest] rank {rank} skipped {len(stats.skipped)} undecodable image(s): "
            + ", ".join(f"{s['id']} ({s['reason']})" for s in stats.skipped[:10]))
    say(f"[harvest] rank {rank}: {stats.summary()}")
    if world_size > 1:  # rank 0's share is done, not necessarily the store: say which
        total = schema.blocks_for(h.n_images)
        done = sum(block < total for block in marked)  # not those of a larger earlier run
        say(f"[harvest] {out}: {done} of {total} blocks complete" + (
            "" if done >= total else "; the other ranks write the rest (rerun the same command if any of them failed)"))
    return {"store": out, "stats": asdict(stats), "blocks": todo}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry (also what ``actstore harvest`` runs)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="store path or fsspec URL")
    parser.add_argument("--adapter", default=None, help="trained adapter folder (overrides the config's)")
    parser.add_argument("--n-images", type=int, default=None)
    args = parser.parse_args(argv)
    cfg = HarvestConfig.from_yaml(args.config)
    if args.adapter:
        cfg.adapter = args.adapter
    if args.n_images is not None:
        cfg.harvest.n_images = args.n_images
    return run_harvest(cfg, args.out)


if __name__ == "__main__":
    main()
