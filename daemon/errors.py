"""The one exception hierarchy of s3cachefs.

Third-party errors (botocore, OS) are translated into these where they enter
(`daemon.store`, `daemon.blockcache`); the filesystem maps these to errno in
exactly one place (`fs.operations.errno_for`), and the CLI prints `str(exc)`
as its one line.

    S3CacheFSError
    ├── ConfigError            bad flag, size, TTL, mountpoint, cache dir
    ├── CacheDirError          cache dir unusable or locked by another daemon
    ├── FilesystemError        what a path operation got wrong
    │   ├── NotADirError                                  -> ENOTDIR
    │   ├── IsADirError                                   -> EISDIR
    │   └── BadHandleError     unknown file handle        -> EBADF
    └── StoreError             anything S3 answered (or failed to)
        ├── NotFoundError      NoSuchKey / 404            -> ENOENT
        │   └── NoSuchBucketError
        ├── AccessDeniedError  403, bad signature/key     -> EACCES
        ├── CredentialsError   no credentials found       -> EACCES
        ├── StaleError         ETag changed under a reader -> ESTALE
        └── TransientError     5xx, throttling, network, after retries -> EIO
"""


class S3CacheFSError(Exception):
    """Base of every error s3cachefs raises on purpose."""


class ConfigError(S3CacheFSError):
    """A bad option value or an unusable path given by the user."""


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
    """The object changed in S3 since it was opened (ETag mismatch)."""


class TransientError(StoreError):
    """Throttling, 5xx or network failure that outlived the retry budget."""
