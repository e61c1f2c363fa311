"""One small storage interface for the dataset and the checkpoint: local disk or object store.

Paths given to `Storage` are relative to its base URI and always use `/`. A write is atomic
for readers: on local disk the bytes go to a hidden temp file beside the target, are
fsynced and renamed over it; on object storage (pyarrow's S3 and GCS filesystems) one
upload (a PUT, or a multipart upload completed at close) becomes visible only once whole,
so nothing is renamed there.

S3 takes its credentials and region from the standard AWS variables and files
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, `AWS_REGION`), which pyarrow
reads itself, and an S3-compatible store's endpoint from `AWS_ENDPOINT_URL`. GCS takes
Google's default credentials, and an emulator's address from `STORAGE_EMULATOR_HOST` (then
without credentials), as Google's own clients do.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import StorageError, UsageError
from pipeline.hosts import is_loopback

log = logging.getLogger(__name__)

ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
GCS_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_COPY_CHUNK = 1 << 20  # bytes per read when a local file is copied into storage


@dataclass(frozen=True)
class StoredFile:
    path: str  # relative to the storage base
    size: int


# What the AWS SDK's error codes mean to someone running the export, and what to check.
_S3_ERRORS = (
    ("NO_SUCH_BUCKET", "the bucket does not exist"),
    ("ACCESS_DENIED", "access denied: check the credentials' permissions and the bucket policy"),
    ("INVALID_ACCESS_KEY_ID", "the credentials were rejected: check AWS_ACCESS_KEY_ID"),
    ("SIGNATURE_DOES_NOT_MATCH", "the credentials were rejected: check AWS_SECRET_ACCESS_KEY"),
    ("NETWORK_CONNECTION", "cannot reach the storage endpoint: check AWS_ENDPOINT_URL"),
    ("Could not connect", "cannot reach the storage endpoint: check AWS_ENDPOINT_URL"),
    ("Unable to connect", "cannot reach the storage endpoint: check AWS_ENDPOINT_URL"),
)
_REQUEST_ID = re.compile(r"\s*\(Request ID: [^)]*\)")


def _describe(error: BaseException, uri: str = "") -> str:
    """One line a user can act on: the OS reason, or what an object store's error means."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error) or type(error).__name__
    for marker, meaning in _S3_ERRORS:
        if marker in text:
            if uri.startswith("gs://"):
                return meaning.replace("AWS_ENDPOINT_URL", "the network (or STORAGE_EMULATOR_HOST)")
            return meaning
    if "AWS Error" in text:
        text = text.split("AWS Error", 1)[1].strip()
    return _REQUEST_ID.sub("", " ".join(text.split()))


def storage_endpoint() -> str | None:
    """The S3-compatible endpoint the AWS variables name, if any."""
    return next((os.environ[n] for n in ENDPOINT_ENVS if os.environ.get(n)), None)


def _with_endpoint(uri: str) -> str:
    """Name the endpoint in the URI: not every pyarrow version reads AWS_ENDPOINT_URL."""
    endpoint = storage_endpoint()
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not endpoint or "endpoint_override" in parts.query:
        return uri
    query = "&".join(q for q in (parts.query, urlencode({"endpoint_override": endpoint})) if q)
    return parts._replace(query=query).geturl()


def gcs_emulator() -> str | None:
    """The GCS emulator `STORAGE_EMULATOR_HOST` names (`http://127.0.0.1:4443`), if any."""
    return os.environ.get(GCS_EMULATOR_ENV) or None


def _gcs_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A GCS emulator's filesystem when one is named; otherwise pyarrow's own from the URI."""
    emulator = gcs_emulator()
    if not emulator:
        return pafs.FileSystem.from_uri(uri)
    parts = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
    filesystem = pafs.GcsFileSystem(
        anonymous=True,
        scheme=parts.scheme,
        endpoint_override=parts.netloc,
        retry_time_limit=timedelta(seconds=15),
    )
    target = urlsplit(uri)
    return filesystem, f"{target.netloc}{target.path}"


_warned: set[str] = set()


def _warn_if_plain_http(endpoint: str | None) -> None:
    parts = urlsplit(endpoint or "")
    if parts.scheme == "http" and parts.hostname and not is_loopback(parts.hostname):
        if endpoint in _warned:
            return
        _warned.add(str(endpoint))
        log.warning(
            "the storage endpoint %s is plain http: requests are signed but data travels "
            "unencrypted",
            endpoint,
        )


def location(uri: str) -> str:
    """`uri` as one spelling per place, for telling whether two settings name the same one:
    a local path absolute with links resolved, an object URI without its query or doubled
    slashes. Opens nothing."""
    if "://" not in uri or uri.startswith("file://"):
        return str(Path(uri.removeprefix("file://")).expanduser().resolve())
    scheme, _, rest = uri.partition("?")[0].partition("://")
    return f"{scheme.lower()}://{re.sub('/+', '/', rest).strip('/')}"


class Storage:
    """Files under one base URI (`output/`, `/abs/dir`, `s3://bucket/prefix`)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/") or "/"
        self.is_local = "://" not in uri or uri.startswith("file://")
        if self.is_local:
            local = uri[len("file://") :] if uri.startswith("file://") else uri
            self._root = Path(local).expanduser().absolute()
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self._base = str(self._root)
        else:
            try:
                if uri.startswith("gs://"):
                    self.fs, self._base = _gcs_filesystem(uri)
                else:
                    self.fs, self._base = pafs.FileSystem.from_uri(_with_endpoint(uri))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as error:
                raise UsageError(f"cannot open storage {uri!r}: {error}") from None
            except OSError as error:  # e.g. the bucket's region could not be looked up
                raise StorageError(f"cannot open storage {uri}: {_describe(error, uri)}") from None
            self._base = self._base.rstrip("/")
            if self.is_s3:
                _warn_if_plain_http(storage_endpoint())

    @property
    def is_s3(self) -> bool:
        return isinstance(self.fs, pafs.S3FileSystem)

    @property
    def is_gcs(self) -> bool:
        return isinstance(self.fs, pafs.GcsFileSystem)

    def child(self, relative: str) -> Storage:
        """A storage rooted at a sub-path (`<output>/_state`)."""
        return Storage(f"{self.uri}/{relative.strip('/')}")

    def full_path(self, path: str) -> str:
        """The path the pyarrow filesystem knows this file by."""
        return f"{self._base}/{path}" if path else self._base

    def display(self, path: str) -> str:
        return f"{self.uri}/{path}"

    # -- writing -------------------------------------------------------------------------

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file so that readers see the old version or the new, never a part."""
        self._write_whole(path, lambda handle: handle.write(data))

    def write_file(self, path: str, source: Path) -> None:
        """`write_bytes` from a local file, streamed in chunks (never held in memory)."""

        def copy(handle: Any) -> None:
            with open(source, "rb") as reader:
                while chunk := reader.read(_COPY_CHUNK):
                    handle.write(chunk)

        self._write_whole(path, copy)

    def _write_whole(self, path: str, fill: Callable[[Any], object]) -> None:
        try:
            if self.is_local:
                self._write_local(path, fill)
            else:
                # the object appears only when close() completes the upload: never in part
                with self.fs.open_output_stream(self.full_path(path)) as stream:
                    fill(stream)
        except (OSError, pa.ArrowException) as error:
            raise StorageError(
                f"cannot write {self.display(path)}: {_describe(error, self.uri)}"
            ) from None

    def _write_local(self, path: str, fill: Callable[[Any], object]) -> None:
        target = self._root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(temp, "wb") as handle:
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    @contextmanager
    def open_output(self, path: str) -> Iterator[pa.NativeFile]:
        """A stream for a file too big to hold in memory; it appears at `path` whole when
        the block ends, and not at all if it raises. The bytes go to a hidden name first
        (local disk: renamed; object store: copied server-side, then the copy deleted)."""
        name = path.rsplit("/", 1)[-1]
        temp = f"{path[: len(path) - len(name)]}.{name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            if self.is_local:
                (self._root / temp).parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_output_stream(self.full_path(temp)) as stream:
                yield stream
            if self.is_local:
                with open(self._root / temp, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(self._root / temp, self._root / path)
                _fsync_dir((self._root / path).parent)
            else:
                self.fs.move(self.full_path(temp), self.full_path(path))
        except BaseException as error:
            with suppress(StorageError):  # the write's own error is the one to report
                self.delete(temp)
            if isinstance(error, OSError | pa.ArrowException):
                message = f"cannot write {self.display(path)}: {_describe(error)}"
                raise StorageError(message) from None
            raise

    def delete(self, path: str) -> None:
        try:
            if self.is_local:
                (self._root / path).unlink(missing_ok=True)
            else:
                self.fs.delete_file(self.full_path(path))
        except FileNotFoundError:
            return
        except (OSError, pa.ArrowException) as error:
            raise StorageError(
                f"cannot delete {self.display(path)}: {_describe(error, self.uri)}"
            ) from None

    # -- reading -------------------------------------------------------------------------

    def read_bytes(self, path: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            if self.is_local:
                return (self._root / path).read_bytes()
            with self.fs.open_input_stream(self.full_path(path)) as stream:
                return stream.read()
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as error:
            if not self.is_local and "does not exist" in str(error).lower():
                return None
            raise StorageError(
                f"cannot read {self.display(path)}: {_describe(error, self.uri)}"
            ) from None

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """One Parquet file as a table; a missing or unreadable file is a `StorageError`."""
        try:
            return pq.read_table(self.full_path(path), filesystem=self.fs, columns=columns)
        except (OSError, pa.ArrowException) as error:
            raise StorageError(
                f"cannot read {self.display(path)}: {_describe(error, self.uri)}"
            ) from None

    def iter_batches(
        self, path: str, columns: list[str] | None = None, rows: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """One Parquet file in record batches of at most `rows`; unreadable is a
        `StorageError` (memory stays flat with the file's size)."""
        try:
            with self.fs.open_input_file(self.full_path(path)) as handle:
                yield from pq.ParquetFile(handle).iter_batches(batch_size=rows, columns=columns)
        except (OSError, pa.ArrowException) as error:
            raise StorageError(
                f"cannot read {self.display(path)}: {_describe(error, self.uri)}"
            ) from None

    def read_footer(self, path: str) -> pq.FileMetaData:
        """One Parquet file's footer (schema, rows, row groups); unreadable is a `StorageError`."""
        try:
            return pq.read_metadata(self.full_path(path), filesystem=self.fs)
        except (OSError, pa.ArrowException) as error:
            raise StorageError(
                f"cannot read {self.display(path)}: {_describe(error, self.uri)}"
            ) from None

    def list_files(self, prefix: str = "") -> list[StoredFile]:
        """Every file below `prefix` (recursively), sorted by path; empty when it is absent."""
        selector = pafs.FileSelector(self.full_path(prefix), recursive=True, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
            if not infos and not self.is_local:
                self._check_bucket()
        except (OSError, pa.ArrowException) as error:
            raise StorageError(
                f"cannot list {self.display(prefix)}: {_describe(error, self.uri)}"
            ) from None
        cut = len(self._base) + 1
        files = [
            StoredFile(info.path[cut:], info.size or 0)
            for info in infos
            if info.type == pafs.FileType.File
        ]
        return sorted(files, key=lambda f: f.path)

    def _check_bucket(self) -> None:
        """An object store lists a missing bucket as empty; say so instead of finding nothing."""
        bucket = self._base.split("/", 1)[0]
        if self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"cannot list {self.uri}: the bucket {bucket!r} does not exist")

    # -- locking -------------------------------------------------------------------------

    @contextmanager
    def exclusive_lock(self, path: str, holder: str) -> Iterator[None]:
        """Hold `path` as a lock for the duration; raises LockHeld when another run has it.

        Local disk: an `flock`. S3 and GCS: a lease object written with conditional
        requests and renewed while held (see `pipeline.store.lock`).
        """
        from pipeline.store import lock

        bucket, _, key = self.full_path(path).partition("/")
        target: lock.LeaseTarget | lock.GcsLeaseTarget
        if self.is_local:
            with lock.local_lock(self._root / path, holder):
                yield
            return
        if self.is_s3:
            target = lock.LeaseTarget(
                bucket, key, self.fs.region, storage_endpoint(), self.display(path)
            )
        elif self.is_gcs:
            target = lock.GcsLeaseTarget(bucket, key, gcs_emulator(), self.display(path))
        else:
            raise UsageError(
                f"the run lock cannot live on {self.uri} (only local disk, s3:// and gs:// "
                "have one); put --state on one of those"
            )
        with lock.lease_lock(target, holder):
            yield


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
