"""s3cachefs: a per-node read-only FUSE view of S3 over a persistent, verified block cache.

``from s3cachefs import DatasetProvider`` is the Python API (`s3cachefs.api.provider`),
imported on first use so that ``import s3cachefs`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = ("Dataset", "DatasetProvider", "DatasetState", "Progress", "VerifyReport")

if TYPE_CHECKING:
    from s3cachefs.api.provider import (
        Dataset as Dataset,
    )
    from s3cachefs.api.provider import (
        DatasetProvider as DatasetProvider,
    )
    from s3cachefs.api.provider import (
        DatasetState as DatasetState,
    )
    from s3cachefs.api.provider import (
        Progress as Progress,
    )
    from s3cachefs.api.provider import (
        VerifyReport as VerifyReport,
    )


def __getattr__(name: str) -> Any:
    if name in _API:
        from s3cachefs.api import provider

        return getattr(provider, name)
    raise AttributeError(f"module 's3cachefs' has no attribute {name!r}")
