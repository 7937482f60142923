"""The rename policy: S3 has no rename, and copy-then-delete is not atomic.

- A read-only mount refuses it like any change (EROFS).
- A writable mount refuses it with EXDEV, as between two filesystems: `mv`
  then copies (durable when the copy is closed) and deletes the source (which
  needs ``--allow-delete``). Jobs should write under the final name instead of
  write-then-rename.
"""

from __future__ import annotations

import logging
from typing import NoReturn

from s3cachefs.base.errors import CrossDeviceError, ReadOnlyError

log = logging.getLogger(__name__)

READ_ONLY = "the mount is read-only (mount with --writable)"


def refuse_rename(old_name: str, new_name: str, *, writable: bool) -> NoReturn:
    """Every rename ends here: ReadOnlyError or CrossDeviceError."""
    if not writable:
        raise ReadOnlyError(READ_ONLY)
    log.info("rename of %s refused (EXDEV): S3 cannot rename atomically", old_name)
    raise CrossDeviceError(f"{old_name} -> {new_name}: S3 cannot rename atomically")
