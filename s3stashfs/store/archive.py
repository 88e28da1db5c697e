"""Archived objects: which storage classes and tiers S3 will not GET until they are restored,
and what an object's x-amz-restore says. Pure functions of ``ObjectInfo``; no S3 call.

Archived (not readable in real time): GLACIER and DEEP_ARCHIVE, and INTELLIGENT_TIERING objects
in its ARCHIVE_ACCESS or DEEP_ARCHIVE_ACCESS tier. GLACIER_IR is not: it reads like STANDARD.
A listing names the storage class but says nothing of a restore, nor of an INTELLIGENT_TIERING
object's tier: only a HEAD does (x-amz-restore, x-amz-archive-status).
"""
from __future__ import annotations

import dataclasses
import re

from .types import ObjectInfo

ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
ARCHIVE_TIERS = frozenset({"ARCHIVE_ACCESS", "DEEP_ARCHIVE_ACCESS"})
TIERED = "INTELLIGENT_TIERING"
_ONGOING = re.compile(r'ongoing-request\s*=\s*"?(true|false)"?', re.I)
_EXPIRY = re.compile(r'expiry-date\s*=\s*"([^"]*)"', re.I)


@dataclasses.dataclass(frozen=True)
class Restore:
    """What x-amz-restore says: a restore under way, or a restored copy until ``expiry``."""

    ongoing: bool
    expiry: str | None = None  # S3's HTTP date, as given (None while ongoing, and for tiers)


def parse_restore(header: str | None) -> Restore | None:
    """``ongoing-request="false", expiry-date="Fri, 21 Dec 2012 00:00:00 GMT"`` and the like;
    None when there is no header (never restored, or the restored copy expired)."""
    if not header:
        return None
    m = _ONGOING.search(header)
    if m is None:
        return None
    e = _EXPIRY.search(header)
    return Restore(ongoing=m.group(1).lower() == "true", expiry=e.group(1) if e else None)


def may_be_archived(info: ObjectInfo) -> bool:
    """Could this object be archived and not restored? For a listing's word (no restore state,
    no tier) that takes a HEAD to know; for a HEAD's, ``label`` and ``readable`` tell."""
    if info.from_head:
        return archive_label(info) is not None and not readable(info)
    return info.storage_class in ARCHIVE_CLASSES or info.storage_class == TIERED


def archive_label(info: ObjectInfo) -> str | None:
    """Where the object is archived, for messages ("GLACIER", "DEEP_ARCHIVE",
    "INTELLIGENT_TIERING ARCHIVE_ACCESS", ...), whether restored or not; None when it is not in
    an archive class or tier (as far as ``info`` knows)."""
    if info.storage_class in ARCHIVE_CLASSES:
        return info.storage_class
    if info.storage_class == TIERED and (info.archive_status or "") in ARCHIVE_TIERS:
        return f"{TIERED} {info.archive_status}"
    return None


def readable(info: ObjectInfo) -> bool:
    """Will S3 answer a GET of this object now (from what a HEAD said)? An archived object only
    with a completed restore (x-amz-restore: ongoing-request="false")."""
    if archive_label(info) is None:
        return True
    r = parse_restore(info.restore)
    return r is not None and not r.ongoing


def restore_state(info: ObjectInfo) -> str | None:
    """``user.s3.restore``'s value: "not restored", "in progress", "restored until DATE"
    ("restored" when S3 gave no date); None for an object that is not archived."""
    if archive_label(info) is None:
        r = parse_restore(info.restore)  # a tier's restore brought the object back: say so
        return None if r is None else ("in progress" if r.ongoing else _restored(r))
    r = parse_restore(info.restore)
    if r is None:
        return "not restored"
    return "in progress" if r.ongoing else _restored(r)


def _restored(r: Restore) -> str:
    return f"restored until {r.expiry}" if r.expiry else "restored"
