"""Store schema v1: the structural parameters of a store, its attributes, and the names of its arrays and keys."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from actstore.bfloat16 import BFLOAT16
from actstore.errors import SchemaMismatchError

SCHEMA_VERSION = 1
ATTRS_KEY = "actstore"
LAYER_CONVENTION = (
    "state 0 = embedding output = input of the first block (blocks.0.hook_resid_pre); "
    "state i >= 1 = output of the i-th block (blocks.{i-1}.hook_resid_post, blocks numbered from 0)"
)
DTYPES = {"bfloat16": BFLOAT16, "float16": np.dtype("float16"), "float32": np.dtype("float32")}
CODECS = ("none", "zstd", "blosc-zstd", "blosc-lz4")

IMAGE_RESID = "image_resid"
TEXT_RESID = "text_resid"
BLOCK_STATUS = "block_status"
BLOCK_SKIPPED = "block_skipped"
# Groups `actstore analyze` adds to a store: finished analyses (one per suite), and finished layers of unfinished ones.
ANALYSIS = "analysis"
ANALYSIS_PARTIAL = "analysis_partial"
# The attribute an analysis group gets last, once all its arrays are written: a group without it was cut short.
ANALYSIS_SAVED_MARK = "fingerprint"


@dataclass(frozen=True)
class StoreSchema:
    """Structural parameters of a store; two writers of one store must agree on all of them.

    A *block* is the unit of writing: ``block_images`` images x all layers, stored as one chunk per layer (or one
    shard per layer when ``chunk_images`` is set, then holding ``block_images / chunk_images`` inner chunks), plus a
    fixed region of ``block_images * text_tokens_per_image`` slots of the text-token axis. Blocks never share a
    key, so processes writing disjoint blocks need no locks.
    """

    layers: tuple[int, ...]
    image_tokens: int
    d_model: int
    dtype: str = "bfloat16"
    capacity: int = 0
    block_images: int = 64
    chunk_images: int | None = None
    text_tokens_per_image: int = 0
    codec: str = "zstd"
    clevel: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        problems = []
        if not self.layers:
            problems.append("layers is empty")
        if len(set(self.layers)) != len(self.layers):
            problems.append(f"layers has duplicates: {self.layers}")
        if any(x < 0 for x in self.layers):
            problems.append(f"layers must be residual-state indices >= 0, got {self.layers}")
        for name in ("image_tokens", "d_model", "block_images"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.capacity < 0 or self.text_tokens_per_image < 0:
            problems.append("capacity and text_tokens_per_image must be >= 0")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.codec not in CODECS:
            problems.append(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.chunk_images is not None and (self.chunk_images < 1 or self.block_images % self.chunk_images):
            problems.append(
                f"chunk_images ({self.chunk_images}) must divide block_images ({self.block_images}) for sharding"
            )
        if problems:
            raise ValueError("invalid StoreSchema: " + "; ".join(problems))
        # Capacity is whole blocks so that every block is a whole chunk / shard.
        object.__setattr__(self, "capacity", self.blocks_for(max(self.capacity, 1)) * self.block_images)

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy dtype of the activations."""
        return DTYPES[self.dtype]

    @property
    def sharded(self) -> bool:
        """Whether a block is a shard of several inner chunks."""
        return self.chunk_images is not None and self.chunk_images != self.block_images

    @property
    def n_blocks(self) -> int:
        """Blocks in the current capacity."""
        return self.capacity // self.block_images

    @property
    def text_slots_per_block(self) -> int:
        """Slots of the text-token axis owned by one block."""
        return self.block_images * self.text_tokens_per_image

    @property
    def text_capacity(self) -> int:
        """Slots of the text-token axis at the current capacity."""
        return self.n_blocks * self.text_slots_per_block

    def blocks_for(self, n_images: int) -> int:
        """Number of blocks that hold ``n_images`` images."""
        return math.ceil(n_images / self.block_images)

    def image_block_bytes(self) -> int:
        """Logical bytes of one layer of one block of image activations (one chunk or shard)."""
        return self.block_images * self.image_tokens * self.d_model * self.numpy_dtype.itemsize

    def block_bytes(self) -> int:
        """Logical bytes of one whole block: its image and text activations at every layer."""
        text = self.text_slots_per_block * self.d_model * self.numpy_dtype.itemsize
        return len(self.layers) * (self.image_block_bytes() + text)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (stored in the group attributes)."""
        out = dataclasses.asdict(self)
        out["layers"] = list(self.layers)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StoreSchema":
        """Inverse of :meth:`to_json`."""
        return cls(**{**data, "layers": tuple(data["layers"])})

    def with_capacity(self, capacity: int) -> "StoreSchema":
        """The same schema with another capacity (rounded up to whole blocks)."""
        return dataclasses.replace(self, capacity=capacity)


# Fields that may differ between a store and a writer reopening it: capacity grows on demand.
_REOPEN_IGNORED = {"capacity"}


def schema_differences(stored: StoreSchema, requested: StoreSchema) -> list[str]:
    """Human-readable list of the structural fields in which ``requested`` differs from ``stored``."""
    a, b = stored.to_json(), requested.to_json()
    return [
        f"{k}: store has {a[k]!r}, requested {b[k]!r}" for k in a if k not in _REOPEN_IGNORED and a[k] != b[k]
    ]


# Provenance keys that stores written before they existed lack: such a store is reopened without comparing them.
PROVENANCE_ADDED_LATER = {"weights", "data_commit"}


def provenance_differences(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Differences in the provenance keys the writer gives (model, adapter, dataset, config identities), each named
    down to the setting that differs (``'model.dtype'``)."""
    out = []
    for key in sorted(requested):
        if key not in stored and key in PROVENANCE_ADDED_LATER:
            continue
        out += _value_differences(key, stored[key] if key in stored else _NONE, requested[key])
    return out


_NONE = object()  # a key the store lacks, told apart from one it records as None


def _value_differences(name: str, stored: Any, requested: Any) -> list[str]:
    """``name``'s differences, one per differing key where both sides are dicts (a section of a job config)."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        return [diff for key in sorted(set(stored) | set(requested), key=str)
                for diff in _value_differences(f"{name}.{key}", stored.get(key, _NONE), requested.get(key, _NONE))]
    if stored is _NONE:
        return [f"provenance {name!r}: store has none, requested {requested!r}"]
    if requested is _NONE:
        return [f"provenance {name!r}: store has {stored!r}, requested none"]
    return [f"provenance {name!r}: store has {stored!r}, requested {requested!r}"] if stored != requested else []


def check_compatible(
    stored: StoreSchema, requested: StoreSchema, stored_prov: dict[str, Any], requested_prov: dict[str, Any], where: str
) -> None:
    """Raise :class:`SchemaMismatchError` listing every difference, or return if the writer may reopen."""
    diffs = schema_differences(stored, requested) + provenance_differences(stored_prov, requested_prov)
    if diffs:
        raise SchemaMismatchError(f"store {where} does not match the requested schema:\n  " + "\n  ".join(diffs))


@dataclass
class StoreAttributes:
    """What the store's group attributes hold under the ``actstore`` key."""

    schema: StoreSchema
    provenance: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    actstore_version: str = ""
    schema_version: int = SCHEMA_VERSION
    layer_convention: str = LAYER_CONVENTION

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "schema_version": self.schema_version,
            "schema": self.schema.to_json(),
            "provenance": self.provenance,
            "created": self.created,
            "actstore_version": self.actstore_version,
            "layer_convention": self.layer_convention,
            "dtype": self.schema.dtype,
        }


def image_chunk_key(layer_index: int, block: int) -> str:
    """Key of the chunk (or shard) holding one layer of one block of image activations."""
    return f"{IMAGE_RESID}/c/{layer_index}/{block}/0/0"


def text_chunk_key(layer_index: int, block: int) -> str:
    """Key of the chunk holding one layer of one block's text-token region."""
    return f"{TEXT_RESID}/c/{layer_index}/{block}/0"


def marker_key(block: int) -> str:
    """Key of a block's completion marker: its one chunk of ``block_status`` (images, text tokens written)."""
    return f"{BLOCK_STATUS}/c/{block}/0"


def skip_record_key(block: int) -> str:
    """Key of a block's record of skipped inputs (absent when it skipped none: zarr stores no all-fill chunk)."""
    return f"{BLOCK_SKIPPED}/c/{block}"


def _block_in_key(key: str, key_of: Callable[[int], str]) -> int | None:
    """The block ``b`` with ``key_of(b) == key`` (its index is the key's third part, ``<array>/c/<b>``), else None."""
    parts = key.split("/")
    return int(parts[2]) if len(parts) > 2 and parts[2].isdigit() and key == key_of(int(parts[2])) else None


def skip_record_block(key: str) -> int | None:
    """The block whose skip record ``key`` is, or None for any other key (a temporary file beside it included)."""
    return _block_in_key(key, skip_record_key)


def marker_block(key: str) -> int | None:
    """The block whose completion marker ``key`` is, or None for any other key (a temporary file beside it included)."""
    return _block_in_key(key, marker_key)
