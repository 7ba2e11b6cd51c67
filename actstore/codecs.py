"""Chunk codecs: the Zarr v3 codec chain a store declares, and a thread-friendly encoder producing its exact bytes.

The chain is ``bytes(little) -> [zstd | blosc] -> crc32c``. We encode chunks ourselves rather than through
``zarr.Array.__setitem__`` because zarr's write path serialises on its event loop (measured at ~45% of an H100
host's disk bandwidth, see docs/store-format.md); numcodecs, crc32c and large numpy copies release the GIL, so a plain thread
pool encodes in parallel. Readers (zarr-python, TensorStore) decode these bytes with their own codecs, and the
tests hold us to that.
"""

from __future__ import annotations

from typing import Any

import crc32c
import numcodecs
import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from actstore.schema import StoreSchema

_EMPTY = np.uint64(2**64 - 1)


def zarr_compressors(codec: str, clevel: int, itemsize: int) -> list[Any]:
    """The zarr bytes-to-bytes codecs for ``codec``, checksum last."""
    if codec == "none":
        compressors: list[Any] = []
    elif codec == "zstd":
        compressors = [ZstdCodec(level=clevel, checksum=False)]
    elif codec in ("blosc-zstd", "blosc-lz4"):
        cname = codec.split("-")[1]
        compressors = [BloscCodec(typesize=itemsize, cname=cname, clevel=clevel, shuffle="bitshuffle", blocksize=0)]
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return compressors + [Crc32cCodec()]


def array_codec_kwargs(schema: StoreSchema, chunks: tuple[int, ...], shard: tuple[int, ...] | None) -> dict[str, Any]:
    """Keyword arguments for ``zarr.create_array`` that give an activation array our codec chain."""
    itemsize = schema.numpy_dtype.itemsize
    compressors = zarr_compressors(schema.codec, schema.clevel, itemsize)
    if shard is None:
        return {"chunks": chunks, "serializer": BytesCodec(endian="little"), "compressors": compressors}
    # Declared explicitly (rather than zarr's `shards=`) so that the stored index codecs are exactly what
    # ShardEncoder below writes.
    sharding = ShardingCodec(
        chunk_shape=chunks,
        codecs=[BytesCodec(endian="little"), *compressors],
        index_codecs=[BytesCodec(endian="little"), Crc32cCodec()],
        index_location="end",
    )
    return {"chunks": shard, "serializer": sharding, "compressors": None, "filters": None}


def _append_crc32c(payload: bytes | memoryview) -> memoryview:
    # Both steps release the GIL (crc32c's gil_release_mode, numpy's large copies), unlike google_crc32c.value and
    # bytes.join: the harvester's Python thread keeps launching GPU work while writer threads checksum chunks.
    data = np.frombuffer(payload, dtype=np.uint8)
    out = np.empty(len(data) + 4, dtype=np.uint8)
    out[: len(data)] = data
    out[len(data) :] = np.frombuffer(np.uint32(crc32c.crc32c(data, gil_release_mode=1)).tobytes(), dtype=np.uint8)
    return memoryview(out)


class ChunkEncoder:
    """Encodes one chunk's array into the bytes of the declared codec chain; safe to call from many threads."""

    def __init__(self, codec: str, clevel: int) -> None:
        self.codec = codec
        if codec == "none":
            self._compressor = None
        elif codec == "zstd":
            self._compressor = numcodecs.Zstd(level=clevel, checksum=False)
        else:
            cname = codec.split("-")[1]
            self._compressor = numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=numcodecs.Blosc.BITSHUFFLE)

    def encode(self, chunk: np.ndarray) -> memoryview:
        """Bytes of ``chunk`` (C order, little-endian) after compression and checksum."""
        chunk = np.ascontiguousarray(chunk)
        if chunk.dtype.byteorder == ">":
            chunk = chunk.astype(chunk.dtype.newbyteorder("<"))
        # Blosc takes its typesize from the buffer; ml_dtypes' bf16 is not a buffer-protocol type, uint16 is.
        raw = chunk.view(np.dtype(f"<u{chunk.dtype.itemsize}")).reshape(-1)
        payload = raw.data if self._compressor is None else self._compressor.encode(raw)
        return _append_crc32c(payload)


def encode_shard(encoder: ChunkEncoder, block: np.ndarray, chunk_images: int) -> bytes:
    """Bytes of a shard holding ``block`` (images, tokens, d) as inner chunks of ``chunk_images`` images.

    Layout per the Zarr v3 sharding spec: inner chunks back to back, then an index of (offset, nbytes) uint64
    pairs in C order of the inner-chunk grid, encoded with ``bytes`` + ``crc32c``.
    """
    n_inner = block.shape[0] // chunk_images
    parts, index, offset = [], np.full((n_inner, 2), _EMPTY, dtype="<u8"), 0
    for i in range(n_inner):
        data = encoder.encode(block[i * chunk_images : (i + 1) * chunk_images])
        index[i] = (offset, len(data))
        offset += len(data)
        parts.append(data)
    parts.append(_append_crc32c(index.tobytes()))
    return b"".join(parts)
