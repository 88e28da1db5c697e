"""Metadata calls: HEAD, LIST, ListBuckets, markers, deletes, the probe, the start-up check."""
from __future__ import annotations

import logging
import sys

import trio

from ..errors import (Changed, CredentialsFailed, Denied, MountError, NotFound, S3StashError, Unreachable,
                      Untrusted)
from .classify import _classify, _conditional, _conditions
from .client import Client
from .types import ListPage, ObjectInfo, _ns, parse_meta_mtime, strip_etag

log = logging.getLogger(__name__)

class MetadataCalls(Client):
    """HEAD, LIST, ListBuckets, markers, deletes, the probe and the start-up check."""

    def _info_from_head(self, r) -> ObjectInfo:
        meta = {k.lower(): v for k, v in (r.get("Metadata") or {}).items()}
        lm = _ns(r.get("LastModified"))
        mtime = parse_meta_mtime(meta.get("mtime"))
        return ObjectInfo(etag=strip_etag(r.get("ETag", "")), size=int(r.get("ContentLength", 0)),
                          last_modified_ns=lm, mtime_ns=mtime if mtime is not None else lm,
                          metadata=tuple(sorted(meta.items())), from_head=True,
                          storage_class=r.get("StorageClass") or "STANDARD",
                          restore=r.get("Restore") or None,
                          archive_status=r.get("ArchiveStatus") or None)

    async def head_object(self, bucket: str, key: str) -> ObjectInfo | None:
        """The object's current version, or None when there is no such key."""
        what = f"HEAD s3://{bucket}/{key}"

        def call():
            try:
                return self._info_from_head(self._object_call(what, "head_object", bucket, key, {}))
            except NotFound:
                return None
        return await self._run(what, self._meta, call, abandon=True)

    async def head_bucket(self, bucket: str) -> bool:
        what = f"HEAD bucket {bucket}"

        def call():
            try:
                self._call(what, "head_bucket", Bucket=bucket)
                return True
            except NotFound:
                return False
        return await self._run(what, self._meta, call, abandon=True)

    async def probe(self, bucket: str | None, limiter: trio.CapacityLimiter | None = None) -> bool:
        """Does S3 answer? (One request, no retries: the connectivity probe; its thread is
        abandoned if the caller stops waiting.)"""
        def call():
            try:
                if bucket:
                    self._call("probe", "head_bucket", Bucket=bucket)
                else:
                    self._call("probe", "list_buckets")
            except CredentialsFailed as e:
                if not e.rejected:  # S3 was never asked (the provider failed): is it there?
                    try:
                        self._direct.knock(bucket)
                    except Exception as e2:  # noqa: BLE001 - classified, never swallowed
                        raise _classify(e2, "probe") from e2
            except (NotFound, Denied):
                pass  # it answered
        try:
            await self._run("probe", limiter or self._meta, call, attempts=1, probe=True)
            return True
        except Unreachable:
            return False
        except S3StashError:
            return True

    async def list_buckets(self) -> list[str]:
        r = await self._run("ListBuckets", self._meta,
                            lambda: self._call("ListBuckets", "list_buckets"), abandon=True)
        return [b["Name"] for b in r.get("Buckets", [])]

    async def list_page(self, bucket: str, prefix: str, token: str | None = None,
                        max_keys: int = 1000) -> ListPage:
        """One ListObjectsV2 page with delimiter '/'."""
        what = f"LIST s3://{bucket}/{prefix}"
        kwargs = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": max_keys}
        if token:
            kwargs["ContinuationToken"] = token

        def call():
            r = self._call(what, "list_objects_v2", **kwargs)
            objs, keys = [], []
            for o in r.get("Contents", []):
                lm = _ns(o.get("LastModified"))
                keys.append(o["Key"])
                # one string per storage class, not one per key the listing keeps
                objs.append(ObjectInfo(etag=strip_etag(o.get("ETag", "")), size=int(o.get("Size", 0)),
                                       last_modified_ns=lm, mtime_ns=lm,
                                       storage_class=sys.intern(o.get("StorageClass") or "STANDARD")))
            prefixes = [p["Prefix"] for p in r.get("CommonPrefixes", [])]
            nxt = r.get("NextContinuationToken") if r.get("IsTruncated") else None
            return ListPage(prefixes, objs, keys, nxt)
        return await self._run(what, self._meta, call, abandon=True)

    async def list_all(self, bucket: str, prefix: str) -> list[tuple[str, ObjectInfo]]:
        """Every key under ``prefix``, at any depth (for renaming a directory)."""
        what = f"LIST s3://{bucket}/{prefix} (recursive)"
        out: list[tuple[str, ObjectInfo]] = []
        token = None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            r = await self._run(what, self._meta, lambda kw=kwargs: self._call(
                what, "list_objects_v2", **kw), abandon=True)
            for o in r.get("Contents", []):
                out.append((o["Key"], ObjectInfo(etag=strip_etag(o.get("ETag", "")),
                                                 size=int(o.get("Size", 0)), last_modified_ns=0,
                                                 mtime_ns=0,
                                                 storage_class=o.get("StorageClass") or "STANDARD")))
            token = r.get("NextContinuationToken") if r.get("IsTruncated") else None
            if token is None:
                return out

    async def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None:
        """Best effort, even while being cancelled: no parts left behind to be billed."""
        what = f"abort multipart upload of s3://{bucket}/{key}"
        with trio.CancelScope(shield=True):
            try:
                await self._run(what, self._meta, lambda: self._call(
                    what, "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id),
                    attempts=1)
            except Exception as e:  # noqa: BLE001 - best effort
                log.warning("%s: could not abort: %s", what, e)

    async def put_marker(self, bucket: str, key: str, only_new: bool = False) -> None:
        """A directory marker; with ``only_new``, an existing object of that key is left alone
        (If-None-Match: *) and that counts as done."""
        what = f"PUT s3://{bucket}/{key}"

        def call():
            try:
                self._call(what, "put_object", Bucket=bucket, Key=key, Body=b"",
                           **_conditions("" if only_new else None))
            except Changed:
                if not only_new:
                    raise
        await self._run(what, self._meta, call)

    async def delete_object(self, bucket: str, key: str, base: str | None = None) -> None:
        """Delete ``key``; with ``base``, only if it is still that version (If-Match), else
        Conflict. A key already gone counts as deleted."""
        what = f"DELETE s3://{bucket}/{key}"

        def call():
            try:
                self._call(what, "delete_object", Bucket=bucket, Key=key,
                           **({"IfMatch": f'"{base}"'} if base else {}))
            except NotFound:
                pass
            except Changed as e:
                raise _conditional(what, base, e) from None
        await self._run(what, self._meta, call)

    async def restore_object(self, bucket: str, key: str, days: int | None, tier: str) -> str:
        """Ask S3 to restore an archived object: a copy readable for ``days`` (GLACIER,
        DEEP_ARCHIVE), or, with ``days`` None, back to the frequent tier (INTELLIGENT_TIERING's
        archive tiers, which take no days). Returns "requested" (202), "restored" (200: a
        restored copy was there already; S3 has moved its expiry) or "in progress" (409
        RestoreAlreadyInProgress)."""
        what = f"RESTORE s3://{bucket}/{key}"
        request: dict = {"GlacierJobParameters": {"Tier": tier}}
        if days is not None:
            request["Days"] = days

        def call():
            try:
                r = self._call(what, "restore_object", Bucket=bucket, Key=key,
                               RestoreRequest=request)
            except S3StashError as e:
                if e.s3_code == "RestoreAlreadyInProgress":
                    return "in progress"
                raise
            status = r.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return "restored" if status == 200 else "requested"
        return await self._run(what, self._meta, call)

    # ---------------------------------------------------------------- start-up
    def check_access(self, bucket: str | None, buckets: tuple[str, ...]) -> None:
        """Fail mounting early, with one clear line, when S3 will not serve us: a missing
        bucket, a refusal, no answer (no credentials at all: see ``Client``)."""
        targets = [bucket] if bucket else list(buckets)
        try:
            if targets:
                for b in targets:
                    try:
                        self.credentials.call(lambda b=b: self._call(f"bucket {b}", "head_bucket",
                                                                     Bucket=b))
                    except NotFound:
                        raise MountError(f"bucket not found: {b}") from None
            else:
                self.credentials.call(lambda: self._call("ListBuckets", "list_buckets"))
        except CredentialsFailed as e:
            raise MountError(e.problem) from None
        except Untrusted as e:
            raise MountError(f"cannot reach S3: the server's TLS certificate is not trusted "
                             f"({e.reason}); give its CA with --ca-bundle or AWS_CA_BUNDLE") from None
        except Denied as e:
            advice = self.denied_advice(e)
            if self.unsigned:
                advice = advice or "unsigned requests may be refused by a bucket that is not public"
            else:
                advice = "check the credentials, profile and bucket" + (f"; {advice}" if advice else "")
            raise MountError(f"S3 refused access ({e}); {advice}") from None
        except Unreachable as e:
            err = MountError(f"cannot reach S3: {e}")
            err.unreachable = True
            raise err from None
        except S3StashError as e:
            raise MountError(f"S3 error at mount: {e}") from None
