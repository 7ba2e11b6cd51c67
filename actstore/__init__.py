"""actstore: an activation store and batch SAE analysis for vision-language models."""

__version__ = "0.1.0"

import importlib.metadata as _metadata  # noqa: E402

try:  # metadata, not `import kernels`: that would cost every command torch's import time
    _hf_kernels = _metadata.version("kernels")
except _metadata.PackageNotFoundError:
    _hf_kernels = None
if _hf_kernels is not None:  # kernels/__init__.py says why, where ours comes first on sys.path
    raise ImportError(
        f"Hugging Face's `kernels` {_hf_kernels} is installed in this environment and hides (or is hidden by) "
        "actstore's Triton package of that import name. Use an environment without it (`pip uninstall kernels`) and "
        "transformers < 5.25, which does not need it (as pyproject.toml pins).")

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
