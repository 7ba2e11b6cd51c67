"""Image-caption data through ``datasets``: image folders with metadata, parquet / arrow files with an image and a
text column, LLaVA-style JSON conversations, and datasets on the Hugging Face hub (or in its cache, offline). Images
that cannot be decoded are skipped, counted and listed, never a crash of a long job."""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

if TYPE_CHECKING:  # PIL is imported where images are decoded, not when actstore is
    from PIL import Image

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


def prefetched(load: Callable[[Item], Loaded], items: Sequence[Item], name: str = "loader") -> Iterator[Loaded]:
    """``load(item)`` for each item in order, each computed on one loader thread while the caller works on the one
    before (the only thread that calls ``load``, so what it reads need not be thread-safe)."""
    if not items:
        return
    with ThreadPoolExecutor(1, thread_name_prefix=name) as loader:
        pending = loader.submit(load, items[0])
        for following in items[1:]:
            loaded = pending.result()
            pending = loader.submit(load, following)
            yield loaded
        yield pending.result()


SOURCES = ("world", "imagefolder", "parquet", "arrow", "llava_json", "hub")
# datasets prepares a hub dataset under <cache>/<namespace>___<name>/<config>/<version>/<commit>/ (local files under
# a hash of another length): the folder of its arrow files names the commit whose data was loaded.
HUB_COMMIT_FOLDER = re.compile(r"/([0-9a-f]{40})/[^/]+$")


@dataclass
class SkipLog:
    """Examples that were skipped, and why."""

    skipped: list[dict[str, str]] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set, repr=False)

    def add(self, example_id: str, reason: str) -> None:
        """Record a skipped example (once, however often an epoch loop meets it)."""
        if example_id not in self._seen:
            self._seen.add(example_id)
            self.skipped.append({"id": example_id, "reason": reason})

    def __len__(self) -> int:
        return len(self.skipped)


def decode_image(value: Any, base_dir: Path | None = None) -> "Image.Image":
    """A PIL RGB image from a PIL image, a path, bytes, or a datasets ``{"bytes", "path"}`` dict."""
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else _path(value["path"], base_dir)
        image = Image.open(source)
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    else:
        image = Image.open(_path(str(value), base_dir))
    image.load()  # decode now, so a corrupt file fails here and not later in the batch
    return image.convert("RGB")


def _path(path: str, base_dir: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or base_dir is None else base_dir / p


def check_source(source: str, path: str | None, name: str | None = None, revision: str | None = None) -> None:
    """A ValueError naming what keeps a data section from naming a dataset: an unknown source, a source read from files
    without a path, or a configuration or revision for a source other than ``hub``."""
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
    if source != "world" and path is None:
        raise ValueError(f"data.source {source!r} needs data.path")
    if (name is not None or revision is not None) and source != "hub":
        raise ValueError(f"data.name and data.revision name a hub dataset's configuration and version; the "
                         f"{source!r} source has neither")


def open_dataset(source: str, path: str, split: str = "train", name: str | None = None,
                 revision: str | None = None) -> Any:
    """The ``datasets`` dataset of a source (memory-mapped, random access), images left undecoded: for ``hub``,
    ``path`` is a hub dataset id (or a local dataset folder), ``name`` its configuration and ``revision`` a branch,
    tag or commit."""
    import datasets

    if source == "world":
        raise ValueError(f"data source must be one of {SOURCES[1:]} here, got {source!r}")
    check_source(source, path, name, revision)
    if source == "llava_json":
        records = json.loads(Path(path).read_text())
        rows = [{"id": str(r.get("id", i)), "image": r.get("image"), "text": _llava_answer(r)}
                for i, r in enumerate(records)]
        return datasets.Dataset.from_list(rows)
    if source == "hub":
        ds = datasets.load_dataset(path, name, split=split, revision=revision)
        commit = loaded_commit(ds)
        if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision) and commit not in (None, revision):
            raise ValueError(f"data.revision is commit {revision} of {path}, but datasets loaded commit {commit} "
                             "(offline, datasets takes the latest version in its cache whatever the revision): fill "
                             "the cache with the pinned commit, or pin the cached one")
    else:
        kwargs = {"data_dir": path} if source == "imagefolder" else {"data_files": {split: str(Path(path))}}
        ds = datasets.load_dataset(source, split=split, **kwargs)
    for column, feature in ds.features.items():
        if isinstance(feature, datasets.Image):  # we decode, so that a corrupt image is a skip, not a crash
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def loaded_commit(ds: Any) -> str | None:
    """The hub commit whose data ``ds`` holds (online, the one its revision resolved to; offline, the cached one
    datasets fell back on), read off its arrow files' folder; None for data that did not come from the hub."""
    for cache_file in getattr(ds, "cache_files", None) or []:
        match = HUB_COMMIT_FOLDER.search(Path(cache_file["filename"]).as_posix())
        if match:
            return match.group(1)
    return None


def _llava_answer(record: dict[str, Any]) -> str:
    turns = record.get("conversations") or []
    answers = [t.get("value", "") for t in turns if t.get("from") in ("gpt", "assistant")]
    return answers[0].strip() if answers else ""


def check_columns(columns: list[str], image_column: str, text_column: str, where: str) -> None:
    """Raise a clear error when the image or text column is missing."""
    missing = [c for c in (image_column, text_column) if c not in columns]
    if missing:
        raise ValueError(f"{where}: no column {' or '.join(repr(m) for m in missing)}; the columns found are "
                         f"{columns}. Set data.image_column / data.text_column")


class ImageTextSource:
    """Random access to image-caption examples; ``source[i]`` is ``{"image_id", "image", "caption"}``, or None
    (recorded in ``skips``) when the image cannot be decoded."""

    def __init__(self, ds: Any, image_column: str, text_column: str, base_dir: Path | None = None,
                 where: str = "dataset") -> None:
        check_columns(list(ds.column_names), image_column, text_column, where)
        self.ds, self.image_column, self.text_column, self.base_dir = ds, image_column, text_column, base_dir
        self.skips = SkipLog()
        self.skipped_rows: dict[int, dict[str, str]] = {}

    def __len__(self) -> int:
        return len(self.ds)

    @property
    def commit(self) -> str | None:
        """The hub commit its examples were loaded from (None where they did not come from the hub)."""
        return loaded_commit(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        row = self.ds[int(i)]
        # An id column where there is one; webdataset shards name each sample by its key.
        example_id = str(row.get("id", row.get("image_id", row.get("__key__", i))))
        try:
            image = decode_image(row[self.image_column], self.base_dir)
        except Exception as exc:  # PIL raises many types for bad files; each is a skip, not a crash
            reason = f"{type(exc).__name__}: {exc}"
            self.skips.add(example_id, reason)
            self.skipped_rows[int(i)] = {"id": example_id, "reason": reason}
            return None
        return {"image_id": example_id, "image": image, "caption": str(row[self.text_column])}


def _source_of(section: Any, ds: Any, path: str) -> ImageTextSource:
    """The examples of ``ds``, read with a data section's columns (llava_json: its own, relative to its file)."""
    if section.source == "llava_json":
        return ImageTextSource(ds, "image", "text", Path(path).parent, where=path)
    return ImageTextSource(ds, section.image_column, section.text_column, where=path)


def _open_section(section: Any, path: str | None, split: str) -> Any:
    """The dataset a data section names at ``path`` and ``split``."""
    return open_dataset(section.source, path, split, section.name, section.revision)


def image_text_source(section: Any, limit: int | None = None) -> ImageTextSource:
    """The examples of a config's data section (``source``, ``path``, ``split``, columns), the first ``limit`` of
    them."""
    ds = _open_section(section, section.path, section.split)
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return _source_of(section, ds, section.path)


def train_and_held_out(section: Any) -> tuple[ImageTextSource, ImageTextSource]:
    """Training examples (the first ``n_train``) and held-out ones (the first ``n_eval`` of ``eval_path`` /
    ``eval_split`` where a section names another split or file; else the last ``n_eval`` of the training data,
    which training then never sees)."""
    split = section.split
    eval_path, eval_split = section.eval_path or section.path, section.eval_split or split
    train = _open_section(section, section.path, split)
    if (eval_path, eval_split) != (section.path, split):
        held = _open_section(section, eval_path, eval_split)
        held = held.select(range(min(section.n_eval, len(held))))
        cut = len(train)
    else:
        if len(train) <= section.n_eval:
            raise ValueError(f"{section.path} holds {len(train)} examples: holding out data.n_eval = "
                             f"{section.n_eval} of them leaves none to train on; lower data.n_eval or name held-out "
                             "data with data.eval_split or data.eval_path")
        cut = len(train) - section.n_eval
        held = train.select(range(cut, len(train)))
    train = train.select(range(min(section.n_train, cut)))
    return _source_of(section, train, section.path), _source_of(section, held, eval_path)
