"""Data calls: GETs into cache files, uploads, copies, parts and sums."""
from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections.abc import Callable

from .. import checksums, crashpoints
from ..errors import Changed, ChecksumMismatch, Conflict, Denied, Interrupted, NotFound, S3StashError, StoreError
from .classify import _answered_etag, _classify, _conditional, _conditions, _interrupted
from .direct import _check_range
from .metadata import MetadataCalls
from .types import (
    CHECKSUMS,
    COPY_MAX,
    PIECE,
    PartsInfo,
    _checksum_digests,
    _encrypted,
    _pread_all,
    is_md5_etag,
    run_all,
    strip_etag,
)

log = logging.getLogger(__name__)

class Store(MetadataCalls):
    """Every S3 call the mount makes. The layers: ``RetryMixin`` (retries, offline rules),
    ``Client`` (clients, the direct path, one call), ``MetadataCalls``, and here the data calls:
    GETs into cache files, uploads (single and multipart), copies, parts and sums."""

    async def fetch_range(self, bucket: str, key: str, etag: str, start: int, end: int, fd: int,
                          progress: Callable[[int, bytes], None]) -> None:
        """GET bytes [start, end) of the version ``etag`` into ``fd`` at the same offsets.

        ``progress(offset, piece)`` is called from the worker thread after each piece is
        written, with the piece (its bytes end at ``offset``).
        If-Match pins the version: a changed object raises Changed, never mixes bytes. A try
        that broke off is picked up where it got to: what was written and reported stays."""
        what = f"GET s3://{bucket}/{key} bytes={start}-{end - 1}"
        reached = [start]  # the end of what has been written (and reported), across tries

        def call():
            at = reached[0]
            want = f"bytes={at}-{end - 1}"
            r = self._object_call(what, "get_object", bucket, key,
                                  {"Range": want, "If-Match": f'"{etag}"'},
                                  Range=want, IfMatch=f'"{etag}"')
            got = strip_etag(r.get("ETag", etag))
            if got != etag:
                r["Body"].close()
                raise Changed(f"{what}: ETag is now {got}")
            _check_range(what, r, at, end)
            self._drain(what, r["Body"], fd, at, end, progress, reached=reached)
        await self._run(what, self._data, call)

    async def fetch_whole(self, bucket: str, key: str, etag: str, size: int,
                          fd: int | Callable[[], int], progress: Callable[[int], None],
                          checked: list[str] | None = None) -> int:
        """GET a whole (small) object, verify it against its ETag's MD5 (single-part uploads)
        and S3's stored checksum (when it has one) before reporting any byte as present; a try
        that broke off starts again from the first byte.

        ``fd`` may be a function that opens the file, called in the worker thread once S3 has
        answered; the descriptor written to is returned. ``checked`` gets the names of the
        checks that passed ("md5", "crc64nvme", ...)."""
        what = f"GET s3://{bucket}/{key}"
        opened: list[int] = []

        def call():
            r = self._object_call(what, "get_object", bucket, key,
                                  {"If-Match": f'"{etag}"', "x-amz-checksum-mode": "ENABLED"},
                                  IfMatch=f'"{etag}"', ChecksumMode="ENABLED")
            if not opened:
                opened.append(fd() if callable(fd) else fd)
            got = strip_etag(r.get("ETag", etag))
            if got != etag:
                r["Body"].close()
                raise Changed(f"{what}: ETag is now {got}")
            md5 = hashlib.md5(usedforsecurity=False)
            checks = _checksum_digests(r)
            self._drain(what, r["Body"], opened[0], 0, size, None, md5, [d for _, _, d in checks])
            kms = r.get("ServerSideEncryption") == "aws:kms" or r.get("SSECustomerAlgorithm")
            if is_md5_etag(etag) and not kms and md5.hexdigest() != etag:
                raise ChecksumMismatch(f"{what}: MD5 {md5.hexdigest()} does not match ETag {etag}")
            for algo, expected, digest in checks:
                if base64.b64encode(digest.digest()).decode() != expected:
                    raise ChecksumMismatch(f"{what}: {algo} does not match S3's {expected}")
            if checked is not None:
                checked[:] = ((["md5"] if is_md5_etag(etag) and not kms else [])
                              + [algo.lower() for algo, _, _ in checks])
            progress(size)
        try:
            await self._run(what, self._data, call)
        except BaseException:
            if opened and callable(fd):
                os.close(opened[0])
            raise
        return opened[0]

    async def object_parts(self, bucket: str, key: str, etag: str, size: int) -> PartsInfo:
        """What S3 says about the parts and sums of version ``etag`` of an object of ``size``
        bytes, in as few calls as the server allows: GetObjectAttributes (every part's size and
        sum in one call, where the server has them), else HEAD ?partNumber=1 (part 1's size and
        the parts count); and the object's own checksum with its type (from the attributes, or a
        HEAD with checksum mode). Changed when S3 has another version now."""
        what = f"parts of s3://{bucket}/{key}"
        nparts = checksums.etag_parts(etag)

        def call():
            info: dict = {"etag": etag, "parts": nparts}
            if nparts is not None:
                self._parts_from_attributes(what, bucket, key, etag, info)
                if info.get("sizes") is None:
                    length, sse = self.head_part(what, bucket, key, etag, 1, nparts)
                    info["encrypted"] = sse
                    if length and -(-size // length) == nparts:
                        info["part_size"] = length
            if info.get("checksum") is None or "encrypted" not in info:
                r = self._call(what, "head_object", Bucket=bucket, Key=key, IfMatch=f'"{etag}"',
                               ChecksumMode="ENABLED")
                info["encrypted"] = _encrypted(r)
                if info.get("checksum") is None:
                    for algo in CHECKSUMS:
                        if r.get(f"Checksum{algo}"):
                            value, n = checksums.split_composite(r[f"Checksum{algo}"])
                            info["checksum"] = (algo, value)
                            info["checksum_type"] = ("COMPOSITE" if n is not None else
                                                     r.get("ChecksumType") or
                                                     (None if nparts else "FULL_OBJECT"))
                            break
            return PartsInfo(**info)
        return await self._run(what, self._meta, call)

    def _parts_from_attributes(self, what: str, bucket: str, key: str, etag: str,
                               info: dict) -> None:
        """GetObjectAttributes into ``info``: sizes and sums of every part, the checksum. A
        server without it (or a policy without s3:GetObjectAttributes) leaves ``info`` alone."""
        sizes: list[int] = []
        sums: dict[str, list[str]] = {}
        marker = 0
        for _ in range(10):  # 1,000 parts a page; S3 allows 10,000 parts
            try:
                r = self._call(what, "get_object_attributes", Bucket=bucket, Key=key,
                               ObjectAttributes=["ETag", "Checksum", "ObjectParts", "ObjectSize"],
                               MaxParts=1000, PartNumberMarker=marker)
            except (StoreError, Denied) as e:
                log.debug("%s: no GetObjectAttributes (%s): asking with HEAD", what, e)
                return
            got = strip_etag(r.get("ETag", etag))
            if got != etag:
                raise Changed(f"{what}: ETag is now {got}")
            c = r.get("Checksum") or {}
            for algo in CHECKSUMS:
                if c.get(f"Checksum{algo}") and info.get("checksum") is None:
                    value, n = checksums.split_composite(c[f"Checksum{algo}"])
                    info["checksum"] = (algo, value)
                    info["checksum_type"] = "COMPOSITE" if n is not None else c.get("ChecksumType")
            op = r.get("ObjectParts") or {}
            for part in op.get("Parts") or []:
                sizes.append(int(part.get("Size", -1)))
                for algo in CHECKSUMS:
                    if part.get(f"Checksum{algo}"):
                        sums.setdefault(algo, []).append(part[f"Checksum{algo}"])
            if not op.get("IsTruncated") or not op.get("NextPartNumberMarker"):
                break
            marker = int(op["NextPartNumberMarker"])
        if sizes and len(sizes) == info["parts"] and min(sizes) >= 0:
            info["sizes"] = tuple(sizes)
            for algo, values in sums.items():
                if len(values) == len(sizes):
                    info["part_sums"] = (algo, tuple(values))
                    break

    async def part_size(self, bucket: str, key: str, etag: str, n: int) -> int | None:
        """The size of part ``n`` of multipart version ``etag`` (None: the server does not say)."""
        what = f"parts of s3://{bucket}/{key}"
        size, _ = await self._run(what, self._meta, self.head_part, what, bucket, key, etag, n,
                                  checksums.etag_parts(etag))
        return size

    def head_part(self, what: str, bucket: str, key: str, etag: str, n: int,
                  nparts: int) -> tuple[int | None, bool]:
        """In a worker thread: (size of part ``n``, encrypted) from HEAD ?partNumber=n; size None
        when the server does not say. moto answers with the part's own ETag (real S3 and
        SeaweedFS with the object's), so If-Match cannot be sent: a multipart ETag other than
        ours, or another parts count, means the object changed."""
        r = self._call(what, "head_object", Bucket=bucket, Key=key, PartNumber=n)
        got = strip_etag(r.get("ETag", etag))
        count = r.get("PartsCount")
        if (got != etag and not is_md5_etag(got)) or (count is not None and int(count) != nparts):
            raise Changed(f"{what}: ETag is now {got} ({count} parts)")
        length = r.get("ContentLength")
        return (int(length) if count is not None and length is not None else None), _encrypted(r)

    def _drain(self, what, body, fd, start, end, progress, digest=None, more_digests=(),
               reached: list[int] | None = None):
        """Write the body into ``fd`` from ``start``; it must be exactly ``end - start`` bytes.
        ``reached[0]`` follows the end of what is written. Failures of the network here come
        after S3's status line: Interrupted, never Unreachable."""
        pos = start
        try:
            while True:
                chunk = body.read(PIECE)
                if not chunk:
                    break
                if pos + len(chunk) > end:
                    raise Changed(f"{what}: more bytes than expected")
                view = memoryview(chunk)
                while view:
                    n = os.pwrite(fd, view, pos)
                    pos += n
                    view = view[n:]
                    if reached is not None:
                        reached[0] = pos
                if digest is not None:
                    digest.update(chunk)
                for d in more_digests:
                    d.update(chunk)
                if progress is not None:
                    progress(pos, chunk)
        except S3StashError:
            raise
        except Exception as e:  # noqa: BLE001 - classified, or the cache's own disk error
            net = _interrupted(e, what)
            if net is not None:
                raise net from e
            if isinstance(e, OSError):
                raise  # writing the cache file failed (ENOSPC, EIO): not S3's fault
            raise _classify(e, what, answered=True) from e
        finally:
            body.close()
        if pos != end:
            raise Interrupted(f"{what}: the body ended after {pos - start} bytes of {end - start}")

    # ---------------------------------------------------------------- changes
    async def put_file(self, bucket: str, key: str, fd: int, size: int,
                       metadata: dict[str, str], base: str | None = None) -> str:
        """PUT the first ``size`` bytes of ``fd`` as one object. Content-MD5 makes S3 check what
        it received, and the ETag it answers must be that MD5. Returns the new ETag.

        ``base``: the version this change was based on (see ``_conditions``); when S3 no longer
        has it, Conflict is raised and nothing is written."""
        what = f"PUT s3://{bucket}/{key}"

        def call():
            data = _pread_all(fd, 0, size)
            md5 = hashlib.md5(data, usedforsecurity=False)
            try:
                r = self._call(what, "put_object", kind="write", Bucket=bucket, Key=key, Body=data,
                               Metadata=metadata, ContentMD5=base64.b64encode(md5.digest()).decode(),
                               **_conditions(base))
            except S3StashError as e:
                e = _conditional(what, base, e)
                if isinstance(e, Conflict) and self._holds(what, bucket, key, md5.hexdigest(),
                                                           metadata):
                    return md5.hexdigest()
                raise e from None
            etag = _answered_etag(what, r)
            if is_md5_etag(etag) and etag != md5.hexdigest():
                raise ChecksumMismatch(f"{what}: S3 stored MD5 {etag}, we sent {md5.hexdigest()}")
            return etag
        return await self._run(what, self._data, call)

    def _holds(self, what: str, bucket: str, key: str, etag: str,
               metadata: dict[str, str] | None) -> bool:
        """Does S3 now hold exactly this version (ETag, and the metadata when given)? A change
        whose answer was lost (reset after sending, a 500 after S3 had done it) may have been
        made: its retry then fails its own condition (412 to If-None-Match: *, or NoSuchUpload),
        which is our success, not a conflict."""
        try:
            info = self._info_from_head(self._object_call(f"{what} (check)", "head_object",
                                                          bucket, key, {}))
        except NotFound:
            return False
        mine = info.etag == etag and (
            metadata is None or dict(info.metadata) == {k.lower(): v for k, v in metadata.items()})
        if mine:
            log.info("%s: S3 already holds this version (ETag %s): an earlier try's answer was "
                     "lost", what, etag)
        return mine

    async def multipart_upload(self, bucket: str, key: str, fd: int, size: int, part_size: int,
                               metadata: dict[str, str], base: str | None = None) -> str:
        """Upload ``fd`` in parts sent in parallel, each with its Content-MD5; the ETag S3 gives
        the whole must be the one its parts' MD5s make. Aborted on any failure."""
        upload_id = await self.start_multipart(bucket, key, metadata)
        crashpoints.hit("upload.multipart_created")
        starts = list(range(0, size, part_size)) or [0]
        parts: list[tuple[bytes, str]] = [(b"", "")] * len(starts)

        async def part(i: int, start: int) -> None:
            parts[i] = await self.upload_part(bucket, key, upload_id, i + 1, fd, start,
                                              min(part_size, size - start))
        try:
            await run_all(part, starts)
            return await self.complete_multipart(bucket, key, upload_id, parts, base)
        except BaseException:
            await self.abort_multipart(bucket, key, upload_id)
            raise

    async def start_multipart(self, bucket: str, key: str, metadata: dict[str, str]) -> str:
        what = f"multipart upload of s3://{bucket}/{key}"
        r = await self._run(what, self._meta, lambda: self._call(
            what, "create_multipart_upload", Bucket=bucket, Key=key, Metadata=metadata))
        return r["UploadId"]

    async def upload_part(self, bucket: str, key: str, upload_id: str, n: int, fd: int,
                          start: int, length: int) -> tuple[bytes, str]:
        """Part ``n`` = ``length`` bytes of ``fd`` at ``start``, with its Content-MD5; returns
        (MD5 digest, ETag), the ETag checked to be that MD5."""
        what = f"multipart upload of s3://{bucket}/{key}, part {n}"

        def call():
            data = _pread_all(fd, start, length)
            md5 = hashlib.md5(data, usedforsecurity=False)
            rr = self._call(what, "upload_part", kind="write", Bucket=bucket, Key=key,
                            UploadId=upload_id, PartNumber=n, Body=data,
                            ContentMD5=base64.b64encode(md5.digest()).decode())
            crashpoints.hit("upload.part_sent")  # in the worker thread, S3 has the part
            etag = _answered_etag(what, rr)
            if etag != md5.hexdigest():
                raise ChecksumMismatch(f"{what}: S3 stored MD5 {etag}")
            return md5.digest(), etag
        return await self._run(what, self._data, call)

    async def complete_multipart(self, bucket: str, key: str, upload_id: str,
                                 parts: list[tuple[bytes, str]], base: str | None = None) -> str:
        """Join the parts; the ETag S3 gives the whole must be the one the parts' MD5s make.

        ``base`` as for ``put_file``, sent with the completion. An If-Match is also checked with
        a HEAD first: not every S3-compatible server honours it on completion (moto does not),
        and a completed upload cannot be taken back."""
        what = f"multipart upload of s3://{bucket}/{key}"
        listed = [{"ETag": f'"{e}"', "PartNumber": i + 1} for i, (_, e) in enumerate(parts)]
        joined = hashlib.md5(b"".join(d for d, _ in parts), usedforsecurity=False).hexdigest()
        expected = f"{joined}-{len(parts)}"
        if base:
            head = await self.head_object(bucket, key)
            if head is not None and head.etag == expected:
                # an earlier completion of these very parts went through, its answer lost
                log.info("%s: S3 already holds this version (ETag %s)", what, expected)
                await self.abort_multipart(bucket, key, upload_id)
                return expected
            if head is None or head.etag != base:
                raise Conflict(f"{what}: S3 no longer has the version this change was based on "
                               f"(ETag {base}; now {head.etag if head else 'no object'})")

        def call():
            try:
                r = self._call(what, "complete_multipart_upload", kind="write",
                               Bucket=bucket, Key=key,
                               UploadId=upload_id, MultipartUpload={"Parts": listed},
                               **_conditions(base))
            except S3StashError as e:
                e = _conditional(what, base, e)
                # NoSuchUpload: an earlier try completed it (or it was aborted: then not ours)
                if isinstance(e, (Conflict, NotFound)) and self._holds(what, bucket, key,
                                                                       expected, None):
                    return {"ETag": expected, "refused": isinstance(e, Conflict)}
                raise e from None
            return {"ETag": _answered_etag(what, r)}
        crashpoints.hit("upload.before_complete")
        r = await self._run(what, self._meta, call)
        crashpoints.hit("upload.completed")
        if r.get("refused"):  # an earlier upload of the same parts is in S3; not this one
            await self.abort_multipart(bucket, key, upload_id)
        etag = strip_etag(r.get("ETag", ""))
        if etag != expected:
            raise ChecksumMismatch(f"{what}: S3 made ETag {etag}, the parts make {expected}")
        return etag

    async def replace_metadata(self, bucket: str, key: str, etag: str,
                               metadata: dict[str, str]) -> str:
        """Change an object's metadata in place (CopyObject onto itself, REPLACE), only if it is
        still version ``etag``; the content is not uploaded again. Returns the new ETag."""
        what = f"COPY s3://{bucket}/{key} (metadata)"
        r = await self._run(what, self._meta, lambda: self._call(
            what, "copy_object", kind="write", Bucket=bucket, Key=key,
            CopySource={"Bucket": bucket, "Key": key},
            CopySourceIfMatch=f'"{etag}"', MetadataDirective="REPLACE", Metadata=metadata))
        return strip_etag(r.get("CopyObjectResult", {}).get("ETag", ""))

    async def copy(self, bucket: str, src: str, dst: str, etag: str, size: int,
                   part_size: int) -> str:
        """Server-side copy of version ``etag`` of ``src`` to ``dst`` (metadata kept); in parts
        above 5 GiB, CopyObject's limit. Returns the new object's ETag."""
        what = f"COPY s3://{bucket}/{src} to {dst}"
        source = {"Bucket": bucket, "Key": src}
        if size <= COPY_MAX:
            r = await self._run(what, self._meta, lambda: self._call(
                what, "copy_object", kind="write", Bucket=bucket, Key=dst, CopySource=source,
                CopySourceIfMatch=f'"{etag}"', MetadataDirective="COPY"))
            return strip_etag(r.get("CopyObjectResult", {}).get("ETag", ""))
        head = await self._run(what, self._meta, lambda: self._call(
            what, "head_object", Bucket=bucket, Key=src, IfMatch=f'"{etag}"'))
        r = await self._run(what, self._meta, lambda: self._call(
            what, "create_multipart_upload", Bucket=bucket, Key=dst,
            Metadata=head.get("Metadata", {})))
        upload_id = r["UploadId"]
        starts = list(range(0, size, part_size))
        etags = [""] * len(starts)

        async def part(i: int, start: int) -> None:
            end = min(start + part_size, size) - 1
            rr = await self._run(what, self._data, lambda: self._call(
                what, "upload_part_copy", kind="write", Bucket=bucket, Key=dst, UploadId=upload_id,
                PartNumber=i + 1, CopySource=source, CopySourceIfMatch=f'"{etag}"',
                CopySourceRange=f"bytes={start}-{end}"))
            etags[i] = rr["CopyPartResult"]["ETag"]
        try:
            await run_all(part, starts)
            r = await self._run(what, self._meta, lambda: self._call(
                what, "complete_multipart_upload", kind="write", Bucket=bucket, Key=dst,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"ETag": e, "PartNumber": i + 1}
                                           for i, e in enumerate(etags)]}))
        except BaseException:
            await self.abort_multipart(bucket, dst, upload_id)
            raise
        return strip_etag(r.get("ETag", ""))

