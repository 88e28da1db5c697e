"""The inode table: numbers, parent/name links, lookup counts.

Inode numbers only go up and are never reused. A (parent, name) pair keeps its number for the
life of the mount, so `find`, `du` and `ls -i` see stable numbers; it gets a new one only when
the entry changes kind (a file that became a directory), because the kernel must not see one
inode change type.
"""
from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING

from .errors import NotFound

if TYPE_CHECKING:
    from .namespace import Listing
    from .store import ObjectInfo

log = logging.getLogger(__name__)

ROOT_INODE = 1


class Kind(enum.Enum):
    ROOT = "root"  # the bucket list (no --bucket)
    BUCKET = "bucket"  # a bucket's top level (or the --bucket root)
    DIR = "dir"  # a prefix
    FILE = "file"  # an object
    SYMLINK = "symlink"  # an object holding a link's target, the s3fs way (x-amz-meta-mode)

    @property
    def is_dir(self) -> bool:
        return self not in (Kind.FILE, Kind.SYMLINK)

    @property
    def is_object(self) -> bool:
        return self in (Kind.FILE, Kind.SYMLINK)


class Node:
    """One inode. ``key`` is the object key for a FILE and the prefix ('' or ending in '/') for
    a BUCKET or DIR. The namespace keeps its freshness data in ``info``/``listing``."""

    __slots__ = ("ino", "parent", "name", "kind", "bucket", "key", "lookups", "info", "info_at",
                 "info_src", "listing", "listing_at", "gone")

    def __init__(self, ino: int, parent: int, name: bytes, kind: Kind, bucket: str, key: str):
        self.ino = ino
        self.parent = parent
        self.name = name
        self.kind = kind
        self.bucket = bucket
        self.key = key
        self.lookups = 0
        self.info: ObjectInfo | None = None  # what S3 (or the cache) says of a FILE
        self.info_at = 0.0  # monotonic time ``info`` was learnt
        self.info_src = ""  # "list", "head" (not yet used by an open) or "used"
        self.listing: Listing | None = None  # a directory's children
        self.listing_at = 0.0
        self.gone = False  # removed through the mount (unlink, rmdir); found again: False

    def __repr__(self) -> str:
        return f"Node({self.ino}, {self.kind.value}, s3://{self.bucket}/{self.key})"


class InodeTable:
    """Owns every Node. Lookup counts are the kernel's: ``lookup``/``create``/``mkdir`` and each
    ``readdir_reply`` add one, ``forget`` subtracts; ``forget`` never raises."""

    def __init__(self, root_kind: Kind, bucket: str, prefix: str):
        root = Node(ROOT_INODE, ROOT_INODE, b"", root_kind, bucket, prefix)
        root.lookups = 1
        self._nodes: dict[int, Node] = {ROOT_INODE: root}
        self._names: dict[tuple[int, bytes], int] = {}
        self._next = ROOT_INODE + 1

    @property
    def root(self) -> Node:
        return self._nodes[ROOT_INODE]

    def get(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise NotFound(f"inode {ino} is not known") from None

    def child(self, parent: Node, name: bytes, kind: Kind, bucket: str, key: str) -> Node:
        """The node for ``name`` in ``parent``, created on first sight."""
        ino = self._names.get((parent.ino, name))
        node = self._nodes.get(ino) if ino is not None else None
        if node is not None and node.kind is kind:
            node.gone = False
            return node
        node = Node(self._next, parent.ino, name, kind, bucket, key)
        self._next += 1
        self._nodes[node.ino] = node
        self._names[(parent.ino, name)] = node.ino
        return node

    def existing_child(self, parent: Node, name: bytes) -> Node | None:
        ino = self._names.get((parent.ino, name))
        return self._nodes.get(ino) if ino is not None else None

    def children(self, parent: Node) -> list[Node]:
        """Every node known under ``parent`` (a scan: for the rare offline listing)."""
        return [self._nodes[ino] for (p, _), ino in self._names.items()
                if p == parent.ino and ino in self._nodes]

    def move(self, node: Node, parent: Node, name: bytes, key: str) -> None:
        """rename: the node keeps its number under its new name; a node below a moved
        directory follows it (its key gets the new prefix)."""
        old_key = node.key
        self._names.pop((node.parent, node.name), None)
        replaced = self._names.get((parent.ino, name))
        if replaced is not None and replaced != node.ino:
            self._nodes[replaced].info = None
        node.parent, node.name, node.key = parent.ino, name, key
        self._names[(parent.ino, name)] = node.ino
        if node.kind.is_dir:
            for other in self._nodes.values():
                if other is not node and other.bucket == node.bucket and other.key.startswith(old_key):
                    other.key = key + other.key[len(old_key):]
                    other.listing = None

    def incref(self, node: Node, n: int = 1) -> None:
        node.lookups += n

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped ``n`` references. The number stays reserved for the name, so it
        stays stable; the node's cached listing is released to bound memory."""
        node = self._nodes.get(ino)
        if node is None:
            return
        node.lookups = max(0, node.lookups - n)
        if node.lookups == 0:
            node.listing = None
