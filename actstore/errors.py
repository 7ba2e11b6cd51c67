"""Errors that name what is wrong with a store, a schema or the data handed to it."""


class StoreError(Exception):
    """Base class of every error actstore raises about a store."""


class NotAStoreError(StoreError):
    """The path holds no actstore store."""


class SchemaVersionError(StoreError):
    """The store was written with a schema version this actstore cannot read."""


class SchemaMismatchError(StoreError):
    """A store was reopened with a schema or provenance that differs from the stored one."""


class ChunkCorruptError(StoreError):
    """A stored chunk failed its checksum or could not be decoded."""


class StoreWriteError(StoreError):
    """Writing to the store failed (disk full, read-only, ...); completed blocks are unaffected."""


class IncompleteAnalysisError(StoreError):
    """An analysis group in a store was left unfinished by a run stopped while saving it."""
