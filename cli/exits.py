"""Exit codes of ``s3cachefs`` (README, "Exit codes"), shared by every command.

0  success
1  unexpected internal error (a bug: see the log)
2  bad usage or configuration (flags, sizes, mountpoint, cache dir)
3  S3 refused or could not be reached (bucket, credentials, endpoint)
4  prefetch or verify ended with objects missing or failed (they are listed)
5  unmount: the mount is still in use elsewhere (other mount namespaces, other paths)
"""

from __future__ import annotations

from s3cachefs.base.errors import IncompleteError, S3CacheFSError, StoreError

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_S3, EXIT_INCOMPLETE, EXIT_BUSY = 0, 1, 2, 3, 4, 5


def exit_code_for(exc: S3CacheFSError) -> int:
    if isinstance(exc, IncompleteError):
        return EXIT_INCOMPLETE
    return EXIT_S3 if isinstance(exc, StoreError) else EXIT_USAGE
