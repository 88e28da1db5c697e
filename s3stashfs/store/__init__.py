"""Every S3 call. The only package that imports boto3.

boto3 is synchronous, so each call runs in a worker thread (``trio.to_thread.run_sync``) behind a
``CapacityLimiter``: one for metadata calls and one for data transfers, so a large read cannot
starve ``ls``. Errors are classified once (``classify``): unreachable (no answer at all) /
interrupted (an answer that broke off) / not found / changed / denied / throttled / other, as the
domain exceptions of ``errors.py``. Retries with exponential backoff and full jitter live in
``retry``; the callers never retry. While offline, a call probes S3 on demand before failing.

Threads only get bucket/key strings, file descriptors and bytes, and hand back values; they never
touch the mount's tables. Progress during a download is reported through ``progress(offset)``,
which the caller makes safe to call from a thread.

Modules: ``types`` (values handed out, timeouts), ``classify`` (errors), ``retry``, ``direct``
(GET/HEAD through urllib3), ``client`` (the Store and its clients), ``metadata`` and ``transfer``
(the calls).
"""
from .classify import _botocore_answered, _classify
from .direct import _direct_result
from .transfer import Store
from .types import (
                    ListPage,
                    ObjectInfo,
                    PartsInfo,
                    Timeouts,
                    _checksum_digests,
                    is_md5_etag,
                    meta_mtime,
                    parse_meta_mtime,
                    run_all,
                    strip_etag,
)

__all__ = ["ListPage", "ObjectInfo", "PartsInfo", "Store", "Timeouts", "_botocore_answered",
           "_checksum_digests", "_classify", "_direct_result", "is_md5_etag", "meta_mtime",
           "parse_meta_mtime", "run_all", "strip_etag"]
