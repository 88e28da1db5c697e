"""s3stashfs: S3 buckets and keys as files, served from an ETag-checked local cache."""

__version__ = "0.1.0"
