"""Chunk codecs: the Zarr v3 codec chain a store declares, and thread-friendly encoders and decoders of its bytes.

The chain is ``bytes(little) -> [zstd | blosc] -> crc32c``. We encode chunks ourselves rather than through
``zarr.Array.__setitem__`` because zarr's write path serialises on its event loop (measured at ~45% of an H100
host's disk bandwidth, see docs/store-format.md); numcodecs, crc32c and large numpy copies release the GIL, so a
plain thread pool encodes in parallel. Reads have the same bottleneck: zarr-python 3.1 checks each chunk's crc32c
and copies it into the output array on its one event-loop thread, so Dask's threads reading whole chunks through it
wait on that thread (on a 2-core VM, from the page cache: 0.30-0.40 GB/s through zarr, 0.55-0.71 GB/s decoding in
the threads). ``ChunkDecoder`` decodes in the calling thread. Other readers (zarr-python, TensorStore) decode these
bytes with their own codecs, and the tests hold us to that.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import crc32c
import numcodecs
import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, VLenUTF8Codec, ZstdCodec

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


Buffer = bytes | bytearray | memoryview


def crc32c_suffix(payload: Buffer) -> bytes:
    """The 4 bytes (little-endian) that the ``crc32c`` codec stores after ``payload``."""
    # crc32c's gil_release_mode releases the GIL, unlike google_crc32c: the harvester's Python thread keeps launching
    # GPU work while writer threads checksum chunks.
    return crc32c.crc32c(payload, gil_release_mode=1).to_bytes(4, "little")


def _with_crc32c(payload: Buffer) -> list[Buffer]:
    return [payload, crc32c_suffix(payload)]


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

    def encode(self, chunk: np.ndarray) -> list[Buffer]:
        """The stored bytes of ``chunk`` (C order, little-endian) after compression and checksum, as buffers to be
        written back to back (``b"".join`` for one object): the payload, never copied, and its crc32c.

        Joining them here would copy every chunk once more: on the dev VM (19 MB bf16 chunks) encoding without
        compression ran at 3.2 / 4.9 GB/s joined against 5.4 / 10.5 GB/s not (one / two threads), zstd-1 at 0.82
        against 0.87 GB/s (two threads)."""
        chunk = np.ascontiguousarray(chunk)
        if chunk.dtype.byteorder == ">":
            chunk = chunk.astype(chunk.dtype.newbyteorder("<"))
        # Blosc takes its typesize from the buffer; ml_dtypes' bf16 is not a buffer-protocol type, uint16 is.
        raw = chunk.view(np.dtype(f"<u{chunk.dtype.itemsize}")).reshape(-1)
        payload = raw.data if self._compressor is None else self._compressor.encode(raw)
        return _with_crc32c(payload)


def encoded_size(parts: Sequence[Buffer]) -> int:
    """Bytes of an encoded chunk or shard given as buffers."""
    return sum(memoryview(part).nbytes for part in parts)


def encode_shard(encoder: ChunkEncoder, block: np.ndarray, chunk_images: int) -> list[Buffer]:
    """The bytes of a shard holding ``block`` (images, tokens, d) as inner chunks of ``chunk_images`` images, as
    buffers to be written back to back.

    Layout per the Zarr v3 sharding spec: inner chunks back to back, then an index of (offset, nbytes) uint64
    pairs in C order of the inner-chunk grid, encoded with ``bytes`` + ``crc32c``.
    """
    n_inner = block.shape[0] // chunk_images
    parts, index, offset = [], np.full((n_inner, 2), _EMPTY, dtype="<u8"), 0
    for i in range(n_inner):
        data = encoder.encode(block[i * chunk_images : (i + 1) * chunk_images])
        size = encoded_size(data)
        index[i] = (offset, size)
        offset += size
        parts += data
    return parts + _with_crc32c(index.tobytes())


def _checked_payload(data: memoryview, what: str) -> memoryview:
    """``data`` without the crc32c stored after it (:func:`crc32c_suffix`); ValueError naming ``what`` if it does not
    match."""
    if len(data) < 4:
        raise ValueError(f"{what} of {len(data)} bytes is shorter than its crc32c checksum")
    payload = data[:-4]
    stored, computed = int.from_bytes(data[-4:], "little"), crc32c.crc32c(payload, gil_release_mode=1)
    if stored != computed:
        raise ValueError(f"{what} crc32c mismatch: stored {stored:#010x}, computed {computed:#010x}")
    return payload


def _zstd_content_size(frame: memoryview) -> int | None:
    """The decompressed size a zstd frame header declares (RFC 8878, 3.1.1.1), or None if it declares none."""
    if len(frame) < 6 or bytes(frame[:4]) != b"\x28\xb5\x2f\xfd":
        raise ValueError("not a zstd frame")
    descriptor = frame[4]
    single_segment = bool(descriptor & 0x20)
    size_bytes = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
    start = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 0x03]
    if size_bytes == 0:
        return None
    size = int.from_bytes(frame[start : start + size_bytes], "little")
    return size + 256 if size_bytes == 2 else size


def _blosc_content_size(frame: memoryview) -> int:
    """The decompressed size in a blosc header (bytes 4-7, little-endian)."""
    if len(frame) < 16:
        raise ValueError("not a blosc frame")
    return int.from_bytes(frame[4:8], "little")


class StringChunkDecoder:
    """Decodes one stored chunk of a string array (zarr's ``vlen-utf8``, then optionally zstd and crc32c: what
    zarr-python writes for the store's image ids and prompts) into an object array of ``str``, in the calling thread.
    It reads what zarr reads; zarr's decode of each of a store's small per-block chunks costs ~0.2 ms on its one
    event-loop thread, several seconds for the 12500 of a 100k-image store (benchmarks/bench_open.py)."""

    def __init__(self, shape: tuple[int, ...], compressed: bool, checksummed: bool) -> None:
        self.shape, self.compressed, self.checksummed = tuple(shape), compressed, checksummed
        self.size = int(np.prod(self.shape))
        self._strings, self._zstd = numcodecs.VLenUTF8(), numcodecs.Zstd()

    @classmethod
    def for_codecs(cls, codecs: Any, shape: tuple[int, ...]) -> "StringChunkDecoder | None":
        """A decoder for chunks of ``shape`` encoded with ``codecs``, if that is vlen-utf8 [-> zstd] [-> crc32c];
        else None."""
        codecs = list(codecs or ())
        if not codecs or not isinstance(codecs[0], VLenUTF8Codec):
            return None
        checksummed = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
        middle = codecs[1:-1] if checksummed else codecs[1:]
        if len(middle) > 1 or (middle and not isinstance(middle[0], ZstdCodec)):
            return None
        return cls(shape, compressed=bool(middle), checksummed=checksummed)

    def decode(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        """The chunk's strings (an object array of its shape) from its stored bytes; ValueError if they are damaged."""
        payload = memoryview(data).cast("B")
        if self.checksummed:
            payload = _checked_payload(payload, "chunk")
        try:
            raw = self._zstd.decode(payload) if self.compressed else payload
            values = self._strings.decode(raw)
        except Exception as exc:  # numcodecs raises RuntimeError (zstd) or ValueError (a cut vlen header)
            raise ValueError(f"chunk does not decode ({exc})") from exc
        if values.size != self.size:
            raise ValueError(f"chunk holds {values.size} strings, its shape {self.shape} needs {self.size}")
        return values.reshape(self.shape)


class ChunkDecoder:
    """Decodes one stored chunk's bytes of our codec chain into its array, in the calling thread; safe to call from
    many threads. The checksum is verified before anything is decompressed, and a chunk of the wrong size is an
    error, never a partly filled array."""

    def __init__(self, compressor: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        if compressor not in ("none", "zstd", "blosc"):
            raise ValueError(f"unknown compressor {compressor!r}")
        self.compressor, self.dtype, self.shape = compressor, np.dtype(dtype), tuple(shape)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._codec = {"none": None, "zstd": numcodecs.Zstd(), "blosc": numcodecs.Blosc()}[compressor]

    @classmethod
    def for_array(cls, array: Any) -> "ChunkDecoder | None":
        """A decoder for the chunks (inner chunks, when sharded) of a zarr v3 ``array`` if they are stored with our
        chain in little-endian; None otherwise (zarr then reads them)."""
        codecs = getattr(array.metadata, "codecs", None)
        if codecs and isinstance(codecs[0], ShardingCodec):
            codecs = codecs[0].codecs
        return cls.for_codecs(codecs, np.dtype(array.dtype), tuple(array.chunks))

    @classmethod
    def for_codecs(cls, codecs: Any, dtype: np.dtype, shape: tuple[int, ...]) -> "ChunkDecoder | None":
        """A decoder for chunks of ``shape`` and ``dtype`` encoded with ``codecs``, if that is our chain; else None."""
        if not codecs or len(codecs) not in (2, 3) or not isinstance(codecs[-1], Crc32cCodec):
            return None
        if not isinstance(codecs[0], BytesCodec) or sys.byteorder != "little":
            return None
        if dtype.itemsize > 1 and (codecs[0].endian is None or codecs[0].endian.value != "little"):
            return None
        if dtype.byteorder == ">" or dtype.hasobject:
            return None
        middle = codecs[1] if len(codecs) == 3 else None
        compressor = ("none" if middle is None else "zstd" if isinstance(middle, ZstdCodec)
                      else "blosc" if isinstance(middle, BloscCodec) else None)
        return None if compressor is None else cls(compressor, dtype, shape)

    def decode(self, data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
        """The chunk's array (writable, C order) from its stored bytes; ValueError if they are damaged."""
        payload = _checked_payload(memoryview(data).cast("B"), "chunk")
        if self.compressor == "none":
            size = len(payload)
        elif self.compressor == "zstd":
            size = _zstd_content_size(payload)
        else:
            size = _blosc_content_size(payload)
        if size is not None and size != self.nbytes:
            raise ValueError(f"chunk decompresses to {size} bytes, its shape {self.shape} needs {self.nbytes}")
        out = np.empty(self.nbytes, dtype=np.uint8)
        if self._codec is None:
            out[:] = np.frombuffer(payload, dtype=np.uint8)
        elif size is None:  # a zstd frame that does not declare its size (not ours): decode, then compare
            raw = self._codec.decode(payload)
            if len(raw) != self.nbytes:
                raise ValueError(f"chunk decompresses to {len(raw)} bytes, its shape {self.shape} needs {self.nbytes}")
            out[:] = np.frombuffer(raw, dtype=np.uint8)
        else:
            self._codec.decode(payload, out=out)
        return out.view(self.dtype).reshape(self.shape)


class ShardIndex:
    """Where each inner chunk lies in a shard file of the layout :func:`encode_shard` writes (``sharding_indexed``,
    index at the end, ``bytes`` + ``crc32c``), so that one inner chunk is read without reading its shard."""

    def __init__(self, shard_shape: tuple[int, ...], inner_shape: tuple[int, ...]) -> None:
        self.shard_shape, self.inner_shape = tuple(shard_shape), tuple(inner_shape)
        self.grid = tuple(s // i for s, i in zip(self.shard_shape, self.inner_shape))
        self.nbytes = int(np.prod(self.grid)) * 16 + 4

    @classmethod
    def for_array(cls, array: Any) -> "ShardIndex | None":
        """The index layout of a sharded zarr v3 ``array`` if it is ours; None if the array is not sharded or its
        index is stored differently."""
        codecs = getattr(array.metadata, "codecs", None)
        if not codecs or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        index_codecs = sharding.index_codecs
        if sharding.index_location.value != "end" or len(index_codecs) != 2:
            return None
        if not (isinstance(index_codecs[0], BytesCodec) and isinstance(index_codecs[1], Crc32cCodec)):
            return None
        return cls(tuple(array.shards), tuple(sharding.chunk_shape))

    def locate(self, index: bytes, inner: tuple[int, ...]) -> tuple[int, int] | None:
        """(offset, nbytes) of inner chunk ``inner`` (its coordinates within the shard), from the shard's index
        bytes; None if the shard holds no such chunk. ValueError if the index is damaged."""
        if len(index) != self.nbytes:
            raise ValueError(f"shard index of {len(index)} bytes, expected {self.nbytes}")
        body = _checked_payload(memoryview(index), "shard index")
        offset, nbytes = np.frombuffer(body, dtype="<u8").reshape(-1, 2)[np.ravel_multi_index(inner, self.grid)]
        if offset == _EMPTY and nbytes == _EMPTY:
            return None
        return int(offset), int(nbytes)
