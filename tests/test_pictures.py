"""The pictures behind a store's images are found again by id in the source its provenance names, or named missing."""

from __future__ import annotations

import numpy as np

from actstore import world
from actstore.pictures import store_pictures


def test_world_pictures_are_the_generated_images_of_their_ids():
    expected = world.generate(40, seed=3)
    ids = ["world-3-000039", "world-3-000005", "world-4-000001"]  # the last one is of another world
    found, note = store_pictures({"dataset": {"source": "world", "path": None, "seed": 3}}, ids)
    assert sorted(found) == ["world-3-000005", "world-3-000039"]
    np.testing.assert_array_equal(found["world-3-000039"], expected[39]["image"])
    np.testing.assert_array_equal(found["world-3-000005"], expected[5]["image"])
    assert "world-4-000001" in note and "world-3" not in note


def test_dataset_pictures_are_found_by_id_column_and_undecodable_ones_named(tmp_path):
    from conftest import parquet_with_a_corrupt_image

    parquet_with_a_corrupt_image(tmp_path / "data.parquet")  # ids ex0..ex5 of world seed 9; ex2 is not an image
    dataset = {"source": "parquet", "path": str(tmp_path / "data.parquet"), "image_column": "image"}
    found, note = store_pictures({"dataset": dataset}, ["ex4", "ex2", "ex1"])
    expected = world.generate(6, seed=9)
    assert sorted(found) == ["ex1", "ex4"] and "ex2" in note and "ex1" not in note
    np.testing.assert_array_equal(found["ex4"], expected[4]["image"])
    np.testing.assert_array_equal(found["ex1"], expected[1]["image"])


def test_dataset_pictures_without_an_id_column_are_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import png_cells

    rows = world.generate(3, seed=1)
    table = pa.table({"picture": png_cells(rows), "caption": [r["caption"] for r in rows]})
    pq.write_table(table, tmp_path / "d.parquet")
    dataset = {"source": "parquet", "path": str(tmp_path / "d.parquet"), "image_column": "picture"}
    found, note = store_pictures({"dataset": dataset}, ["2", "7"])
    np.testing.assert_array_equal(found["2"], rows[2]["image"])
    assert list(found) == ["2"] and "7" in note


def test_a_source_that_is_gone_gives_no_pictures_and_says_why(tmp_path):
    dataset = {"source": "parquet", "path": str(tmp_path / "moved.parquet"), "image_column": "image"}
    found, note = store_pictures({"dataset": dataset}, ["ex0"])
    assert found == {} and "cannot be read here" in note and "moved.parquet" in note
    from conftest import parquet_with_a_corrupt_image

    parquet_with_a_corrupt_image(tmp_path / "here.parquet")  # where the data is now
    found, note = store_pictures({"dataset": dataset}, ["ex0"], data_path=str(tmp_path / "here.parquet"))
    assert list(found) == ["ex0"] and note == "" and dataset["path"].endswith("moved.parquet")  # provenance kept
    assert store_pictures({}, ["a"]) == ({}, "the store does not name the data its images came from")
    assert store_pictures({"dataset": "coco-val"}, ["a"]) == (
        {}, "the store names its data as 'coco-val', not as a source (world, imagefolder, ...) to read")


def test_a_hub_stores_pictures_come_from_the_commit_it_harvested(monkeypatch):
    import actstore.data

    opened = []

    def fake_open_dataset(source, path, split="train", name=None, revision=None):
        opened.append((path, revision))
        raise OSError("not here")

    monkeypatch.setattr(actstore.data, "open_dataset", fake_open_dataset)
    provenance = {"dataset": {"source": "hub", "path": "org/captions", "revision": "main"}, "data_commit": "1" * 40}
    _, note = store_pictures(provenance, ["a"])
    assert "cannot be read here: not here" in note
    store_pictures(provenance, ["a"], data_path="/copies/captions")  # a local copy: its own files, no hub commit
    store_pictures({"dataset": {"source": "hub", "path": "org/captions"}}, ["a"])  # a store from before commits
    assert opened == [("org/captions", "1" * 40), ("/copies/captions", "main"), ("org/captions", None)]
