"""Keys <-> paths: lookups, directory listings, attributes' sources, TTLs, negative cache.

A prefix is a directory; a ``dir/`` marker object is a directory; when a key ``x`` and a prefix
``x/`` both exist, the directory wins. A key component that is not a valid file name (empty,
``.``, ``..``, containing NUL, longer than 255 bytes) is never shown and is logged once: it can
never become a path, in the mount or in the cache.

Freshness: a listing younger than the metadata TTL answers lookups (negatively too) and gives
``open()`` its ETag; otherwise ``open()`` asks S3 with a HEAD. A HEAD made by a lookup is used by
the one ``open()`` that follows it, so ``cat file`` costs one HEAD, and every later open asks again.
After the TTL a name is revalidated with one request for what it was last seen as (a file: HEAD;
a directory: a LIST of it, which becomes its listing when it holds all of it), so a walk costs
one LIST per directory however long it takes.
"""
from __future__ import annotations

import dataclasses
import logging
import stat
import time

import trio

from .cache import Cache
from .errors import (CredentialsFailed, Denied, InvalidName, NotADirectory, NotEmpty, NotFound, S3StashError,
                     Unreachable, first_error)
from .inodes import InodeTable, Kind, Node
from .store import ListPage, ObjectInfo, Store

log = logging.getLogger(__name__)

NAME_MAX = 255
PAGE = 1000  # keys in a ListObjectsV2 page: S3's most
ADOPT_PAGES = 10  # a lookup's LIST of a directory goes on to list it whole up to this many pages


class _TooBig(Exception):
    """A directory's listing would take more pages than allowed."""


def valid_name(name: str) -> bool:
    if name in ("", ".", "..") or "\0" in name or "/" in name:
        return False
    return len(name.encode("utf-8", "surrogatepass")) <= NAME_MAX


@dataclasses.dataclass
class Listing:
    """A directory's children as of one listing: name -> node, in S3's order (the order
    readdir hands them out)."""

    children: dict[bytes, Node]
    # listed by S3 (not pieced together offline from the cache), and the ETag of the
    # directory's own ``dir/`` marker object in that listing (None: no marker): what an rmdir
    # made offline needs to know
    from_s3: bool = False
    marker: str | None = None
    _order: list[Node] | None = None
    _index: dict[int, int] | None = None
    cursor: int = -1  # position of the child opened last, to notice a directory read in order
    ahead: int = -1  # position up to which children were prefetched

    def forget_order(self) -> None:
        self._order = self._index = None

    def after(self, node: Node, n: int) -> tuple[int, list[Node]]:
        """(position of ``node``, the ``n`` children after it); (-1, []) if it is not here."""
        if self._order is None or self._index is None:
            self._order = list(self.children.values())
            self._index = {c.ino: i for i, c in enumerate(self._order)}
        i = self._index.get(node.ino, -1)
        return i, (self._order[i + 1:i + 1 + n] if i >= 0 else [])


class Namespace:
    def __init__(self, store: Store, cache: Cache, inodes: InodeTable, ttl: float,
                 buckets: tuple[str, ...] = (), queue_offline: bool = False):
        self.store = store
        # offline_writes=queue: offline, a name a known directory does not hold is answered
        # "does not exist", so that it can be created (its upload then requires that S3 has
        # no such key either: If-None-Match)
        self.queue_offline = queue_offline
        self.cache = cache
        self.inodes = inodes
        self.ttl = ttl
        self.buckets = buckets
        self._negative: dict[tuple[int, bytes], float] = {}
        self._logged: set[tuple[str, str]] = set()
        self._listing_locks: dict[int, trio.Lock] = {}
        self.nursery: trio.Nursery | None = None  # the mount's, for listings that go on
        self._too_big: set[int] = set()  # directories over ADOPT_PAGES pages, seen so

    @property
    def _offline(self) -> bool:
        return not self.store.connectivity.online

    def _fresh(self, at: float) -> bool:
        return self.ttl > 0 and time.monotonic() - at < self.ttl

    def _log_once(self, bucket: str, key: str, what: str) -> None:
        if (bucket, key) not in self._logged:
            self._logged.add((bucket, key))
            log.info("s3://%s/%s: %s", bucket, key, what)

    # ---------------------------------------------------------------- lookup
    async def lookup(self, parent: Node, name: bytes) -> Node:
        if not parent.kind.is_dir:
            raise NotADirectory(repr(parent))
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise NotFound("not a UTF-8 name") from None
        if not valid_name(text):
            raise NotFound("not a valid name")
        if parent.listing is not None and self._fresh(parent.listing_at):
            node = parent.listing.children.get(name)
            if node is not None:
                return node
            if parent.kind is not Kind.ROOT:  # the bucket list may lack buckets we can use
                raise NotFound(text)
        neg = self._negative.get((parent.ino, name))
        if neg is not None and time.monotonic() < neg:
            raise NotFound(text)
        local = self.cache.current(parent.bucket, parent.key + text) if parent.kind is not Kind.ROOT else None
        if local is not None and local.dirty:
            info = local_info(local)
            node = self.inodes.child(parent, name, kind_of(info), parent.bucket, parent.key + text)
            self._set_info(node, info, from_head=True)
            return node
        if self._offline:
            try:  # what the mount knows is the answer, without waiting for a probe
                return self._offline_lookup(parent, name, text)
            except Unreachable:
                pass  # only S3 knows: the store asks it now if its last probe is old
        try:
            node = await (self._lookup_bucket(parent, name, text) if parent.kind is Kind.ROOT
                          else self._lookup_key(parent, name, text))
        except Unreachable:
            return self._offline_lookup(parent, name, text)
        except CredentialsFailed as e:  # S3 cannot be asked: what the mount knows, else EACCES
            try:
                return self._offline_lookup(parent, name, text)
            except (Unreachable, NotFound):
                raise e from None
        if node is None:
            if self.ttl > 0:
                self._negative[(parent.ino, name)] = time.monotonic() + self.ttl
            raise NotFound(text)
        self._negative.pop((parent.ino, name), None)
        return node

    async def _lookup_bucket(self, parent: Node, name: bytes, text: str) -> Node | None:
        if not await self.store.head_bucket(text):
            return None
        return self.inodes.child(parent, name, Kind.BUCKET, text, "")

    async def _lookup_key(self, parent: Node, name: bytes, text: str) -> Node | None:
        """What ``name`` is in S3 now; the directory wins. A name this mount last saw as a file
        is asked with a HEAD, one it last saw as a directory with a LIST of it (none while
        that directory's own listing is fresh); the other request only when the first says it
        is no longer so. A name never seen: HEAD and LIST at the same time. A directory's LIST
        that holds all of it becomes its listing, for the readdir that usually follows."""
        key = parent.key + text
        seen = self.inodes.existing_child(parent, name)
        if seen is not None and not _seen_in_s3(seen):
            seen = None
        deletes = self.cache.pending_keys("delete")  # queued while offline, not applied yet
        asked = time.monotonic()
        info: ObjectInfo | None = None
        page: ListPage | None = None
        if seen is not None and seen.kind.is_object:
            info = await self.store.head_object(parent.bucket, key)
            if info is None or (parent.bucket, key) in deletes:
                page = await self._list_dir(parent.bucket, key + "/", None)
        elif seen is not None:
            if self._listed_now(seen):
                return seen
            page = await self._list_dir(parent.bucket, key + "/", seen)
            if not self._is_dir(parent.bucket, key + "/", page, deletes):
                info = await self.store.head_object(parent.bucket, key)
        else:
            async def head():
                nonlocal info
                info = await self.store.head_object(parent.bucket, key)

            async def as_dir():
                nonlocal page
                page = await self._list_dir(parent.bucket, key + "/", None)
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(head)
                    n.start_soon(as_dir)
            except BaseExceptionGroup as eg:
                raise first_error(eg) from None
        if info is not None and (parent.bucket, key) in deletes:
            info = None  # deleted while offline; the delete is on its way
        if self._is_dir(parent.bucket, key + "/", page, deletes):
            if info is not None:
                self._log_once(parent.bucket, key, "both an object and a prefix: shown as a directory")
            node = self.inodes.child(parent, name, Kind.DIR, parent.bucket, key + "/")
            if page is not None and page.next_token is None:
                await self._adopt(node, page, asked)
            elif page is not None and len(page.keys) + len(page.prefixes) >= PAGE:
                self._adopt_later(node, page, asked)
            return node
        if info is None:
            return None
        node = self.inodes.child(parent, name, kind_of(info), parent.bucket, key)
        self._set_info(node, info, from_head=True)
        return node

    async def _list_dir(self, bucket: str, prefix: str, seen: Node | None) -> ListPage:
        """The first page of a directory's listing: what shows it is one, and all of it
        when it is small. One key is enough for a directory last seen with a page or more."""
        big = seen is not None and (seen.ino in self._too_big or (
            seen.listing is not None and len(seen.listing.children) >= PAGE))
        return await self.store.list_page(bucket, prefix, max_keys=1 if big else PAGE)

    def _is_dir(self, bucket: str, prefix: str, page: ListPage | None,
                deletes: set[tuple[str, str]]) -> bool:
        """Is ``prefix`` a directory, by the first page of its listing (None: not asked) and
        the changes queued while offline?"""
        if page is not None and (page.prefixes or page.keys):
            only_marker = not page.prefixes and page.keys == [prefix] and page.next_token is None
            if not only_marker or (bucket, prefix) not in deletes:
                return True  # (the marker of a directory removed while offline is on its way)
        return (bucket, prefix) in self.cache.pending_keys("mkdir")

    def _listed_now(self, node: Node) -> bool:
        """A directory whose own listing by S3 is fresh and shows it exists."""
        listing = node.listing
        return (listing is not None and listing.from_s3 and self._fresh(node.listing_at)
                and (bool(listing.children) or listing.marker is not None))

    def _adopt_later(self, node: Node, page: ListPage, asked: float) -> None:
        """The rest of a large directory's listing, fetched without holding up the lookup that
        brought its first page (a ``stat`` of a directory of 10,000 keys still costs one LIST
        of waiting); lookups of its names meanwhile ask S3 as before, and a ``readdir`` waits
        for this listing instead of making its own."""
        if self.nursery is None or node.ino in self._too_big:
            return

        async def adopt() -> None:
            try:
                await self._adopt(node, page, asked)
            except Exception:  # a bug here must not end the mount: the lookup is answered
                log.exception("s3://%s/%s: listing after a lookup failed", node.bucket, node.key)
        self.nursery.start_soon(adopt)

    async def _adopt(self, node: Node, page: ListPage, asked: float) -> None:
        """A lookup's LIST (sent at ``asked``) becomes the directory's listing, unless a listdir
        of it is under way or ended since: theirs is as new or newer. A first page that is not
        all of it is followed by the next ones, up to ADOPT_PAGES in all: the programs that look
        a directory up usually go on to open names in it, and each name a listing does not
        answer costs a HEAD and a LIST (and the kernel sends the lookups of one directory one at
        a time). A larger directory is left to ``listdir``; a page that fails leaves it too."""
        lock = self._listing_locks.setdefault(node.ino, trio.Lock())
        if lock.locked() or (node.listing is not None and node.listing_at > asked):
            return
        async with lock:
            marker: list[str] = []
            try:
                children = await self._list_prefix(node, marker, first=page,
                                                   max_pages=ADOPT_PAGES)
            except _TooBig:
                self._too_big.add(node.ino)  # the next lookups ask for one key, not ten pages
                return
            except S3StashError as e:
                if page.next_token is None:
                    raise
                log.debug("s3://%s/%s: listing after a lookup stopped: %s", node.bucket, node.key, e)
                return
            node.listing = Listing(children, from_s3=True, marker=marker[0] if marker else None)
            node.listing_at = time.monotonic()

    def _set_info(self, node: Node, info: ObjectInfo, from_head: bool = False) -> None:
        old = node.info
        if not from_head and old is not None and old.from_head and old.etag == info.etag:
            info = old  # the listing adds nothing to what a HEAD of the same version said
        node.info = info
        node.info_at = time.monotonic()
        node.info_src = "head" if from_head else "list"

    def fresh_listing(self, node: Node) -> Listing | None:
        """The listing of ``node``'s directory, if it is younger than the TTL."""
        parent = self.inodes.get(node.parent)
        if parent.listing is not None and self._fresh(parent.listing_at):
            return parent.listing
        return None

    # ---------------------------------------------------------------- open
    async def revalidate(self, node: Node, force: bool = False) -> ObjectInfo:
        """The object's current version, for open(): a fresh listing's word, the HEAD of the
        lookup just made, or a new HEAD."""
        local = self.cache.current(node.bucket, node.key)
        if local is not None and local.dirty:
            return local_info(local)  # local changes win until they are uploaded
        fresh = node.info is not None and self._fresh(node.info_at)
        if not force and fresh and node.info is not None and node.info_src in ("list", "head"):
            if node.info_src == "head":
                node.info_src = "used"
            return node.info
        row = self.cache.catalog.get(self.cache.origin, node.bucket, node.key) if self._offline else None
        if row is not None:
            return row_info(row)  # offline: the cached version is served, no probe waited for
        try:
            info = await self.store.head_object(node.bucket, node.key)
        except (Unreachable, CredentialsFailed):
            row = self.cache.catalog.get(self.cache.origin, node.bucket, node.key)
            if row is None:
                raise
            return row_info(row)  # offline, or no credentials: the cached version is served
        if info is None:
            node.info = None
            raise NotFound(f"s3://{node.bucket}/{node.key}")
        self._set_info(node, info, from_head=True)
        node.info_src = "used"
        return info

    # ---------------------------------------------------------------- listing
    async def listdir(self, node: Node) -> list[Node]:
        if not node.kind.is_dir:
            raise NotADirectory(repr(node))
        lock = self._listing_locks.setdefault(node.ino, trio.Lock())
        async with lock:  # concurrent `ls` of one directory share one listing
            if node.listing is None and self._offline:
                try:  # what the mount knows, without waiting for a probe
                    node.listing = Listing(self._offline_listing(node))
                    node.listing_at = 0.0  # which is not S3's word: lookups still ask
                except Unreachable:
                    pass  # nothing known: the store asks S3 now if its last probe is old
            if node.listing is None or (not self._fresh(node.listing_at) and not self._offline):
                marker: list[str] = []
                try:
                    children = await (self._list_buckets(node) if node.kind is Kind.ROOT
                                      else self._list_prefix(node, marker))
                except Unreachable:
                    if node.listing is None:  # offline, never listed: what the cache knows,
                        node.listing = Listing(self._offline_listing(node))
                        node.listing_at = 0.0  # which is not S3's word: lookups still ask
                    return list(node.listing.children.values())
                except CredentialsFailed:
                    if node.listing is None:
                        raise
                    return list(node.listing.children.values())  # the last one S3 gave
                node.listing = Listing(children, from_s3=True,
                                       marker=marker[0] if marker else None)
                node.listing_at = time.monotonic()
                if len(children) < ADOPT_PAGES * PAGE:
                    self._too_big.discard(node.ino)
        return list(node.listing.children.values())

    async def _list_buckets(self, node: Node) -> dict[bytes, Node]:
        names = self.buckets or await self.store.list_buckets()
        return {n.encode(): self.inodes.child(node, n.encode(), Kind.BUCKET, n, "") for n in names}

    async def _list_prefix(self, node: Node, marker: list[str], first: ListPage | None = None,
                           max_pages: int | None = None) -> dict[bytes, Node]:
        """The directory's children, from S3's listing (which starts with ``first``, when a
        lookup already has its first page); the ETag of its own marker object, if any, is
        appended to ``marker``. _TooBig when it takes more than ``max_pages`` pages."""
        bucket, prefix = node.bucket, node.key
        dirs: dict[str, None] = {}
        files: dict[str, ObjectInfo] = {}
        deleted = self.cache.pending_keys("delete")  # queued while offline, not applied yet
        token = None
        pages = 0
        while True:
            pages += 1
            if max_pages is not None and pages > max_pages:
                raise _TooBig
            page = first if first is not None else await self.store.list_page(bucket, prefix, token)
            first = None
            for p in page.prefixes:
                dirs[p[len(prefix):-1]] = None
            for k, info in zip(page.keys, page.objects):
                if k != prefix:
                    files[k[len(prefix):]] = info
                elif (bucket, k) not in deleted:
                    marker.append(info.etag)  # the directory's own marker object
            token = page.next_token
            if token is None:
                break
        known = self.cache.catalog.known_metadata(self.cache.origin, bucket, prefix) if files else {}
        made = self.cache.pending_keys("mkdir")
        for name in [n for n in dirs if (bucket, prefix + n + "/") in deleted
                     and (bucket, prefix + n + "/") not in made]:
            del dirs[name]  # removed while offline; its marker's delete is on its way
        for b, k in made:
            rest = k[len(prefix):-1]
            if b == bucket and k.startswith(prefix) and rest and "/" not in rest:
                dirs.setdefault(rest, None)
        children: dict[bytes, Node] = {}
        for name in dirs:
            if not valid_name(name):
                self._log_once(bucket, prefix + name + "/", "prefix is not a valid file name: hidden")
                continue
            children[name.encode()] = self.inodes.child(node, name.encode(), Kind.DIR, bucket,
                                                        prefix + name + "/")
        for name, info in files.items():
            key = prefix + name
            if (bucket, key) in deleted:
                continue
            if not valid_name(name):
                self._log_once(bucket, key, "key is not a valid file name: hidden")
                continue
            if name.encode() in children:
                self._log_once(bucket, key, "both an object and a prefix: shown as a directory")
                continue
            meta = known.get(key)
            if meta is not None and meta[0] == info.etag:
                info = dataclasses.replace(info, mtime_ns=meta[1], metadata=tuple(sorted(meta[2].items())))
            raw = name.encode()  # one bytes object for the node and the listing (100,000 keys)
            child = self.inodes.child(node, raw, kind_of(info), bucket, key)
            self._set_info(child, info)
            children[raw] = child
        for obj in self.cache.local_objects():  # written here, not yet (all) in S3
            rest = obj.key[len(prefix):]
            if obj.bucket == bucket and obj.key.startswith(prefix) and "/" not in rest and rest:
                info = local_info(obj)
                child = self.inodes.child(node, rest.encode(), kind_of(info), bucket, obj.key)
                self._set_info(child, info, from_head=True)
                children.setdefault(rest.encode(), child)
        return children

    # ---------------------------------------------------------------- offline
    def _offline_lookup(self, parent: Node, name: bytes, text: str) -> Node:
        """S3 cannot be asked: answer from what is known, and never ENOENT for what may exist."""
        if parent.listing is not None:  # a listing older than the TTL is still the best word
            node = parent.listing.children.get(name)
            if node is not None:
                return node
        seen = self.inodes.existing_child(parent, name) if parent.listing is None else None
        if seen is not None and _seen_in_s3(seen):
            return seen  # S3 showed it to this mount earlier
        if parent.kind is not Kind.ROOT:
            key = parent.key + text
            row = self.cache.catalog.get(self.cache.origin, parent.bucket, key)
            if row is not None:
                info = row_info(row)
                node = self.inodes.child(parent, name, kind_of(info), parent.bucket, key)
                self._set_info(node, info, from_head=True)
                return node
            if (self.cache.catalog.rows_under(self.cache.origin, parent.bucket, key + "/")
                    or (parent.bucket, key + "/") in self.cache.pending_keys("mkdir")):
                return self.inodes.child(parent, name, Kind.DIR, parent.bucket, key + "/")
            if self.queue_offline and self._known_offline(parent):
                raise NotFound(f"{text} (offline: not in the last listing of its directory)")
        raise Unreachable(f"s3://{parent.bucket}/{parent.key}{text}: S3 is unreachable")

    def _known_offline(self, parent: Node) -> bool:
        """Offline, does the mount know what ``parent`` holds (a listing, a cached object
        below it, or a directory made while offline)?"""
        if parent.listing is None:
            try:
                parent.listing = Listing(self._offline_listing(parent))
                parent.listing_at = 0.0
            except Unreachable:
                return False
        return True

    def offline_rmdir(self, node: Node) -> tuple[bool, str | None]:
        """Offline (queue mode), before an rmdir: is the directory empty, from what the mount
        knows? Returns (made offline, the ETag of its marker object in S3 or None). Known
        empty: its last listing by S3, with the changes made through the mount since, holds
        nothing; or it was made offline and nothing was made in it since. Raises NotEmpty when
        something is known to be in it, Unreachable when what it holds is not known (a listing
        pieced together from the cache says nothing of what else S3 has there)."""
        bucket, prefix = node.bucket, node.key
        made = (bucket, prefix) in self.cache.pending_keys("mkdir")
        below = (any(o.bucket == bucket and o.key.startswith(prefix)
                     for o in self.cache.local_objects())
                 or any(b == bucket and k.startswith(prefix) and k != prefix
                        for b, k in self.cache.pending_keys("mkdir")))
        listing = node.listing
        if below or (listing is not None and listing.children):
            raise NotEmpty(f"s3://{bucket}/{prefix}")
        if listing is not None and listing.from_s3:
            return made, listing.marker
        if self.cache.catalog.rows_under(self.cache.origin, bucket, prefix):
            raise NotEmpty(f"s3://{bucket}/{prefix}")  # cached objects below it
        if made:
            return True, None
        raise Unreachable(f"s3://{bucket}/{prefix}: S3 is unreachable, and what this directory "
                          f"holds is not known")

    def _offline_listing(self, node: Node) -> dict[bytes, Node]:
        """A directory never listed before: what the cache holds of it, or ENETUNREACH."""
        if node.kind is Kind.ROOT:
            raise Unreachable("the bucket list: S3 is unreachable")
        rows = self.cache.catalog.rows_under(self.cache.origin, node.bucket, node.key)
        made = [k for b, k in self.cache.pending_keys("mkdir")
                if b == node.bucket and k.startswith(node.key)]
        seen = [c for c in self.inodes.children(node) if _seen_in_s3(c)]
        if not rows and not made and not seen:
            raise Unreachable(f"s3://{node.bucket}/{node.key}: S3 is unreachable")
        children: dict[bytes, Node] = {c.name: c for c in seen}
        for key in made:  # directories made while offline
            first = key[len(node.key):].partition("/")[0]
            if valid_name(first):
                children.setdefault(first.encode(), self.inodes.child(
                    node, first.encode(), Kind.DIR, node.bucket, node.key + first + "/"))
        for row in rows:
            rest = row.key[len(node.key):]
            first, sep, _ = rest.partition("/")
            if not valid_name(first):
                continue
            if sep:
                children.setdefault(first.encode(), self.inodes.child(
                    node, first.encode(), Kind.DIR, node.bucket, node.key + first + "/"))
            else:
                info = row_info(row)
                child = self.inodes.child(node, first.encode(), kind_of(info), node.bucket, row.key)
                self._set_info(child, info, from_head=True)
                children.setdefault(first.encode(), child)
        return children

    # ---------------------------------------------------------------- changes
    def check_new_name(self, parent: Node, name: bytes) -> str:
        if not parent.kind.is_dir or parent.kind is Kind.ROOT:
            raise Denied("only files and directories inside a bucket can be created")
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidName("names must be UTF-8") from None
        if not valid_name(text):
            raise InvalidName(f"{text!r} cannot be a key component")
        return text

    def added(self, parent: Node, name: bytes, kind: Kind, key: str) -> Node:
        """A file or directory made through the mount: it is in the listing at once."""
        node = self.inodes.child(parent, name, kind, parent.bucket, key)
        self._negative.pop((parent.ino, name), None)
        if parent.listing is not None:
            parent.listing.children[name] = node
            parent.listing.forget_order()
        return node

    def readded(self, parent: Node, name: bytes, node: Node) -> None:
        """A renamed node, under its new name."""
        self._negative.pop((parent.ino, name), None)
        if parent.listing is not None:
            parent.listing.children[name] = node
            parent.listing.forget_order()

    def removed(self, parent: Node, name: bytes) -> None:
        if parent.listing is not None and parent.listing.children.pop(name, None) is not None:
            parent.listing.forget_order()
        if self.ttl > 0:
            self._negative[(parent.ino, name)] = time.monotonic() + self.ttl
        node = self.inodes.existing_child(parent, name)
        if node is not None:  # its last attributes stay: an open descriptor may still fstat it
            node.listing = None
            node.gone = True

    def local_changed(self, node: Node, obj) -> None:
        """The file's local version changed or was uploaded: it is what the file looks like."""
        self._set_info(node, local_info(obj), from_head=True)

    async def is_empty(self, node: Node) -> bool:
        page = await self.store.list_page(node.bucket, node.key, max_keys=2)
        if page.prefixes or any(k != node.key for k in page.keys):
            return False
        return not any(o.bucket == node.bucket and o.key.startswith(node.key)
                       for o in self.cache.local_objects())


def _seen_in_s3(node: Node) -> bool:
    """A node S3 (or the mount's own changes) showed to this mount: a directory, or an object
    whose attributes are known."""
    return not node.gone and (node.kind.is_dir or node.info is not None)


def kind_of(info: ObjectInfo) -> Kind:
    """A symbolic link stored the s3fs way has S_IFLNK in its x-amz-meta-mode."""
    mode = dict(info.metadata).get("mode")
    try:
        return Kind.SYMLINK if mode is not None and stat.S_ISLNK(int(mode)) else Kind.FILE
    except ValueError:
        return Kind.FILE


def row_info(row) -> ObjectInfo:
    """A cached version, as S3 described it when it was cached."""
    return ObjectInfo(etag=row.etag, size=row.size, last_modified_ns=row.mtime_ns,
                      mtime_ns=row.mtime_ns, metadata=tuple(sorted((row.metadata or {}).items())),
                      from_head=True)


def local_info(obj) -> ObjectInfo:
    """What a file with local changes looks like: its local size and mtime."""
    meta = tuple(sorted((obj.row.metadata or {}).items()))
    return ObjectInfo(etag=obj.etag, size=obj.size, last_modified_ns=obj.row.mtime_ns,
                      mtime_ns=obj.row.mtime_ns, metadata=meta, from_head=True)
