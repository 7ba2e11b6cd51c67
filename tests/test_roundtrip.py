"""Values written are the values read: bit-exact through actstore, plain zarr and TensorStore."""

from __future__ import annotations

import numpy as np
import pytest
import tensorstore as ts
import zarr

import actstore
from actstore.writer import StoreWriter
from conftest import bits, block_data, small_schema, write_blocks


def _tensorstore_read(path, name) -> np.ndarray:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}
    return ts.open(spec, read=True).result().read().result()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("codec", ["none", "zstd", "blosc-zstd", "blosc-lz4"])
@pytest.mark.parametrize("sharded", [False, True])
def test_roundtrip_bit_exact(store_path, dtype, codec, sharded):
    schema = small_schema(dtype=dtype, codec=codec, chunk_images=2 if sharded else None)
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, [0, 1, 2], n_last=3)
    expected = [block_data(schema, b, 3 if b == 2 else None) for b in range(3)]
    want_images = np.concatenate([e[0] for e in expected], axis=1)

    ds = actstore.open(store_path)
    assert ds.image_resid.dtype == schema.numpy_dtype
    assert ds.sizes["image"] == 11
    np.testing.assert_array_equal(bits(ds.image_resid.values), bits(want_images))
    assert list(ds.image_id.values) == sum((e[1] for e in expected), [])
    assert list(ds.prompt.values) == sum((e[2] for e in expected), [])
    assert list(ds.layer.values) == [0, 1, 2]

    want_text = np.concatenate([e[3].resid for e in expected], axis=1)
    np.testing.assert_array_equal(bits(ds.text_resid.values), bits(want_text))
    want_image_of_text = np.concatenate([e[3].image + 4 * b for b, e in enumerate(expected)])
    np.testing.assert_array_equal(ds.text_image.values, want_image_of_text)
    np.testing.assert_array_equal(ds.text_position.values, np.concatenate([e[3].position for e in expected]))
    np.testing.assert_array_equal(ds.text_token_id.values, np.concatenate([e[3].token_id for e in expected]))

    # An independent Zarr v3 implementation reads the same bits (image axis = capacity; take what was written).
    independent = _tensorstore_read(store_path, "image_resid")
    assert str(independent.dtype) == dtype
    np.testing.assert_array_equal(bits(independent[:, :11]), bits(want_images))
    # ... and plain zarr-python sees the same array (bfloat16 via the entry point actstore installs).
    plain = zarr.open_array(str(store_path / "image_resid"), mode="r")
    np.testing.assert_array_equal(bits(plain[:, :11]), bits(want_images))
    text_ts = _tensorstore_read(store_path, "text_resid")
    slots = schema.text_slots_per_block  # each block owns a fixed region of the text axis
    used = np.concatenate([b * slots + np.arange(len(e[3].image)) for b, e in enumerate(expected)])
    np.testing.assert_array_equal(bits(text_ts[:, used]), bits(want_text))


def test_unwritten_regions_read_as_nan(store_path):
    schema = small_schema()
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, [1])
    raw = actstore.open(store_path, complete_only=False)
    assert raw.sizes["image"] == schema.capacity
    assert np.isnan(raw.image_resid.isel(image=0).values.astype(np.float32)).all()
    ds = actstore.open(store_path)
    np.testing.assert_array_equal(ds.image.values, np.arange(4, 8))


def test_torch_tensors_are_accepted_and_exact(store_path):
    torch = pytest.importorskip("torch")
    schema = small_schema(text_tokens_per_image=0)
    x = torch.randn(3, 4, 5, 12).to(torch.bfloat16)
    with StoreWriter.create(store_path, schema) as writer:
        writer.write_block(0, x, list("abcd"))
    got = actstore.open(store_path).image_resid.values
    assert torch.equal(actstore.bfloat16.to_torch(got), x)


def test_plain_xarray_opens_the_store(store_path):
    import xarray as xr

    schema = small_schema()
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, [0])
    ds = xr.open_zarr(store_path, consolidated=False)
    assert ds.image_resid.dims == ("layer", "image", "image_token", "d_model")
    np.testing.assert_array_equal(bits(ds.image_resid.values[:, :4]), bits(block_data(schema, 0)[0]))


class ZarrWasAsked(Exception):
    """Raised by a zarr read that the reader should not have made."""


@pytest.mark.parametrize("codec, sharded", [("none", False), ("zstd", False), ("blosc-lz4", False), ("zstd", True)])
def test_whole_chunks_of_a_local_store_are_decoded_by_the_reading_thread(store_path, monkeypatch, codec, sharded):
    """Dask's threads decode their chunks themselves (an inner chunk of a shard through the shard's index):
    zarr-python would check and copy every chunk on its one event loop thread. The values stay bit-exact, edge
    chunks and sub-selections included."""
    schema = small_schema(codec=codec, dtype="bfloat16", chunk_images=2 if sharded else None)
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, [0, 1, 2], n_last=3)
    expected = [block_data(schema, b, 3 if b == 2 else None) for b in range(3)]
    ds = actstore.open(store_path)

    def refuse(self, key):
        raise ZarrWasAsked(key)

    monkeypatch.setattr(zarr.Array, "__getitem__", refuse)
    np.testing.assert_array_equal(bits(ds.image_resid.values), bits(np.concatenate([e[0] for e in expected], 1)))
    np.testing.assert_array_equal(bits(ds.text_resid.values), bits(np.concatenate([e[3].resid for e in expected], 1)))
    np.testing.assert_array_equal(bits(ds.image_resid.isel(layer=2, image=slice(5, 7), d_model=3).values),
                                  bits(expected[1][0][2, 1:3, :, 3]))


def test_chunks_never_written_or_of_other_layouts_are_read_by_zarr(store_path):
    from actstore.codecs import ChunkDecoder, ShardIndex

    schema = small_schema()
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, [1])
    group = zarr.open_group(str(store_path), mode="r")
    assert ChunkDecoder.for_array(group["image_id"]) is None  # strings
    assert ChunkDecoder.for_array(group["text_resid"]) is not None and ShardIndex.for_array(group["text_resid"]) is None
    raw = actstore.open(store_path, complete_only=False)
    assert np.isnan(raw.text_resid.isel(text_token=0).values.astype(np.float32)).all()  # block 0: never written
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    from actstore.reader import CheckedChunks

    index_first = ShardingCodec(chunk_shape=(2, 3), codecs=[BytesCodec(), Crc32cCodec()], index_location="start")
    other = zarr.create_array(str(store_path.parent / "other.zarr"), shape=(4, 6), chunks=(4, 6), dtype="float32",
                              serializer=index_first, compressors=None, filters=None)
    other[:] = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert ShardIndex.for_array(other) is None
    reader = CheckedChunks(other, "other", schema, str(store_path.parent), store_path.parent / "other.zarr")
    assert reader.decoder is None
    np.testing.assert_array_equal(reader[(slice(0, 2), slice(3, 6))], other[:2, 3:])


def test_a_shard_index_is_checked_and_knows_empty_inner_chunks():
    import crc32c

    from actstore.codecs import ShardIndex

    index = ShardIndex((1, 4, 5, 12), (1, 2, 5, 12))
    table = np.array([[0, 100], [2**64 - 1, 2**64 - 1]], dtype="<u8").tobytes()
    stored = table + int(crc32c.crc32c(table)).to_bytes(4, "little")
    assert index.locate(stored, (0, 0, 0, 0)) == (0, 100)
    assert index.locate(stored, (0, 1, 0, 0)) is None  # not written: zarr gives the fill value
    with pytest.raises(ValueError, match="shard index crc32c mismatch"):
        index.locate(stored[:3] + b"\x01" + stored[4:], (0, 0, 0, 0))


def test_a_damaged_shard_index_is_named(store_path):
    from actstore.errors import ChunkCorruptError
    from actstore.schema import image_chunk_key

    schema = small_schema(chunk_images=2)
    with StoreWriter.create(store_path, schema) as writer:
        write_blocks(writer, [0, 1])
    shard = store_path / image_chunk_key(1, 1)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01  # inside the index, before its checksum
    shard.write_bytes(bytes(data))
    ds = actstore.open(store_path)
    np.testing.assert_array_equal(bits(ds.image_resid.isel(layer=1, image=slice(0, 4)).values),
                                  bits(block_data(schema, 0)[0][1]))
    with pytest.raises(ChunkCorruptError, match="layer state 1, images 4..5"):
        ds.image_resid.isel(layer=1, image=slice(4, 6)).values


@pytest.mark.parametrize("compressor", ["zstd", "blosc"])
def test_the_decoder_refuses_a_chunk_of_the_wrong_size(compressor):
    """A chunk whose checksum holds but whose size does not fit the array's chunk shape is an error, never an array
    padded with whatever memory held."""
    from actstore.codecs import ChunkDecoder, ChunkEncoder

    encoder = ChunkEncoder("zstd" if compressor == "zstd" else "blosc-zstd", 1)
    decoder = ChunkDecoder(compressor, np.dtype("float32"), (4, 8))
    x = np.arange(32, dtype=np.float32).reshape(4, 8)
    np.testing.assert_array_equal(decoder.decode(b"".join(encoder.encode(x))), x)
    with pytest.raises(ValueError, match="decompresses to 96 bytes"):
        decoder.decode(b"".join(encoder.encode(x[:3])))
    with pytest.raises(ValueError, match="crc32c"):
        decoder.decode(b"".join(encoder.encode(x))[:-1] + b"\0")


@pytest.mark.parametrize("n_bytes", [0, 100, 255, 256, 300, 65791, 65792, 1 << 20])
def test_zstd_frame_headers_give_the_decompressed_size(n_bytes):
    import numcodecs

    from actstore.codecs import _zstd_content_size

    data = np.random.default_rng(n_bytes).integers(0, 4, n_bytes, dtype=np.uint8)
    assert _zstd_content_size(memoryview(numcodecs.Zstd(level=1).encode(data))) == n_bytes


def test_a_zstd_frame_without_its_size_is_decoded_and_then_measured(monkeypatch):
    import actstore.codecs as codecs

    monkeypatch.setattr(codecs, "_zstd_content_size", lambda frame: None)
    encoder, decoder = codecs.ChunkEncoder("zstd", 1), codecs.ChunkDecoder("zstd", np.dtype("int16"), (16,))
    x = np.arange(16, dtype=np.int16)
    np.testing.assert_array_equal(decoder.decode(b"".join(encoder.encode(x))), x)
    with pytest.raises(ValueError, match="decompresses to 30 bytes"):
        decoder.decode(b"".join(encoder.encode(x[:15])))
