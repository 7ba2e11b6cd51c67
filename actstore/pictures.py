"""The pictures behind a store's images: found again by image id in the data source the store's provenance names
(the generated world, or a dataset on disk through ``actstore.data``), for figures that show what the model saw.

A store holds activations, not pixels; the harvest records where its images came from. Where that source is gone or
moved (a store copied to another machine), the pictures are simply not found: callers draw without them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

WORLD_ID = re.compile(r"world-(\d+)-(\d+)$")


def world_pictures(seed: int, image_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The generated world's images of ``image_ids`` (ids ``world-<seed>-<index>``; others are not found)."""
    from actstore import world

    wanted = {}
    for image_id in image_ids:
        match = WORLD_ID.match(image_id)
        if match and int(match.group(1)) == seed:
            wanted[image_id] = int(match.group(2))
    if not wanted:
        return {}
    # The world is drawn from one random stream, so image i needs the i before it (~12k images/s on one core).
    examples = world.generate(max(wanted.values()) + 1, seed=seed)
    return {image_id: examples[i]["image"] for image_id, i in wanted.items()}


def row_of_ids(ds: Any, image_ids: Sequence[str]) -> dict[str, int]:
    """Which row of a ``datasets`` dataset holds each image id: by its ``id`` / ``image_id`` column as the harvest
    names images, else the id is the row number."""
    column = next((c for c in ("id", "image_id") if c in ds.column_names), None)
    if column is None:
        return {i: int(i) for i in image_ids if i.isdigit() and int(i) < len(ds)}
    wanted = set(image_ids)
    return {str(value): row for row, value in enumerate(ds[column]) if str(value) in wanted}


def dataset_pictures(dataset: dict[str, Any], image_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The images of ``image_ids`` in the dataset on disk that a harvest's ``dataset`` provenance names (images that
    no longer decode are not found)."""
    from actstore.data import decode_image, open_dataset

    source, path = dataset["source"], dataset["path"]
    ds = open_dataset(source, path, dataset.get("split", "train"), dataset.get("name"), dataset.get("revision"))
    if source == "llava_json":
        image_column, base_dir = "image", Path(path).parent
    else:
        image_column, base_dir = dataset.get("image_column", "image"), None
    found = {}
    for image_id, row in row_of_ids(ds, image_ids).items():
        try:
            found[image_id] = np.asarray(decode_image(ds[row][image_column], base_dir))
        except Exception:  # noqa: BLE001 - PIL raises many types; a picture that does not decode is not found
            continue
    return found


def store_pictures(provenance: dict[str, Any], image_ids: Sequence[str],
                   data_path: str | None = None) -> tuple[dict[str, np.ndarray], str]:
    """RGB pixels (H x W x 3, uint8) of those of ``image_ids`` whose picture the store's data source still has (at
    ``data_path`` instead of the recorded path, for data that moved), and a note naming what was not found and why
    ("" when every one was)."""
    dataset = (provenance or {}).get("dataset") or {}
    if not isinstance(dataset, dict):  # a store written from one's own code may name its data in a word
        return {}, f"the store names its data as {dataset!r}, not as a source (world, imagefolder, ...) to read"
    dataset = dict(dataset)
    if data_path is not None:
        dataset["path"] = str(data_path)
    elif (provenance or {}).get("data_commit"):  # the hub's version of the data that was harvested, not today's
        dataset["revision"] = provenance["data_commit"]
    source = dataset.get("source")
    try:
        if source == "world":
            found = world_pictures(int(dataset.get("seed", 0)), image_ids)
        elif source and dataset.get("path"):
            found = dataset_pictures(dataset, image_ids)
        else:
            return {}, "the store does not name the data its images came from"
    except Exception as exc:  # noqa: BLE001 - a source moved or gone: the figures go without pictures
        return {}, f"the images' source ({source} {dataset.get('path') or ''}) cannot be read here: {exc}"
    missing = [i for i in image_ids if i not in found]
    note = f"no picture found for {', '.join(missing)} in the images' source ({source})" if missing else ""
    return found, note
