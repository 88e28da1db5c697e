"""The SQLite catalog of cached objects.

One row per (origin, bucket, key): the ETag whose bytes the data file holds, which blocks of it
are durably present, and the bookkeeping (dirty, pinned, last access) later features need.
Only the trio thread uses the connection. A row's ``ranges`` only ever lists blocks whose bytes
were fsync'ed first, so a crash leaves the catalog claiming no more than the disk has.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import struct
import time
from pathlib import Path

from .. import crashpoints

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY,
    origin TEXT NOT NULL,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    metadata TEXT,
    file TEXT NOT NULL,
    block_size INTEGER NOT NULL,
    ranges BLOB,
    complete INTEGER NOT NULL DEFAULT 0,
    verified INTEGER NOT NULL DEFAULT 0,
    dirty INTEGER NOT NULL DEFAULT 0,
    pinned INTEGER NOT NULL DEFAULT 0,
    last_access REAL NOT NULL DEFAULT 0,
    UNIQUE (origin, bucket, key)
);
CREATE INDEX IF NOT EXISTS objects_access ON objects (last_access);
CREATE INDEX IF NOT EXISTS objects_dirty ON objects (dirty) WHERE dirty = 1;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    origin TEXT NOT NULL,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, time);
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    origin TEXT NOT NULL,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    op TEXT NOT NULL,
    base_etag TEXT,
    time REAL NOT NULL
);
"""
# Columns added after schema 1, with their SQL type; added to an older catalog on open.
# ``held``: bytes of the object the cache holds (present blocks clipped to the size; all of a
# dirty object), NULL until computed for rows of an older catalog (see fill_held).
# ``verified_by``: how the complete object was verified against S3 (see verify.py), or why it
# cannot be ("unverifiable:..."); NULL: not (yet).
_ADDED_COLUMNS = {"base_etag": "TEXT", "held": "INTEGER", "verified_by": "TEXT"}
# After the added columns exist: the running total of ``held`` (kept exact by triggers, in the
# same transaction as every row change, so no scan is needed to know the cache's size), the
# index eviction walks (only rows it may evict, oldest access first), and pinned keys.
_SCHEMA_HELD = """
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0);
CREATE TRIGGER IF NOT EXISTS held_insert AFTER INSERT ON objects BEGIN
    UPDATE totals SET bytes = bytes + coalesce(NEW.held, 0); END;
CREATE TRIGGER IF NOT EXISTS held_delete AFTER DELETE ON objects BEGIN
    UPDATE totals SET bytes = bytes - coalesce(OLD.held, 0); END;
CREATE TRIGGER IF NOT EXISTS held_update AFTER UPDATE OF held ON objects BEGIN
    UPDATE totals SET bytes = bytes + coalesce(NEW.held, 0) - coalesce(OLD.held, 0); END;
CREATE INDEX IF NOT EXISTS objects_evictable ON objects (last_access, id)
    WHERE held > 0 AND dirty = 0 AND pinned = 0;
CREATE TABLE IF NOT EXISTS pins (origin TEXT NOT NULL, bucket TEXT NOT NULL, key TEXT NOT NULL,
                                 PRIMARY KEY (origin, bucket, key));
"""
EVENTS_KEPT = 1000  # the events table keeps this many newest rows


@dataclasses.dataclass
class Row:
    id: int | None
    origin: str
    bucket: str
    key: str
    etag: str
    size: int
    mtime_ns: int
    metadata: dict | None
    file: str
    block_size: int
    ranges: bytes | None = None
    complete: bool = False
    verified: bool = False
    dirty: bool = False
    pinned: bool = False
    last_access: float = 0.0
    base_etag: str | None = None  # a dirty object: the ETag its change was based on ('' = new)
    verified_by: str | None = None  # how it was verified against S3 (verify.py), or why not


_COLS = [f.name for f in dataclasses.fields(Row)]


def held_bytes(ranges: bytes | None, size: int, block_size: int, dirty: bool) -> int:
    """Bytes a row's data file holds: its present blocks clipped to the object's size (a
    dirty object: all of it, it exists only here)."""
    if dirty:
        return size
    if not ranges:
        return 0
    flat = struct.unpack(f"<{len(ranges) // 8}Q", ranges)
    nblocks = (size + block_size - 1) // block_size
    blocks = sum(min(e, nblocks) - min(s, nblocks) for s, e in zip(flat[0::2], flat[1::2]))
    held = blocks * block_size
    if flat[-1] >= nblocks > 0:  # the last block is short
        held -= nblocks * block_size - size
    return max(held, 0)


@dataclasses.dataclass
class Candidate:
    """A row eviction, prune or clear may drop (see Catalog.candidates)."""

    id: int
    origin: str
    bucket: str
    key: str
    file: str
    held: int
    last_access: float
    dirty: bool
    pinned: bool


class Catalog:
    def __init__(self, path: Path, file_mode: int):
        new = not path.exists()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._journal_read: dict[str, list[dict]] = {}  # journal(origin), until it changes
        if new:
            os.chmod(path, file_mode)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.create_function("held_bytes", 4, held_bytes, deterministic=True)
        self._db.executescript(_SCHEMA)
        have = {r[1] for r in self._db.execute("PRAGMA table_info(objects)")}
        for col, sql_type in _ADDED_COLUMNS.items():
            if col not in have:
                self._db.execute(f"ALTER TABLE objects ADD COLUMN {col} {sql_type}")
        if "held" not in have and self.is_empty():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('held_filled', '1')")
        self._db.executescript(_SCHEMA_HELD)
        row = self._db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise RuntimeError(f"cache catalog {path} is from a newer s3stashfs (schema {row[0]})")
        for suffix in ("-wal", "-shm"):
            side = Path(str(path) + suffix)
            if side.exists():
                os.chmod(side, file_mode)

    def close(self) -> None:
        self._db.close()

    @staticmethod
    def _row(r) -> Row:
        d = dict(zip(_COLS, r))
        d["metadata"] = json.loads(d["metadata"]) if d["metadata"] else None
        for b in ("complete", "verified", "dirty", "pinned"):
            d[b] = bool(d[b])
        return Row(**d)

    def get(self, origin: str, bucket: str, key: str) -> Row | None:
        r = self._db.execute(f"SELECT {','.join(_COLS)} FROM objects WHERE origin=? AND bucket=? AND key=?",
                             (origin, bucket, key)).fetchone()
        return self._row(r) if r else None

    def put(self, row: Row) -> int:
        """Insert or replace the row for (origin, bucket, key); returns its id."""
        d = dataclasses.asdict(row)
        d.pop("id")
        d["metadata"] = json.dumps(d["metadata"]) if d["metadata"] is not None else None
        d["held"] = held_bytes(row.ranges, row.size, row.block_size, row.dirty)
        cols = list(d)
        cur = self._db.execute(
            f"INSERT INTO objects ({','.join(cols)}) VALUES ({','.join('?' * len(cols))}) "
            f"ON CONFLICT (origin, bucket, key) DO UPDATE SET "
            + ",".join(f"{c}=excluded.{c}" for c in cols if c not in ("origin", "bucket", "key"))
            + " RETURNING id", [d[c] for c in cols])
        row.id = cur.fetchone()[0]
        return row.id

    def update_state(self, updates: list[tuple[int, bytes, bool, bool, float]]) -> None:
        """(id, ranges, complete, verified, last_access) for many rows, in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE objects SET ranges=?1, complete=?2, verified=?3, last_access=?4, "
                "held=held_bytes(?1, size, block_size, dirty) WHERE id=?5",
                [(r, int(c), int(v), a, i) for i, r, c, v, a in updates])
            crashpoints.hit("catalog.state_uncommitted")  # inside the transaction

    def set_metadata(self, row_id: int, mtime_ns: int, metadata: dict) -> None:
        self._db.execute("UPDATE objects SET mtime_ns=?, metadata=? WHERE id=?",
                         (mtime_ns, json.dumps(metadata), row_id))

    def rekey(self, row_id: int, key: str, etag: str) -> None:
        """The object moved to ``key`` (rename); whatever row ``key`` had goes."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM objects WHERE id != ? AND origin = "
                             "(SELECT origin FROM objects WHERE id = ?) AND bucket = "
                             "(SELECT bucket FROM objects WHERE id = ?) AND key = ?",
                             (row_id, row_id, row_id, key))
            self._db.execute("UPDATE objects SET key=?, etag=? WHERE id=?", (key, etag, row_id))

    def delete(self, row_id: int) -> None:
        self._db.execute("DELETE FROM objects WHERE id=?", (row_id,))

    def known_metadata(self, origin: str, bucket: str, prefix: str) -> dict[str, tuple[str, int, dict]]:
        """key -> (etag, mtime_ns, metadata) for rows under ``prefix`` whose metadata is known."""
        hi = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"
        rows = self._db.execute(
            "SELECT key, etag, mtime_ns, metadata FROM objects WHERE origin=? AND bucket=? AND "
            "key>=? AND key<? AND metadata IS NOT NULL", (origin, bucket, prefix, hi))
        return {k: (e, m, json.loads(md)) for k, e, m, md in rows}

    def dirty_rows(self, origin: str) -> list[Row]:
        return [self._row(r) for r in self._db.execute(
            f"SELECT {','.join(_COLS)} FROM objects WHERE origin=? AND dirty=1", (origin,))]

    def rows_under(self, origin: str, bucket: str, prefix: str) -> list[Row]:
        """Every cached object under ``prefix`` (offline listings)."""
        hi = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"
        return [self._row(r) for r in self._db.execute(
            f"SELECT {','.join(_COLS)} FROM objects WHERE origin=? AND bucket=? AND key>=? AND key<?",
            (origin, bucket, prefix, hi))]

    def is_empty(self) -> bool:
        return self._db.execute("SELECT 1 FROM objects LIMIT 1").fetchone() is None

    def all_files(self) -> set[str]:
        return {f for (f,) in self._db.execute("SELECT file FROM objects")}

    # ------------------------------------------------------------ size, eviction, pins
    def total_held(self) -> int:
        """Bytes the cache holds, from the running total (exact once ``held_filled``)."""
        return self._db.execute("SELECT bytes FROM totals WHERE id=0").fetchone()[0]

    def held_filled(self) -> bool:
        r = self._db.execute("SELECT v FROM meta WHERE k='held_filled'").fetchone()
        return r is not None and r[0] == "1"

    def fill_held(self, after_id: int, limit: int) -> int | None:
        """Compute ``held`` for up to ``limit`` rows of an older catalog with ids above
        ``after_id``; returns the last id seen, or None once every row has it."""
        rows = self._db.execute("SELECT id, held FROM objects WHERE id > ? ORDER BY id LIMIT ?",
                                (after_id, limit)).fetchall()
        if not rows:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('held_filled', '1')")
            return None
        ids = [(i,) for i, h in rows if h is None]
        if ids:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("UPDATE objects SET held=held_bytes(ranges, size, block_size, "
                                     "dirty) WHERE id=? AND held IS NULL", ids)
        return rows[-1][0]

    _CAND = "id, origin, bucket, key, file, held, last_access, dirty, pinned"

    def evictable(self, after: tuple[float, int], limit: int) -> list[Candidate]:
        """Clean, unpinned rows holding bytes, least recently accessed first, after the
        (last_access, id) ``after``; walks the partial index objects_evictable."""
        return [Candidate(*r) for r in self._db.execute(
            f"SELECT {self._CAND} FROM objects INDEXED BY objects_evictable "
            "WHERE held > 0 AND dirty = 0 AND pinned = 0 AND (last_access, id) > (?, ?) "
            "ORDER BY last_access, id LIMIT ?", (*after, limit))]

    def holding(self, accessed_before: float = float("inf")) -> list[Candidate]:
        """Every row holding bytes (or dirty) last accessed before ``accessed_before``."""
        return [Candidate(*r) for r in self._db.execute(
            f"SELECT {self._CAND} FROM objects WHERE (held > 0 OR dirty = 1) AND last_access < ?",
            (accessed_before,))]

    def drop_blocks(self, row_id: int, ranges: bytes | None = None) -> None:
        """The row keeps its name, ETag and metadata (listings, offline lookups) but holds only
        ``ranges`` (None: nothing)."""
        self._db.execute("UPDATE objects SET ranges=?1, complete=0, verified=0, verified_by=NULL, "
                         "held=held_bytes(?1, size, block_size, dirty) WHERE id=?2",
                         (ranges, row_id))

    def drop_blocks_many(self, row_ids: list[int]) -> None:
        """``drop_blocks(id)`` of each, in one transaction: eviction drops them by the batch,
        and a commit per row cost the event loop a millisecond or more each."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE objects SET ranges=NULL, complete=0, verified=0, verified_by=NULL, "
                "held=held_bytes(NULL, size, block_size, dirty) WHERE id=?", [(i,) for i in row_ids])

    def verification_rows(self, origin: str | None = None) -> list[Row]:
        """Every clean row holding bytes (of ``origin``, or all): what ``cache verify`` reports."""
        q = f"SELECT {','.join(_COLS)} FROM objects WHERE held > 0 AND dirty = 0"
        args: tuple = ()
        if origin is not None:
            q += " AND origin = ?"
            args = (origin,)
        return [self._row(r) for r in self._db.execute(q + " ORDER BY bucket, key", args)]

    def usage(self) -> dict[str, int]:
        r = self._db.execute(
            "SELECT count(*), coalesce(sum(dirty), 0), "
            "coalesce(sum(CASE WHEN dirty THEN held END), 0), coalesce(sum(pinned), 0), "
            "coalesce(sum(CASE WHEN pinned THEN held END), 0) "
            "FROM objects WHERE held > 0 OR dirty = 1").fetchone()
        return dict(zip(("objects", "dirty_objects", "dirty_bytes", "pinned_objects",
                         "pinned_bytes"), r))

    def is_pinned(self, origin: str, bucket: str, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM pins WHERE origin=? AND bucket=? AND key=?",
                                (origin, bucket, key)).fetchone() is not None

    def set_pinned(self, origin: str, bucket: str, key: str, pinned: bool) -> bool:
        """Pin or unpin a key (its row now, and any version cached later); True if it has a row."""
        with self._db:
            self._db.execute("BEGIN")
            if pinned:
                self._db.execute("INSERT OR IGNORE INTO pins VALUES (?,?,?)", (origin, bucket, key))
            else:
                self._db.execute("DELETE FROM pins WHERE origin=? AND bucket=? AND key=?",
                                 (origin, bucket, key))
            cur = self._db.execute("UPDATE objects SET pinned=? WHERE origin=? AND bucket=? AND key=?",
                                   (int(pinned), origin, bucket, key))
        return cur.rowcount > 0

    def add_event(self, origin: str, bucket: str, key: str, kind: str, message: str,
                  when: float | None = None) -> None:
        """Record an event for ``status`` (kind: 'error', 'conflict', ...); keeps the newest."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("INSERT INTO events (time, origin, bucket, key, kind, message) "
                             "VALUES (?,?,?,?,?,?)",
                             (time.time() if when is None else when, origin, bucket, key, kind,
                              message))
            self._db.execute("DELETE FROM events WHERE id <= "
                             "(SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?)",
                             (EVENTS_KEPT,))

    def events(self, kind: str | None = None, limit: int = 100) -> list[dict]:
        """Newest first: dicts with time, origin, bucket, key, kind, message."""
        q = "SELECT time, origin, bucket, key, kind, message FROM events"
        args: list = []
        if kind is not None:
            q += " WHERE kind=?"
            args.append(kind)
        q += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        cols = ("time", "origin", "bucket", "key", "kind", "message")
        return [dict(zip(cols, r)) for r in self._db.execute(q, args)]

    # ------------------------------------------------------------ the journal of pending changes
    # Changes S3 has not got yet, in the order they are to be applied: 'upload' (the dirty
    # object of that key; one row per key, moved to the end each time the file is closed),
    # 'delete' (conditional on base_etag), 'mkdir' (key ends in '/'). Lookups ask for it
    # often, so it is read once and kept until a change to it (every change goes through here).

    def journal_add(self, origin: str, bucket: str, key: str, op: str,
                    base_etag: str | None) -> int:
        """Append a change; an 'upload' replaces the key's earlier 'upload' row."""
        self._journal_read.clear()
        with self._db:
            self._db.execute("BEGIN")
            if op == "upload":
                self._db.execute("DELETE FROM journal WHERE origin=? AND bucket=? AND key=? AND "
                                 "op='upload'", (origin, bucket, key))
            cur = self._db.execute(
                "INSERT INTO journal (origin, bucket, key, op, base_etag, time) "
                "VALUES (?,?,?,?,?,?) RETURNING seq",
                (origin, bucket, key, op, base_etag, time.time()))
            seq = cur.fetchone()[0]
            crashpoints.hit("catalog.journal_uncommitted")  # inside the transaction
            return seq

    def journal(self, origin: str) -> list[dict]:
        """Pending changes in apply order: dicts (not to be changed) with seq, bucket, key, op,
        base_etag, time."""
        rows = self._journal_read.get(origin)
        if rows is None:
            cols = ("seq", "bucket", "key", "op", "base_etag", "time")
            rows = self._journal_read[origin] = [dict(zip(cols, r)) for r in self._db.execute(
                f"SELECT {','.join(cols)} FROM journal WHERE origin=? ORDER BY seq", (origin,))]
        return list(rows)

    def pending_origins(self) -> set[str]:
        """The endpoints this cache holds changes for that S3 has not got yet."""
        return {o for (o,) in self._db.execute(
            "SELECT origin FROM objects WHERE dirty=1 UNION SELECT origin FROM journal")}

    def journal_done(self, seq: int) -> None:
        self._journal_read.clear()
        self._db.execute("DELETE FROM journal WHERE seq=?", (seq,))

    def journal_forget(self, origin: str, bucket: str, key: str, op: str) -> None:
        self._journal_read.clear()
        self._db.execute("DELETE FROM journal WHERE origin=? AND bucket=? AND key=? AND op=?",
                         (origin, bucket, key, op))

    def journal_rekey(self, origin: str, bucket: str, key: str, new_key: str) -> None:
        """A dirty file was renamed: its pending upload goes to the new name."""
        self._journal_read.clear()
        self._db.execute("UPDATE journal SET key=? WHERE origin=? AND bucket=? AND key=? AND "
                         "op='upload'", (new_key, origin, bucket, key))

    def move_queued(self, row: Row, old_key: str,
                    changes: list[tuple[str, str, str | None]]) -> str | None:
        """An offline rename (queue mode), in one transaction, so that a crash leaves either the
        old state or the new one: ``row`` (a saved row, already carrying its new key) replaces
        whatever row that key had, the pending uploads of both keys go, and ``changes``
        ((key, op, base_etag), in order) are appended to the journal. Returns the data file
        of the row the new key had (for the caller to delete), or None."""
        self._journal_read.clear()
        with self._db:
            self._db.execute("BEGIN")
            old = self._db.execute("SELECT id, file FROM objects WHERE origin=? AND bucket=? AND "
                                   "key=? AND id != ?",
                                   (row.origin, row.bucket, row.key, row.id)).fetchone()
            if old is not None:
                self._db.execute("DELETE FROM objects WHERE id=?", (old[0],))
            self._db.execute("UPDATE objects SET key=? WHERE id=?", (row.key, row.id))
            self.put(row)
            self._db.execute("DELETE FROM journal WHERE origin=? AND bucket=? AND key IN (?, ?) "
                             "AND op='upload'", (row.origin, row.bucket, row.key, old_key))
            now = time.time()
            self._db.executemany(
                "INSERT INTO journal (origin, bucket, key, op, base_etag, time) VALUES (?,?,?,?,?,?)",
                [(row.origin, row.bucket, key, op, base, now) for key, op, base in changes])
        return old[1] if old is not None else None

    def clear_events(self, bucket: str, key: str, kind: str) -> None:
        self._db.execute("DELETE FROM events WHERE bucket=? AND key=? AND kind=?", (bucket, key, kind))
