"""The local cache: hash-named data files, the catalog, and which blocks are present.

One module per concern: ``objects`` (a cached object and its blocks), ``core`` (the Cache:
objects in use, local changes, durability), ``space`` (limits, eviction, prune, clear),
``integrity`` (block sums, verify), ``files`` (data files on disk), ``catalog`` (SQLite),
``ranges``. This module only re-exports the public names.
"""
from .core import ERROR_REPEAT, SYNC_INTERVAL, Cache
from .files import check_reserve, md5_of, open_data_file, reserve_bytes
from .integrity import write_sums
from .objects import (BLOCK_SIZE, INDEX_SUFFIXES, SUMS_SUFFIX, CachedObject, Fetch, data_name,
                      is_index)
from .space import EVICT_BATCH, FILL_BATCH, LIMITS_INTERVAL

__all__ = ["BLOCK_SIZE", "ERROR_REPEAT", "EVICT_BATCH", "FILL_BATCH", "INDEX_SUFFIXES",
           "LIMITS_INTERVAL", "SUMS_SUFFIX", "SYNC_INTERVAL", "Cache", "CachedObject", "Fetch",
           "check_reserve", "data_name", "is_index", "md5_of", "open_data_file", "reserve_bytes",
           "write_sums"]
