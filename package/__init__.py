"""s3cachefs: a per-node read-only FUSE view of S3 over a persistent, verified block cache."""

__version__ = "0.1.0"
