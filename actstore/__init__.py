"""actstore: an activation store and batch SAE analysis for vision-language models."""

__version__ = "0.1.0"

from actstore import bfloat16 as _bfloat16  # noqa: E402,F401  (registers zarr's bfloat16 data type)
from actstore.errors import (  # noqa: E402
    ChunkCorruptError,
    NotAStoreError,
    SchemaMismatchError,
    SchemaVersionError,
    StoreError,
    StoreWriteError,
)
from actstore.reader import open  # noqa: E402,A004
from actstore.schema import StoreSchema  # noqa: E402
from actstore.writer import StoreWriter, TextTokens  # noqa: E402

__all__ = [
    "ChunkCorruptError",
    "NotAStoreError",
    "SchemaMismatchError",
    "SchemaVersionError",
    "StoreError",
    "StoreSchema",
    "StoreWriteError",
    "StoreWriter",
    "TextTokens",
    "open",
    "__version__",
]
