"""The one exception hierarchy of s3cachefs.

Third-party errors (botocore, OS) are translated into these where they enter
(`store.s3`, `cache.blockcache`); the filesystem maps these to errno in
exactly one place (`fs.operations.errno_for`), and the CLI prints `str(exc)`
as its one line.

    S3CacheFSError
    ├── ConfigError            bad flag, size, TTL, mountpoint, cache dir
    │   └── NotEnoughSpaceError   a dataset that does not fit (``needed``, ``available``)
    ├── IncompleteError        a dataset not complete and verified (``failed`` objects)
    ├── CacheDirError          cache dir unusable or locked by another daemon
    ├── FilesystemError        what a path operation got wrong
    │   ├── NotADirError                                  -> ENOTDIR
    │   ├── IsADirError                                   -> EISDIR
    │   ├── BadHandleError     unknown file handle        -> EBADF
    │   ├── ReadOnlyError      write to a read-only mount or a pinned dataset -> EROFS
    │   ├── NotPermittedError  overwrite/delete without --allow-overwrite/-delete -> EPERM
    │   ├── ExistsError        create over an existing name -> EEXIST
    │   ├── NotEmptyError      rmdir of a directory with entries -> ENOTEMPTY
    │   ├── BusyError          delete of a file still being written -> EBUSY
    │   ├── UnsupportedError   an operation s3cachefs cannot make safe -> EOPNOTSUPP
    │   ├── CrossDeviceError   a rename: S3 cannot rename atomically -> EXDEV
    │   ├── NoSpaceError       the staging disk is full   -> ENOSPC
    │   └── UploadFailedError  close/fsync could not make the data durable in S3 -> EIO
    └── StoreError             anything S3 answered (or failed to)
        ├── NotFoundError      NoSuchKey / 404            -> ENOENT
        │   └── NoSuchBucketError
        ├── AccessDeniedError  403, bad signature/key     -> EACCES
        ├── CredentialsError   no credentials found       -> EACCES
        ├── StaleError         ETag changed under a reader -> ESTALE
        ├── AlreadyExistsError a create-only write found the key taken
        ├── ChecksumsRefusedError an upload's additional checksum refused (400/501)
        └── TransientError     5xx, throttling, network, after retries -> EIO
            └── BadResponseError  a response that is not what was asked for (wrong range,
                                  length, or a body failing its MD5 ETag)   -> EIO
"""


class S3CacheFSError(Exception):
    """Base of every error s3cachefs raises on purpose."""


class ConfigError(S3CacheFSError):
    """A bad option value or an unusable path given by the user."""


class NotEnoughSpaceError(ConfigError):
    """What is still to download does not fit: the message and the fields give the numbers."""

    def __init__(self, message: str, *, needed: int, available: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


class IncompleteError(S3CacheFSError):
    """A dataset that is not complete and verified; ``failed``: key -> reason."""

    def __init__(self, message: str, failed: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.failed = dict(failed or {})


class CacheDirError(S3CacheFSError):
    """The cache directory cannot be used."""


class FilesystemError(S3CacheFSError):
    """A path operation that cannot apply to its target."""


class NotADirError(FilesystemError):
    """A directory operation on a file."""


class IsADirError(FilesystemError):
    """A file operation on a directory."""


class BadHandleError(FilesystemError):
    """A file handle the filesystem never issued (or already released)."""


class ReadOnlyError(FilesystemError):
    """A modification of a read-only mount, or of a pinned dataset."""


class NotPermittedError(FilesystemError):
    """An overwrite or delete that the mount's flags do not allow."""


class ExistsError(FilesystemError):
    """Creating a name that already exists."""


class NotEmptyError(FilesystemError):
    """Removing a directory that still has entries."""


class BusyError(FilesystemError):
    """An operation on a file that is still being written."""


class UnsupportedError(FilesystemError):
    """An operation s3cachefs does not do because it cannot make it safe on S3."""


class CrossDeviceError(FilesystemError):
    """A rename: S3 cannot rename atomically, so `mv` is told to copy, then delete."""


class NoSpaceError(FilesystemError):
    """The disk holding the staging files is full."""


class UploadFailedError(FilesystemError):
    """Written data could not be made durable in S3; it stays staged."""


class StoreError(S3CacheFSError):
    """S3 refused or failed a request."""


class NotFoundError(StoreError):
    """The object (or bucket) does not exist."""


class NoSuchBucketError(NotFoundError):
    """The bucket does not exist."""


class AccessDeniedError(StoreError):
    """S3 refused access: wrong credentials, policy, or signature."""


class CredentialsError(AccessDeniedError):
    """No credentials were found in the AWS chain."""


class StaleError(StoreError):
    """The object changed in S3 since it was opened (ETag mismatch).

    ``current_etag``: the ETag the server reported instead, when it said (a
    response's ETag header; a 412 usually does not say).
    """

    def __init__(self, message: str, *, current_etag: str | None = None) -> None:
        super().__init__(message)
        self.current_etag = current_etag


class AlreadyExistsError(StoreError):
    """A create-only write (If-None-Match: *) found that the key exists."""


class ChecksumsRefusedError(StoreError):
    """An upload carrying additional checksums was refused as invalid: perhaps for them."""


class TransientError(StoreError):
    """Throttling, 5xx or network failure that outlived the retry budget."""


class BadResponseError(TransientError):
    """A response that is not what was asked for; ``behaviour`` names what the server did.

    Retried like any transient failure, never cached, and named once per store
    in a WARNING (`store.responses`).
    """

    def __init__(self, what: str, behaviour: str, detail: str) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.behaviour = behaviour
        self.detail = detail
