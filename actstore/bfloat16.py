"""The zarr-extensions ``bfloat16`` data type for zarr-python, and bf16 conversions between torch and numpy.

zarr-python 3.1 has no bfloat16, while TensorStore and zarrs read the zarr-extensions ``bfloat16`` natively.
We register that name (through the ``zarr.data_type`` entry point and on import) backed by ``ml_dtypes.bfloat16``,
so stores written here open correctly in every Zarr v3 implementation that knows the type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.common import DataTypeValidationError
from zarr.core.dtype.npy.float import BaseFloat

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True, kw_only=True)
class BFloat16(BaseFloat):  # type: ignore[type-arg]
    """Zarr v3 ``bfloat16``: 1 sign, 8 exponent, 7 mantissa bits, little-endian (no Zarr v2 encoding)."""

    dtype_cls = type(BFLOAT16)
    _zarr_v3_name: ClassVar[str] = "bfloat16"
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()

    @property
    def item_size(self) -> int:
        """Bytes per element."""
        return 2

    @classmethod
    def from_native_dtype(cls, dtype: Any) -> "BFloat16":
        """Wrap ``ml_dtypes.bfloat16``."""
        if cls._check_native_dtype(dtype):
            return cls(endianness="little")
        raise DataTypeValidationError(f"Invalid data type: {dtype}. Expected {BFLOAT16}")

    def to_native_dtype(self) -> np.dtype:
        """The numpy dtype (``ml_dtypes.bfloat16``); it has one byte order only."""
        return BFLOAT16


def register() -> None:
    """Make zarr-python know ``bfloat16`` (idempotent)."""
    data_type_registry.register(BFloat16._zarr_v3_name, BFloat16)


register()


def to_numpy(array: Any) -> np.ndarray:
    """A numpy view of a numpy array or a CPU torch tensor, bf16 tensors as ``ml_dtypes.bfloat16`` (no copy)."""
    if isinstance(array, np.ndarray):
        return array
    import torch

    if isinstance(array, torch.Tensor):
        tensor = array.detach()
        if tensor.device.type != "cpu":
            raise ValueError(f"expected a CPU tensor, got one on {tensor.device}; copy it to host memory first")
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(BFLOAT16)
        return tensor.numpy()
    return np.asarray(array)


def to_torch(array: np.ndarray) -> Any:
    """A torch tensor sharing memory with ``array``; ``ml_dtypes.bfloat16`` becomes ``torch.bfloat16``."""
    import torch

    if array.dtype == BFLOAT16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
