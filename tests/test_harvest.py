"""The harvester: stored residuals equal transformers' hidden states; several processes, crashes and resumes give
the same store as one uninterrupted run; a different job into the same store is refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

import actstore
from actstore.errors import SchemaMismatchError, StoreWriteError
from actstore.integrity import verify
from actstore.schema import ATTRS_KEY, StoreSchema, image_chunk_key, text_chunk_key
from jobs.harvest import HarvestConfig, run_harvest
from jobs.train_adapter import ModelSection, build_model
from conftest import damage_file, hub_snapshot
from writer_process import kill_at_hang_point

ROOT = Path(__file__).parents[1]
HELPER = str(Path(__file__).parent / "harvest_process.py")


@pytest.fixture(scope="module")
def adapter_dir(tiny_vlm, tmp_path_factory):
    """A fixed adapter, so that every process harvests with the same weights."""
    path = tmp_path_factory.mktemp("adapter")
    tiny_vlm.save_adapter(path)
    return path


def write_config(path: Path, adapter: Path, **harvest) -> Path:
    raw = {"model": {"vision": "miniature", "lm": "miniature"}, "data": {"source": "world", "seed": 3},
           "adapter": str(adapter),
           # micro-batches of 12 across blocks of 8: groups of 2 blocks, run as 12 + 4 images
           "harvest": {"n_images": 40, "block_images": 8, "batch_size": 12, "dtype": "float32",
                       "text_tokens_per_image": 8, **harvest}}
    path.write_text(yaml.safe_dump(raw))
    return path


def test_stored_residuals_equal_hidden_states(adapter_dir, tmp_path):
    # 5 blocks through 4 host buffers: a buffer is reused while the writer may still hold an earlier block
    cfg = HarvestConfig.from_yaml(write_config(tmp_path / "h.yaml", adapter_dir, n_images=40))
    result = run_harvest(cfg, str(tmp_path / "s.zarr"))
    chunk_files = [f for name in ("image_resid", "text_resid") for f in (tmp_path / "s.zarr" / name / "c").rglob("*")
                   if f.is_file()]
    ds = actstore.open(tmp_path / "s.zarr")
    assert len(chunk_files) == 2 * 5 * ds.sizes["layer"]  # image and text x 5 blocks x states
    assert result["stats"]["bytes_stored"] == sum(f.stat().st_size for f in chunk_files)
    vlm = build_model(cfg.model, adapter=cfg.adapter)
    from actstore import world

    all_rows = world.generate(40, seed=3)
    final_norm = vlm.lm.get_decoder().norm
    for first, end in ((0, 12), (12, 16), (16, 28), (28, 32), (32, 40)):  # the micro-batches the harvester ran
        rows = all_rows[first:end]
        batch = vlm.build_batch(vlm.pixel_values([r["image"] for r in rows]), ["describe the image ."] * len(rows))
        with torch.no_grad():
            hidden = vlm.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                            output_hidden_states=True).hidden_states
        last = len(hidden) - 1
        assert list(ds.layer.values) == list(range(last + 1))
        assert list(ds.image_id.values[first:end]) == [r["image_id"] for r in rows]
        for state in range(last + 1):
            stored = torch.from_numpy(ds.image_resid.sel(layer=state).values[first:end])
            want = hidden[state][torch.arange(len(rows))[:, None], batch.image_positions]
            if state == last:  # transformers' last hidden state is after the final norm; we store the residual
                stored = final_norm(stored)
            assert torch.equal(stored, want), f"image tokens {first}..{end}, state {state}"
            for i in range(len(rows)):
                mine = ds.text_image.values == first + i
                positions = torch.from_numpy(ds.text_position.values[mine]).long()
                assert positions.tolist() == batch.text_positions(i).tolist()
                text = torch.from_numpy(ds.text_resid.sel(layer=state).values[mine])
                if state == last:
                    text = final_norm(text)
                assert torch.equal(text, hidden[state][i, positions]), f"text of image {first + i}, state {state}"
                ids = ds.text_token_id.values[mine].tolist()
                assert ids == vlm.tokenizer("describe the image .", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("states", [[0], [0, 2], [1, 3], [0, 1, 2, 3, 4]])
def test_the_forward_pass_stops_after_the_last_state_a_harvest_stores(tiny_vlm, states):
    """Blocks after the last requested state never run, and the states before it are the model's own."""
    from actstore import world
    from actstore.harvest import decoder_blocks, forward_states

    rows = world.generate(3, seed=2)
    batch = tiny_vlm.prepare([r["image"] for r in rows], [r["caption"] for r in rows])
    blocks = decoder_blocks(tiny_vlm.lm)
    ran = []
    handles = [block.register_forward_hook(lambda *_, i=i: ran.append(i)) for i, block in enumerate(blocks)]
    try:
        image, text = forward_states(tiny_vlm, batch, states)
    finally:
        for handle in handles:
            handle.remove()
    assert len(blocks) == 4 and ran == list(range(max(states)))
    with torch.no_grad():
        hidden = tiny_vlm.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                             output_hidden_states=True).hidden_states
    rows_, cols = batch.host_text_index()
    for got_image, got_text, state in zip(image, text, states):
        if state == len(blocks):  # transformers' last hidden state is after the final norm; we store the residual
            got_image, got_text = tiny_vlm.lm.get_decoder().norm(got_image), tiny_vlm.lm.get_decoder().norm(got_text)
        want = hidden[state]
        assert torch.equal(got_image, want[torch.arange(3)[:, None], batch.image_positions]), state
        assert torch.equal(got_text, want[rows_, cols]), state


def _values(path: Path) -> dict[str, np.ndarray]:
    ds = actstore.open(path)
    return {name: ds[name].values for name in ("image_resid", "text_resid", "image_id", "text_image", "text_position")}


def _assert_same_store(a: Path, b: Path) -> None:
    va, vb = _values(a), _values(b)
    for name in va:
        np.testing.assert_array_equal(va[name], vb[name], err_msg=name)


def test_two_torchrun_processes_equal_one_and_share_a_resume(adapter_dir, tmp_path):
    """Two ranks write the store of one process, created by rank 0 and then extended by a rerun with more images; a
    rerun after one rank's groups were lost deals what is missing to both ranks (each took every other group of the
    whole store before, so rank 0 idled while rank 1 redid its share)."""
    from actstore.integrity import withdraw_markers

    config = write_config(tmp_path / "h.yaml", adapter_dir, n_images=64)  # 4 groups of 2 blocks
    run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "one.zarr"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29527",
                "-m", "jobs.harvest", "--config", str(config), "--out", str(tmp_path / "two.zarr")]
    subprocess.run([*torchrun, "--n-images", "32"], check=True, timeout=600, env=env, cwd=ROOT)
    assert actstore.open(tmp_path / "two.zarr").sizes["image"] == 32
    subprocess.run(torchrun, check=True, timeout=600, env=env, cwd=ROOT)
    assert verify(tmp_path / "two.zarr").ok
    _assert_same_store(tmp_path / "one.zarr", tmp_path / "two.zarr")
    withdraw_markers(tmp_path / "two.zarr", [2, 3, 6, 7])  # groups 1 and 3: rank 1's of a fresh harvest
    rerun = subprocess.run(torchrun, check=True, timeout=600, env=env, cwd=ROOT, capture_output=True, text=True)
    assert "2 block(s) to write on rank 0 of 2" in rerun.stdout
    assert verify(tmp_path / "two.zarr").ok
    _assert_same_store(tmp_path / "one.zarr", tmp_path / "two.zarr")


def test_a_harvest_written_from_a_child_process_equals_one_written_in_process(adapter_dir, tmp_path, monkeypatch):
    from actstore.process_writer import ProcessWriter

    config = write_config(tmp_path / "h.yaml", adapter_dir, n_images=24)
    run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "threads.zarr"))
    copies, copy_slot = [], ProcessWriter._copy_slot
    monkeypatch.setattr(ProcessWriter, "_copy_slot", lambda self: copies.append(1) or copy_slot(self))
    child = HarvestConfig.from_yaml(write_config(tmp_path / "p.yaml", adapter_dir, n_images=24, writer="process"))
    result = run_harvest(child, str(tmp_path / "process.zarr"))
    assert result["stats"]["bytes_stored"] > 0
    assert copies == []  # the host ring is the child's shared memory: no block is copied again
    assert verify(tmp_path / "process.zarr").ok
    _assert_same_store(tmp_path / "threads.zarr", tmp_path / "process.zarr")
    with pytest.raises(ValueError, match="harvest.writer must be one of"):
        HarvestConfig.from_yaml(write_config(tmp_path / "x.yaml", adapter_dir, writer="subprocess"))


def test_sigkill_mid_harvest_then_rerun(adapter_dir, tmp_path):
    config = write_config(tmp_path / "h.yaml", adapter_dir)
    store, sentinel = tmp_path / "killed.zarr", tmp_path / "hanging"
    proc = subprocess.Popen([sys.executable, HELPER, str(config), str(store), image_chunk_key(2, 3), str(sentinel)],
                            cwd=ROOT)
    kill_at_hang_point(proc, sentinel)
    from actstore.writer import StoreWriter

    assert 3 in StoreWriter.open(store).missing_blocks(40)  # the block being written when killed
    assert actstore.open(store).sizes["image"] < 40
    subprocess.run([sys.executable, "-m", "jobs.harvest", "--config", str(config), "--out", str(store)],
                   check=True, timeout=600, cwd=ROOT)
    run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "whole.zarr"))
    assert verify(store).ok
    _assert_same_store(store, tmp_path / "whole.zarr")


def test_blocks_that_verify_repair_marks_missing_are_rewritten_by_the_harvests_rerun(adapter_dir, tmp_path, capsys):
    """A chunk damaged after its block completed (a bit flip; a lost file): `verify --repair` withdraws those blocks'
    markers, readers leave them out, and rerunning the harvest rewrites them into the store of an uninterrupted run."""
    from jobs.cli import main as cli

    config = HarvestConfig.from_yaml(write_config(tmp_path / "h.yaml", adapter_dir, n_images=24))
    store = tmp_path / "s.zarr"
    run_harvest(config, str(store))
    shutil.copytree(store, tmp_path / "whole.zarr")
    damage_file(store / image_chunk_key(1, 1), "bitflip")
    (store / text_chunk_key(0, 2)).unlink()
    assert cli(["verify", str(store)]) == 1
    assert "--repair` marks blocks [1, 2] missing" in capsys.readouterr().out
    assert actstore.open(store).sizes["image"] == 24  # verify alone changes nothing
    assert cli(["verify", str(store), "--repair"]) == 1
    assert "blocks [1, 2] are marked missing now" in capsys.readouterr().out
    left = actstore.open(store)
    assert left.image_id.values.tolist() == actstore.open(tmp_path / "whole.zarr").image_id.values[:8].tolist()
    run_harvest(config, str(store))
    assert verify(store).ok
    _assert_same_store(store, tmp_path / "whole.zarr")
    capsys.readouterr()
    assert cli(["verify", str(store), "--repair"]) == 0 and "repair" not in capsys.readouterr().out


@pytest.mark.parametrize("writer", ["threads", "process"])
def test_a_harvest_stops_at_its_first_failed_block(adapter_dir, tmp_path, monkeypatch, writer):
    """A block the disk refuses (full, read-only, ...) stops the harvest after the group in flight, with the writer's
    error, instead of running the forward pass over the rest of the dataset for blocks that fail alike (the child
    writer's failures reached the harvest only at its end); the blocks in flight complete, and the rerun finishes."""
    import time

    import actstore.harvest as engine
    from actstore.schema import marker_key
    from actstore.writer import StoreWriter

    store = tmp_path / "s.zarr"
    run_harvest(HarvestConfig.from_yaml(write_config(tmp_path / "a.yaml", adapter_dir, n_images=16)), str(store))
    (store / image_chunk_key(0, 2)).parent.parent.write_text("")  # a file where block 2's chunk folder goes
    calls, real_forward = [], engine.forward_states

    def counted_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the first batch after blocks 2 and 3 (groups of 2 blocks, 2 micro-batches each)
            deadline = time.time() + 60
            while not (store / marker_key(3)).exists() and time.time() < deadline:  # block 2 has failed by then
                time.sleep(0.05)
            time.sleep(0.5)  # and the writer has said so
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine, "forward_states", counted_forward)
    more = HarvestConfig.from_yaml(write_config(tmp_path / "b.yaml", adapter_dir, n_images=80, writer=writer))
    with pytest.raises(StoreWriteError, match=r"image_resid/c/0/2/0/0"):
        run_harvest(more, str(store))
    assert len(calls) <= 4  # 8 without stopping: groups 1-4 of 5
    assert verify(store).ok and {0, 1, 3} <= set(StoreWriter.open(store).completed_blocks())  # block 3 in flight
    (store / image_chunk_key(0, 2)).parent.parent.unlink()
    run_harvest(more, str(store))
    assert verify(store).ok and actstore.open(store).sizes["image"] == 80


def test_a_harvest_whose_marker_readers_cannot_see_fails(adapter_dir, tmp_path, monkeypatch):
    """The harvest's last check reads the markers as readers do: a block left without one is an error naming it,
    never a success with a store that readers show shorter."""
    from actstore.schema import BLOCK_STATUS, marker_key
    from actstore.writer import StoreWriter

    config = write_config(tmp_path / "h.yaml", adapter_dir, n_images=24)
    real = StoreWriter._zarr_write

    def lose_marker_of_block_1(self, writes, deferred=False):
        return real(self, [w for w in writes if w[3] != marker_key(1)], deferred)

    monkeypatch.setattr(StoreWriter, "_zarr_write", lose_marker_of_block_1)
    with pytest.raises(StoreWriteError, match=r"blocks \[1\] .* no completion marker"):
        run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "s.zarr"))
    assert not (tmp_path / "s.zarr" / BLOCK_STATUS / "c" / "1").exists()


def test_a_harvest_into_an_fsspec_url_equals_one_into_a_path(adapter_dir, tmp_path):
    """What several nodes do with an object store: the job reads and writes through fsspec alone (here its in-memory
    file system, whose puts are atomic like an object store's), and the store is the same as a local one; a rerun
    into the URL finds nothing missing."""
    config = write_config(tmp_path / "h.yaml", adapter_dir, n_images=20)
    run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "local.zarr"))
    url = f"memory://actstore-harvest-{tmp_path.name}/remote.zarr"
    run_harvest(HarvestConfig.from_yaml(config), url)
    assert verify(url).ok
    _assert_same_store(tmp_path / "local.zarr", url)
    assert run_harvest(HarvestConfig.from_yaml(config), url)["blocks"] == []


def test_a_rerun_runs_whole_groups_and_rewrites_only_missing_blocks(adapter_dir, tmp_path, monkeypatch):
    """Blocks 3 and 4 lost (markers gone, chunks damaged): the rerun runs block 2 again, since it shares micro-batches
    with block 3, but leaves its chunks alone, and the store equals an uninterrupted harvest."""
    import jobs.harvest as job
    from actstore.schema import marker_key
    from actstore.writer import StoreWriter

    config = write_config(tmp_path / "h.yaml", adapter_dir)
    run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "whole.zarr"))
    store = tmp_path / "s.zarr"
    run_harvest(HarvestConfig.from_yaml(config), str(store))
    with StoreWriter.open(store) as writer:
        for block in (3, 4):
            writer.sink.delete(marker_key(block))
            (store / image_chunk_key(0, block)).write_bytes(b"lost")
    kept = (store / image_chunk_key(0, 2)).stat()
    runs = []
    real = job.harvest_blocks

    def spy(vlm, writer, jobs, *args):
        runs.append([(j.block, j.write) for j in jobs])
        return real(vlm, writer, jobs, *args)

    monkeypatch.setattr(job, "harvest_blocks", spy)
    result = run_harvest(HarvestConfig.from_yaml(config), str(store))
    assert runs == [[(2, False), (3, True)], [(4, True)]] and result["blocks"] == [3, 4]
    again = (store / image_chunk_key(0, 2)).stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert verify(store).ok
    _assert_same_store(store, tmp_path / "whole.zarr")


def test_prompts_longer_than_the_text_tokens_per_image_keep_their_first_tokens(adapter_dir, tmp_path):
    full = run_harvest(HarvestConfig.from_yaml(write_config(tmp_path / "f.yaml", adapter_dir, n_images=16)),
                       str(tmp_path / "full.zarr"))
    cut = run_harvest(HarvestConfig.from_yaml(write_config(tmp_path / "c.yaml", adapter_dir, n_images=16,
                                                           text_tokens_per_image=2)), str(tmp_path / "cut.zarr"))
    whole, first = actstore.open(tmp_path / "full.zarr"), actstore.open(tmp_path / "cut.zarr")
    assert (full["stats"]["prompts_cut"], cut["stats"]["prompts_cut"]) == (0, 16)  # "describe the image ." is 4
    kept = whole.text_position.values < np.array([whole.text_position.values[whole.text_image.values == i].min()
                                                   for i in range(16)])[whole.text_image.values] + 2
    for name in ("text_image", "text_position", "text_token_id"):
        np.testing.assert_array_equal(first[name].values, whole[name].values[kept], err_msg=name)
    np.testing.assert_array_equal(first.text_resid.values, whole.text_resid.values[:, kept])
    np.testing.assert_array_equal(first.image_resid.values, whole.image_resid.values)
    assert verify(tmp_path / "cut.zarr").ok


def test_a_store_without_text_tokens_holds_the_same_image_tokens(adapter_dir, tmp_path):
    config = write_config(tmp_path / "h.yaml", adapter_dir, n_images=16)
    run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "with.zarr"))
    images_only = write_config(tmp_path / "i.yaml", adapter_dir, n_images=16, text_tokens_per_image=0)
    result = run_harvest(HarvestConfig.from_yaml(images_only), str(tmp_path / "without.zarr"))
    with_text, without = actstore.open(tmp_path / "with.zarr"), actstore.open(tmp_path / "without.zarr")
    assert "text_resid" not in without and result["stats"]["text_tokens"] == 0
    np.testing.assert_array_equal(without.image_resid.values, with_text.image_resid.values)
    assert verify(tmp_path / "without.zarr").ok


def test_block_groups_are_aligned_runs_of_the_blocks_a_micro_batch_spans():
    from actstore.harvest import block_groups

    assert block_groups(5, 8, 12) == [range(0, 2), range(2, 4), range(4, 5)]
    assert block_groups(5, 16, 64) == [range(0, 4), range(4, 5)]
    assert block_groups(3, 16, 8) == [range(0, 1), range(1, 2), range(2, 3)]


class _HeldWriter:
    """Stands in for a StoreWriter: keeps what harvest_blocks hands it."""

    def __init__(self, schema) -> None:
        self.schema, self.blocks = schema, {}

    def submit_block(self, block, image_resid, image_ids, prompts, text, skipped, ready=None):
        from concurrent.futures import Future

        if ready is not None:
            ready()
        self.blocks[block] = (image_resid.clone(), text.resid.clone(), text.image.clone(), text.position.clone(),
                              list(image_ids))
        done: Future = Future()
        done.set_result({})
        return done


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_micro_batches_across_blocks_copy_whole_rows_into_host_buffers(tiny_vlm, device, monkeypatch):
    """Micro-batches of 5 over blocks of 4 and 3 images: each block gets exactly its images' residuals, and every copy
    to the host is contiguous on both sides (into pinned memory on a GPU): a strided one would go through a pageable
    temporary and wait for the device."""
    import copy

    from actstore import world
    from actstore.harvest import BlockJob, HarvestStats, HostRing, forward_states, harvest_blocks
    from actstore.schema import StoreSchema

    vlm = copy.deepcopy(tiny_vlm).to(device)
    rows = world.generate(11, seed=5)
    prompts = ["describe the image ."] * 11
    states = [0, 2]
    probe = vlm.prepare([rows[0]["image"]], prompts[:1])
    schema = StoreSchema(layers=tuple(states), image_tokens=probe.image_positions.shape[1],
                         d_model=vlm.lm.config.hidden_size, dtype="float32", capacity=12, block_images=4,
                         text_tokens_per_image=8)
    sizes = {0: 4, 1: 3, 2: 4}  # block 1 lost an image (skipped)
    order, jobs = 0, []
    for block, n in sizes.items():
        jobs.append(BlockJob(block, [{"image_id": r["image_id"], "image": r["image"]} for r in rows[order:order + n]],
                             prompts[order:order + n]))
        order += n
    copies = []
    real_copy = torch.Tensor.copy_

    def spy(self, src, non_blocking=False):
        if non_blocking and self.device.type == "cpu":
            copies.append((self.is_contiguous(), src.is_contiguous(), src.device.type != "cuda" or self.is_pinned()))
        return real_copy(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    writer = _HeldWriter(schema)
    harvest_blocks(vlm, writer, jobs, states, 5, HarvestStats(), HostRing(1, pin=device == "cuda"))
    monkeypatch.undo()
    assert copies and all(all(c) for c in copies), copies
    want_img, want_txt, want_rows = [], [], []
    for first in range(0, 11, 5):
        batch = vlm.prepare([r["image"] for r in rows[first:first + 5]], prompts[first:first + 5])
        img, txt = forward_states(vlm, batch, states)
        want_img.append(img.cpu())
        want_txt.append(txt.cpu())
        want_rows.append(batch.host_text_index()[0] + first)
    want_img, want_txt, want_rows = torch.cat(want_img, 1), torch.cat(want_txt, 1), torch.cat(want_rows)
    order = 0
    for block, n in sizes.items():
        image_resid, text_resid, text_image, _, ids = writer.blocks[block]
        assert ids == [r["image_id"] for r in rows[order:order + n]]
        assert torch.equal(image_resid, want_img[:, order:order + n]), f"block {block}"
        mine = (want_rows >= order) & (want_rows < order + n)
        assert torch.equal(text_resid, want_txt[:, mine]) and torch.equal(text_image, want_rows[mine] - order)
        order += n


def test_copy_to_host_refuses_regions_that_are_not_runs_of_rows():
    from actstore.harvest import copy_to_host

    buffer = torch.zeros(2, 4, 3, 5)
    source = torch.randn(2, 2, 3, 5)
    copy_to_host(buffer[:, 1:3], source)
    assert torch.equal(buffer[:, 1:3], source) and not buffer[:, 0].any() and not buffer[:, 3].any()
    with pytest.raises(ValueError, match="contiguous"):
        copy_to_host(buffer[:, :, :, :2], torch.randn(2, 4, 3, 2))


def test_a_ring_never_hands_out_a_buffer_still_being_filled():
    from actstore.harvest import HostRing

    ring = HostRing(slots=1, pin=False)
    ring.acquire((2, 3), (2, 4), torch.float32)
    with pytest.raises(RuntimeError, match="still being filled"):
        ring.acquire((2, 3), (2, 4), torch.float32)


def test_a_different_job_into_the_same_store_is_refused(adapter_dir, tmp_path):
    run_harvest(HarvestConfig.from_yaml(write_config(tmp_path / "a.yaml", adapter_dir, n_images=8)),
                str(tmp_path / "s.zarr"))
    other = HarvestConfig.from_yaml(write_config(tmp_path / "b.yaml", adapter_dir, n_images=8,
                                                 prompt="what do you see ?"))
    with pytest.raises(SchemaMismatchError,
                       match="provenance 'harvest.prompt': store has 'describe the image .', requested 'what do you"):
        run_harvest(other, str(tmp_path / "s.zarr"))


def test_a_rerun_with_more_images_extends_the_store(adapter_dir, tmp_path):
    """Only the new blocks are harvested, and the store equals one harvested at the larger size at once."""
    store = tmp_path / "s.zarr"
    fewer = HarvestConfig.from_yaml(write_config(tmp_path / "a.yaml", adapter_dir, n_images=16))
    first = run_harvest(fewer, str(store))
    more = HarvestConfig.from_yaml(write_config(tmp_path / "b.yaml", adapter_dir, n_images=40))
    assert run_harvest(more, str(store))["blocks"] == [b for b in range(5) if b not in first["blocks"]]
    run_harvest(more, str(tmp_path / "whole.zarr"))
    assert verify(store).ok
    _assert_same_store(store, tmp_path / "whole.zarr")


def test_an_extending_rerun_on_several_ranks_grows_the_store_on_rank_0_alone(adapter_dir, tmp_path, monkeypatch):
    """Ranks growing one store at once, each to its own size, race on the arrays' shapes and the recorded capacity:
    rank 0 grows it before the others open it, and they wait for that (here rank 1 alone gives up, having grown
    nothing; then the ranks run one after the other, as RANK / WORLD_SIZE set them)."""
    import jobs.harvest

    store = tmp_path / "s.zarr"
    run_harvest(HarvestConfig.from_yaml(write_config(tmp_path / "a.yaml", adapter_dir, n_images=16)), str(store))
    more = HarvestConfig.from_yaml(write_config(tmp_path / "b.yaml", adapter_dir, n_images=40))
    wait = jobs.harvest.wait_for_store
    monkeypatch.setattr(jobs.harvest, "wait_for_store", lambda out, n: wait(out, n, timeout=1.0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(TimeoutError, match="holds 16 images, not yet the 40 asked for"):
        run_harvest(more, str(store))
    assert actstore.open(store).attrs["schema"]["capacity"] == 16
    monkeypatch.setenv("RANK", "0")
    run_harvest(more, str(store))
    assert actstore.open(store).attrs["schema"]["capacity"] == 40
    monkeypatch.setenv("RANK", "1")
    run_harvest(more, str(store))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    run_harvest(more, str(tmp_path / "whole.zarr"))
    assert verify(store).ok
    _assert_same_store(store, tmp_path / "whole.zarr")


def test_each_launcher_gives_the_process_its_place():
    """torchrun's variables win; the tasks of a multi-task srun step take Slurm's; a batch script, which Slurm also
    gives SLURM_NTASKS and SLURM_PROCID=0, is one process and harvests everything."""
    from jobs.harvest import Launch, this_launch

    slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7"}
    assert this_launch(slurm) == Launch(0, 1, 0, False)
    step = {**slurm, "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    assert this_launch(step) == Launch(5, 8, 1, False)
    assert this_launch({**step, "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}) == Launch(5, 8, 1, True)
    torchrun = {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "n", "MASTER_PORT": "1"}
    assert this_launch({**step, **torchrun}) == Launch(3, 16, 3, True)  # srun starting one torchrun per node
    assert this_launch({"RANK": "1", "WORLD_SIZE": "2"}) == Launch(1, 2, 0, False)
    assert this_launch({}) == Launch()


def test_the_tasks_of_an_srun_step_share_the_harvest(adapter_dir, tmp_path, monkeypatch):
    """`srun --ntasks 2 python -m jobs.harvest ...` without torchrun: each task harvests its share, not the whole
    store (here the tasks run one after the other, rank 0 first, as the static split lets them)."""
    cfg = HarvestConfig.from_yaml(write_config(tmp_path / "c.yaml", adapter_dir, n_images=40))
    run_harvest(cfg, str(tmp_path / "whole.zarr"))
    store = tmp_path / "s.zarr"
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    logged = {}
    for rank in (0, 1):
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        monkeypatch.setenv("SLURM_LOCALID", str(rank))
        logged[rank] = []
        run_harvest(cfg, str(store), log=logged[rank].append)
        if rank == 0:
            assert any("block(s) to write on rank 0 of 2" in line for line in logged[0]), logged[0]
            done, total = actstore.open(store).attrs["blocks_complete"], actstore.open(store).attrs["blocks_total"]
            assert 0 < done < total
            assert f"{done} of {total} blocks complete; the other ranks write the rest" in logged[0][-1]
    assert logged[1] == []  # only rank 0 speaks
    assert verify(store).ok
    _assert_same_store(store, tmp_path / "whole.zarr")


def offline_hub_harvest(tmp_path: Path, adapter_dir: Path, cache_variable: str, cache: Path,
                        **sections) -> tuple[list[str], dict]:
    """The command of an 8-image harvest whose config ``sections`` name hub repositories, and the environment that
    serves them offline from ``cache`` (``cache_variable``: HF_HUB_CACHE for models, HF_DATASETS_CACHE for data)."""
    raw = {**yaml.safe_load(write_config(tmp_path / "h.yaml", adapter_dir, n_images=8).read_text()), **sections}
    config = tmp_path / "hub.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, cache_variable: str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "jobs.harvest", "--config", str(config), "--out", str(tmp_path / "s.zarr")], env


def test_a_rerun_after_the_hub_moved_on_is_refused(adapter_dir, tmp_path, miniature):
    """Unpinned hub names: the store records the commits they resolved to, and a rerun that resolves them to other
    weights is refused instead of mixing two models in one store."""
    cache, old, new = tmp_path / "hub", "1" * 40, "2" * 40
    for part in ("vision", "lm"):
        shutil.copytree(miniature[part], hub_snapshot(cache, f"actstore-test/tiny-{part}", old), dirs_exist_ok=True)
    harvest, env = offline_hub_harvest(tmp_path, adapter_dir, "HF_HUB_CACHE", cache,
                                       model={"vision": "actstore-test/tiny-vision", "lm": "actstore-test/tiny-lm"})
    subprocess.run(harvest, check=True, timeout=300, env=env, cwd=ROOT, capture_output=True)
    provenance = zarr.open_group(tmp_path / "s.zarr", mode="r").attrs[ATTRS_KEY]["provenance"]
    assert provenance["weights"] == {"vision": old, "lm": old}
    # the same files, a new commit, now the main branch
    shutil.copytree(miniature["lm"], hub_snapshot(cache, "actstore-test/tiny-lm", new), dirs_exist_ok=True)
    rerun = subprocess.run(harvest, timeout=300, env=env, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode != 0
    assert f"provenance 'weights.lm': store has '{old}', requested '{new}'" in rerun.stderr


def test_a_rerun_after_a_hub_dataset_moved_on_is_refused(adapter_dir, tmp_path):
    """A hub dataset's store records the commit its examples came from; a rerun that loads another commit of the
    dataset is refused, and a pinned commit that the cache does not serve is named rather than silently replaced."""
    from actstore.data import loaded_commit, open_dataset
    from conftest import hub_dataset_cache, world_parquet

    world_parquet(tmp_path / "w.parquet", 8)
    assert loaded_commit(open_dataset("parquet", str(tmp_path / "w.parquet"))) is None  # local files: no commit
    cache, old, new = tmp_path / "datasets", "1" * 40, "2" * 40
    hub_dataset_cache(cache, "actstore-test/captions", tmp_path / "w.parquet", old)
    harvest, env = offline_hub_harvest(tmp_path, adapter_dir, "HF_DATASETS_CACHE", cache,
                                       data={"source": "hub", "path": "actstore-test/captions"})
    subprocess.run(harvest, check=True, timeout=300, env=env, cwd=ROOT, capture_output=True)
    provenance = zarr.open_group(tmp_path / "s.zarr", mode="r").attrs[ATTRS_KEY]["provenance"]
    assert provenance["data_commit"] == old
    assert list(actstore.open(tmp_path / "s.zarr").image_id.values) == [f"w{i}" for i in range(8)]
    hub_dataset_cache(cache, "actstore-test/captions", tmp_path / "w.parquet", new)  # same rows, a newer commit
    rerun = subprocess.run(harvest, timeout=300, env=env, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode != 0
    assert "provenance 'data_commit'" in rerun.stderr and new in rerun.stderr
    pinned = ("from actstore.data import open_dataset; "
              f"open_dataset('hub', 'actstore-test/captions', revision='{old}')")
    load = subprocess.run([sys.executable, "-c", pinned], timeout=300, env=env, cwd=ROOT, capture_output=True,
                          text=True)
    assert load.returncode != 0
    assert f"data.revision is commit {old} of actstore-test/captions, but datasets loaded commit {new}" in load.stderr


def test_a_rerun_into_a_store_harvested_with_another_text_token_rule_is_refused(adapter_dir, tmp_path):
    cfg = HarvestConfig.from_yaml(write_config(tmp_path / "a.yaml", adapter_dir, n_images=16))
    store = tmp_path / "s.zarr"
    run_harvest(cfg, str(store))
    group = zarr.open_group(store, mode="r+")
    meta = group.attrs[ATTRS_KEY]
    del meta["provenance"]["text_tokens"]  # as written by a harvester that kept whole prompts
    group.attrs[ATTRS_KEY] = meta
    (store / image_chunk_key(0, 1)).unlink()  # a crash left block 1 missing
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    with pytest.raises(SchemaMismatchError, match="provenance 'text_tokens': store has none"):
        run_harvest(cfg, str(store))
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_bad_prompts_and_states_are_named_before_a_store_exists(adapter_dir, tmp_path):
    with pytest.raises(ValueError, match=r"harvest.prompt 'Describe \{object\}.' is not a valid template"):
        HarvestConfig.from_yaml(write_config(tmp_path / "p.yaml", adapter_dir, prompt="Describe {object}."))
    assert HarvestConfig.from_yaml(write_config(tmp_path / "b.yaml", adapter_dir, prompt="{{x}}: {caption}")).harvest
    config = HarvestConfig.from_yaml(write_config(tmp_path / "s.yaml", adapter_dir, layers=[0, 3, 99]))
    with pytest.raises(ValueError, match=r"harvest.layers asks for state\(s\) \[99\]; this LM has states 0..4"):
        run_harvest(config, str(tmp_path / "s.zarr"))
    assert not (tmp_path / "s.zarr").exists()


def test_real_config_loads():
    cfg = HarvestConfig.from_yaml(ROOT / "jobs" / "configs" / "gemma2-2b-siglip.yaml")
    assert cfg.model.lm == "google/gemma-2-2b" and cfg.harvest.block_images == 16 and cfg.adapter
    llava = HarvestConfig.from_yaml(ROOT / "jobs" / "configs" / "llava-1.5-7b.yaml")
    assert llava.model.llava == "llava-hf/llava-1.5-7b-hf" and not llava.adapter
    assert llava.model.llava_template.format(text="a cat") == "USER: <image>\na cat ASSISTANT:"
    schema = StoreSchema(layers=llava.harvest.layers, image_tokens=576, d_model=4096, dtype=llava.harvest.dtype,
                         capacity=llava.harvest.n_images, block_images=llava.harvest.block_images,
                         chunk_images=llava.harvest.chunk_images)
    assert max(llava.harvest.layers) == 32 and schema.block_images % schema.chunk_images == 0


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    """A randomly initialised LlavaForConditionalGeneration + LlavaProcessor over the miniature's tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from actstore.miniature import build_tokenizer, image_processor

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                num_attention_heads=4, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llava")
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


CHAT_TEMPLATE = "USER: <image>\n{text} ASSISTANT:"  # llava-1.5's chat format


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE], ids=["plain", "chat"])
def test_llava_harvest_equals_hidden_states(tiny_llava_dir, tmp_path, template):
    """Image and text tokens of a LLaVA harvest equal the model's hidden states of the same prompts: the plain
    template's, or a chat format's (model.llava_template), whose closing words follow the caption as text tokens."""
    from actstore import world
    from actstore.models import LlavaVLM

    config = tmp_path / "h.yaml"
    model = {"llava": str(tiny_llava_dir), **({"llava_template": template} if template else {})}
    config.write_text(yaml.safe_dump({
        "model": model, "data": {"source": "world", "seed": 5},
        "harvest": {"n_images": 8, "block_images": 8, "batch_size": 8, "dtype": "float32",
                    "text_tokens_per_image": 10, "prompt": "{caption}"}}))
    run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "s.zarr"))
    ds = actstore.open(tmp_path / "s.zarr")
    assert ds.sizes["image_token"] == 16 and ds.sizes["d_model"] == 48 and list(ds.layer.values) == [0, 1, 2, 3]

    llava = LlavaVLM.from_pretrained(str(tiny_llava_dir), **({"prompt_template": template} if template else {}))
    rows = world.generate(8, seed=5)
    batch = llava.prepare([r["image"] for r in rows], [r["caption"] for r in rows])
    assert (batch.input_ids[torch.arange(8)[:, None], batch.image_positions] == llava.image_token_id).all()
    assert torch.equal(batch.host_text_mask, batch.text_mask.cpu()) and batch.host_text_mask.any()
    assert torch.equal(batch.host_input_ids, batch.input_ids.cpu())
    with torch.no_grad():
        hidden = llava.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                             attention_mask=batch.attention_mask, output_hidden_states=True).hidden_states
    norm = llava.lm.norm
    for state in range(4):
        stored = torch.from_numpy(ds.image_resid.sel(layer=state).values)
        if state == 3:
            stored = norm(stored)
        assert torch.equal(stored, hidden[state][torch.arange(8)[:, None], batch.image_positions]), state
    tokenizer = llava.processor.tokenizer
    closing = tokenizer(" ASSISTANT:", add_special_tokens=False)["input_ids"] if template else []
    for i, r in enumerate(rows):  # text tokens: the caption after the image tokens, then the chat format's closing
        mine = ds.text_image.values == i
        ids = ds.text_token_id.values[mine].tolist()
        assert ids == (tokenizer(r["caption"], add_special_tokens=False)["input_ids"] + closing)[:10]
        text = torch.from_numpy(ds.text_resid.sel(layer=1).values[mine])
        positions = torch.from_numpy(ds.text_position.values[mine]).long()
        assert torch.equal(text, hidden[1][i, positions])
    recorded = ds.attrs["provenance"]["model"]
    assert recorded.get("llava_template") == template  # the plain default is left out: older stores reopen
    if template:  # a rerun with the plain template is refused by name
        raw = yaml.safe_load(config.read_text())
        del raw["model"]["llava_template"]
        config.write_text(yaml.safe_dump(raw))
        refused = r"provenance 'model.llava_template': store has .*, requested none"
        with pytest.raises(SchemaMismatchError, match=refused):
            run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "s.zarr"))


@pytest.mark.parametrize("model, problem", [
    ({"llava": "x", "llava_template": "<image> describe"}, "must hold {text}"),
    ({"llava": "x", "llava_template": "<image> {text} {answer}"}, "field other than {text}"),
    ({"llava_template": CHAT_TEMPLATE}, "applies to a LLaVA checkpoint only"),
])
def test_a_llava_template_that_cannot_work_is_refused_as_the_config_is_read(model, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        ModelSection(**model)


def test_a_llava_template_or_family_that_cannot_work_is_refused_before_the_weights_load(tiny_llava_dir, tmp_path,
                                                                                         monkeypatch):
    import transformers

    from actstore.models import LlavaVLM

    def load_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the template was checked")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", load_weights)
    for template in ("USER: {text} ASSISTANT:", "<image> <image> {text}"):
        with pytest.raises(ValueError, match="image token '<image>' once"):
            LlavaVLM.from_pretrained(str(tiny_llava_dir), prompt_template=template)
    next_dir = tmp_path / "llava-next"  # another family's checkpoint, named as a LLaVA one
    shutil.copytree(tiny_llava_dir, next_dir)
    config = json.loads((next_dir / "config.json").read_text())
    (next_dir / "config.json").write_text(json.dumps({**config, "model_type": "llava_next"}))
    with pytest.raises(ValueError, match="names a 'llava_next' checkpoint"):
        LlavaVLM.from_pretrained(str(next_dir))


def test_undecodable_images_are_skipped_and_recorded_in_the_store(adapter_dir, tmp_path):
    from conftest import parquet_with_a_corrupt_image

    data = tmp_path / "data.parquet"
    parquet_with_a_corrupt_image(data)
    config = tmp_path / "h.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"vision": "miniature", "lm": "miniature"}, "adapter": str(adapter_dir),
        "data": {"source": "parquet", "path": str(data)},
        "harvest": {"n_images": 6, "block_images": 8, "batch_size": 8, "dtype": "float32",
                    "text_tokens_per_image": 8}}))
    run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "s.zarr"))
    ds = actstore.open(tmp_path / "s.zarr")
    assert list(ds.image_id.values) == ["ex0", "ex1", "ex3", "ex4", "ex5"]
    (skip,) = ds.attrs["skipped_images"]
    assert skip["id"] == "ex2" and skip["block"] == 0 and "UnidentifiedImageError" in skip["reason"]
    from jobs.cli import main as cli

    assert cli(["info", str(tmp_path / "s.zarr")]) == 0


@pytest.mark.parametrize("writer", ["threads", "process"])
def test_a_block_whose_every_image_is_undecodable_is_stored_empty_and_the_harvest_goes_on(adapter_dir, tmp_path,
                                                                                            writer):
    """A corrupt shard or a run of failed downloads fills a whole block with undecodable images: the block is stored
    with no image and its inputs recorded as skipped, instead of stopping the harvest there on every rerun."""
    from actstore.integrity import store_info, verify
    from conftest import world_parquet

    world_parquet(tmp_path / "data.parquet", 12, prefix="ex", undecodable=(4, 5, 6, 7))  # all of block 1
    config = tmp_path / "h.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"vision": "miniature", "lm": "miniature"}, "adapter": str(adapter_dir),
        "data": {"source": "parquet", "path": str(tmp_path / "data.parquet")},
        "harvest": {"n_images": 12, "block_images": 4, "batch_size": 8, "dtype": "float32",
                    "text_tokens_per_image": 4, "writer": writer}}))
    store = tmp_path / "s.zarr"
    run_harvest(HarvestConfig.from_yaml(config), str(store))
    ds = actstore.open(store)
    assert ds.image_id.values.tolist() == ["ex0", "ex1", "ex2", "ex3", "ex8", "ex9", "ex10", "ex11"]
    assert ds.image.values.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]  # store rows: block 1's are left out
    assert set(ds.text_image.values.tolist()) == set(ds.image.values.tolist())  # each stored image has text tokens
    assert [(s["id"], s["block"]) for s in ds.attrs["skipped_images"]] == [(f"ex{i}", 1) for i in range(4, 8)]
    info = store_info(store)
    assert (info["blocks_complete"], info["images"]) == (3, 8) and verify(store).ok
    from actstore.stats import SAEParams, compute_layer_stats  # and the analysis reads past the empty block

    d, g = ds.sizes["d_model"], torch.Generator().manual_seed(0)
    sae = SAEParams(torch.randn(d, 16, generator=g), torch.zeros(16), torch.randn(16, d, generator=g), torch.zeros(d),
                    "relu")
    stats = compute_layer_stats(ds, {1: sae}, [1], backend="reference", top_k=2, image_top=2)
    assert stats.n_tokens.sel(kind="image").item() == 8 * ds.sizes["image_token"]
    logged = []
    run_harvest(HarvestConfig.from_yaml(config), str(store), log=logged.append)  # the rerun finds it done
    assert any("0 block(s) to write" in line for line in logged), logged


def test_a_dataset_smaller_than_n_images_is_harvested_whole(adapter_dir, tmp_path):
    """harvest.n_images beyond the dataset's end harvests every example (said in the log), rather than failing at the
    first block past the end; the rerun finds nothing missing."""
    from conftest import parquet_with_a_corrupt_image

    parquet_with_a_corrupt_image(tmp_path / "data.parquet")  # 6 rows, ex2 undecodable
    config = tmp_path / "h.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"vision": "miniature", "lm": "miniature"}, "adapter": str(adapter_dir),
        "data": {"source": "parquet", "path": str(tmp_path / "data.parquet")},
        "harvest": {"n_images": 16, "block_images": 4, "batch_size": 4, "dtype": "float32",
                    "text_tokens_per_image": 4}}))
    logged = []
    run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "s.zarr"), log=logged.append)
    assert any("the dataset has 6 examples, fewer than harvest.n_images = 16" in line for line in logged)
    assert actstore.open(tmp_path / "s.zarr").image_id.values.tolist() == ["ex0", "ex1", "ex3", "ex4", "ex5"]
    assert run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "s.zarr"))["blocks"] == []


def test_host_ring_waits_for_the_writer_before_reusing_a_buffer():
    import threading
    from concurrent.futures import Future

    from actstore.harvest import HostRing

    ring = HostRing(slots=1, pin=False)
    first = ring.acquire((2, 3), (2, 4), torch.float32)
    pending: Future = Future()
    first["future"] = pending  # the writer still reads this block
    got = {}
    thread = threading.Thread(target=lambda: got.setdefault("entry", ring.acquire((2, 3), (2, 4), torch.float32)))
    thread.start()
    thread.join(timeout=0.3)
    assert thread.is_alive(), "the buffer was handed out again while the writer still held it"
    pending.set_result({})
    thread.join(timeout=5)
    assert got["entry"]["image"] is first["image"]  # same buffer, reused only now


def test_gpu_stage_times_are_read_once_their_events_complete():
    """On a GPU the harvester times stages with CUDA events and never waits for them mid-harvest."""
    from actstore.harvest import HarvestStats

    class FakeEvent:
        def __init__(self, at_ms: float, done: bool) -> None:
            self.at_ms, self.done = at_ms, done

        def query(self) -> bool:
            return self.done

        def synchronize(self) -> None:
            self.done = True

        def elapsed_time(self, end: "FakeEvent") -> float:
            return end.at_ms - self.at_ms

    stats = HarvestStats()
    stats.charge("seconds_forward", FakeEvent(0, True), FakeEvent(250, True))
    stats.charge("seconds_forward", FakeEvent(250, True), FakeEvent(1250, False))  # still running on the device
    stats.charge("seconds_copy", 1.0, 1.5)  # host clock (CPU)
    stats.settle()
    assert stats.seconds_forward == pytest.approx(0.25) and stats.seconds_copy == pytest.approx(0.5)
    stats.settle(wait=True)
    assert stats.seconds_forward == pytest.approx(1.25)


def test_gpu_time_marks_let_their_waiters_sleep(cuda_event_log):
    """The writer's threads wait for each block's copy mark; a spinning wait would take a core for a whole forward."""
    from actstore.harvest import HarvestStats

    HarvestStats.clock(torch.device("cuda", 0))
    assert cuda_event_log == [("made", {"enable_timing": True, "blocking": True}), ("record", "stream of cuda:0")]


def test_the_writer_waits_for_a_block_copy_on_the_copy_device(monkeypatch):
    """The writer's thread waits for a block's device-to-host copies with their GPU current, never GPU 0 by default
    (CUDA's current device is per thread; the main thread's choice does not reach the writer's)."""
    import contextlib
    import threading

    from actstore.harvest import wait_for_event

    current = threading.local()

    @contextlib.contextmanager
    def device(which):
        current.device = which
        yield
        current.device = None

    class Event:
        def synchronize(self) -> None:
            seen.append(getattr(current, "device", None))

    seen: list = []
    monkeypatch.setattr(torch.cuda, "device", device)
    worker = threading.Thread(target=wait_for_event, args=(Event(), torch.device("cuda", 3)))
    worker.start()
    worker.join()
    assert seen == [torch.device("cuda", 3)]


def test_a_harvest_warns_when_its_blocks_may_not_fit_on_the_disk(adapter_dir, tmp_path, monkeypatch):
    import jobs.harvest
    from actstore.location import free_bytes

    cfg = HarvestConfig.from_yaml(write_config(tmp_path / "a.yaml", adapter_dir, n_images=16))
    logged = []
    result = run_harvest(cfg, str(tmp_path / "s.zarr"), log=logged.append)
    assert not any("warning" in line for line in logged)
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    logical = group["image_resid"].nbytes + group["text_resid"].nbytes  # zarr's own account of the arrays
    schema = actstore.open(tmp_path / "s.zarr").attrs["schema"]
    assert logical == len(result["blocks"]) * StoreSchema.from_json(schema).block_bytes()
    # a new store of 32 images (4 blocks, twice the first one's bytes) on a disk with 1 KB free
    asked = []
    monkeypatch.setattr(jobs.harvest, "free_bytes", lambda out: 1000)
    monkeypatch.setattr(jobs.harvest, "space_warning",
                        lambda *args, warn=jobs.harvest.space_warning: asked.append(args[:2]) or warn(*args))
    run_harvest(HarvestConfig.from_yaml(write_config(tmp_path / "b.yaml", adapter_dir, n_images=32)),
                str(tmp_path / "s2.zarr"), log=logged.append)
    assert asked == [(2 * logical, 1000)]
    warned = [line for line in logged if "warning" in line]
    assert len(warned) == 1 and verify(tmp_path / "s2.zarr").ok  # a warning, not a stop
    assert jobs.harvest.space_warning(3_000_000_000_000, 500_000_000_000, "/scratch/a.zarr").startswith(
        "[harvest] warning: the blocks still to write hold 3000.0 GB before compression, and the file system of "
        "/scratch/a.zarr has 500.0 GB free")
    assert jobs.harvest.space_warning(3_000, 3_000, "/scratch/a.zarr") is None
    assert free_bytes("s3://bucket/acts.zarr") is None
    assert 0 < free_bytes(tmp_path / "not" / "made" / "yet.zarr") <= shutil.disk_usage(tmp_path).total


def test_a_store_records_which_examples_it_holds_not_what_training_holds_out():
    """The data settings added after the first stores (split, hub name and revision) are recorded only when set, so
    that those stores still reopen; held-out data, which a harvest does not read, is never recorded."""
    from jobs.harvest import dataset_provenance
    from jobs.train_adapter import DataSection

    first_stores = {"source", "path", "image_column", "text_column", "seed"}
    assert set(dataset_provenance(DataSection())) == first_stores
    held_out = DataSection(source="parquet", path="a.parquet", eval_path="b.parquet", eval_split="x", n_eval=7)
    assert set(dataset_provenance(held_out)) == first_stores
    hub = dataset_provenance(DataSection(source="hub", path="org/captions", split="test", revision="abc123"))
    assert (hub["split"], hub["revision"], "name" in hub) == ("test", "abc123", False)


def test_a_harvest_takes_every_example_of_its_split(adapter_dir, tmp_path):
    """A harvest holds nothing out (data.n_eval is training's): all the rows of the split it names, in order."""
    from conftest import parquet_with_a_corrupt_image

    parquet_with_a_corrupt_image(tmp_path / "data.parquet")  # 6 rows, ex2 undecodable
    config = tmp_path / "h.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"vision": "miniature", "lm": "miniature"}, "adapter": str(adapter_dir),
        "data": {"source": "parquet", "path": str(tmp_path / "data.parquet"), "split": "validation", "n_eval": 4},
        "harvest": {"n_images": 6, "block_images": 4, "batch_size": 4, "dtype": "float32",
                    "text_tokens_per_image": 4}}))
    run_harvest(HarvestConfig.from_yaml(config), str(tmp_path / "s.zarr"))
    ds = actstore.open(tmp_path / "s.zarr")
    assert ds.image_id.values.tolist() == ["ex0", "ex1", "ex3", "ex4", "ex5"]
    assert ds.attrs["provenance"]["dataset"]["split"] == "validation"


def test_inputs_prepared_on_the_loader_give_the_batch_the_model_would_make(tiny_vlm, tiny_llava_dir):
    """A harvest's loader prepares each example's model inputs on its own (``model_inputs``); the batch built from
    them equals, bit for bit, the one the model makes from the images, and for LLaVA the one its processor makes from
    the whole batch (padded on either side); the source's examples are left as they were."""
    from actstore import world
    from actstore.harvest import model_batch
    from actstore.models import LlavaVLM
    from jobs.harvest import block_job

    rows = [{**r, "image_id": f"w{i}"} for i, r in enumerate(world.generate(6, seed=12))]
    rows[2]["caption"] += ", seen from far away on a grey morning"  # prompts of different lengths
    job = block_job(rows, 0, range(1, 5), "describe: {caption}", True, tiny_vlm.host_inputs)
    assert [e["image_id"] for e in job.examples] == ["w1", "w2", "w3", "w4"]
    assert all(e["model_inputs"].shape[0] == 1 for e in job.examples) and not any("model_inputs" in r for r in rows)
    with torch.inference_mode():
        got = model_batch(tiny_vlm, job.examples, job.prompts)
        want = tiny_vlm.prepare([r["image"] for r in rows[1:5]], job.prompts)
    assert torch.equal(got.inputs_embeds, want.inputs_embeds) and torch.equal(got.input_ids, want.input_ids)
    assert torch.equal(got.image_positions, want.image_positions)

    llava = LlavaVLM.from_pretrained(str(tiny_llava_dir))
    images = [r["image"] for r in rows[1:5]]
    for side in ("right", "left"):
        llava.processor.tokenizer.padding_side = side
        job = block_job(rows, 0, range(1, 5), "{caption}", True, llava.host_inputs)
        with torch.inference_mode():
            got = model_batch(llava, job.examples, job.prompts)
        whole = llava.processor(images=images, text=[llava.prompt_template.format(text=p) for p in job.prompts],
                                return_tensors="pt", padding=True)
        assert torch.equal(got.host_input_ids, whole["input_ids"]) and (whole["attention_mask"] == 0).any()
        assert torch.equal(got.attention_mask.cpu(), whole["attention_mask"])
        assert torch.equal(got.pixel_values.cpu(), whole["pixel_values"])
        assert torch.equal(got.host_text_mask, llava.prepare(images, job.prompts).host_text_mask)