"""One small storage interface for the dataset and the checkpoint: local disk or object store.

Paths given to `Storage` are relative to its base URI and always use `/`. A write is atomic
for readers: on local disk the bytes go to a hidden temp file beside the target, are
fsynced and renamed over it; on object storage a single upload becomes visible only once
complete.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import StorageError, UsageError


@dataclass(frozen=True)
class StoredFile:
    path: str  # relative to the storage base
    size: int


def _describe(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


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
                self.fs, self._base = pafs.FileSystem.from_uri(uri)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as error:
                raise UsageError(f"cannot open storage {uri!r}: {error}") from None
            self._base = self._base.rstrip("/")

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
        try:
            if self.is_local:
                self._write_local(path, data)
            else:
                with self.fs.open_output_stream(self.full_path(path)) as stream:
                    stream.write(data)
        except OSError as error:
            raise StorageError(f"cannot write {self.display(path)}: {_describe(error)}") from None

    def _write_local(self, path: str, data: bytes) -> None:
        target = self._root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)

    def delete(self, path: str) -> None:
        try:
            if self.is_local:
                (self._root / path).unlink(missing_ok=True)
            else:
                self.fs.delete_file(self.full_path(path))
        except FileNotFoundError:
            return
        except OSError as error:
            raise StorageError(f"cannot delete {self.display(path)}: {_describe(error)}") from None

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
        except OSError as error:
            if not self.is_local and "does not exist" in str(error).lower():
                return None
            raise StorageError(f"cannot read {self.display(path)}: {_describe(error)}") from None

    def list_files(self, prefix: str = "") -> list[StoredFile]:
        """Every file below `prefix` (recursively), sorted by path; empty when it is absent."""
        selector = pafs.FileSelector(self.full_path(prefix), recursive=True, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except OSError as error:
            raise StorageError(f"cannot list {self.display(prefix)}: {_describe(error)}") from None
        cut = len(self._base) + 1
        files = [
            StoredFile(info.path[cut:], info.size or 0)
            for info in infos
            if info.type == pafs.FileType.File
        ]
        return sorted(files, key=lambda f: f.path)

    # -- locking -------------------------------------------------------------------------

    @contextmanager
    def exclusive_lock(self, path: str, holder: str) -> Iterator[None]:
        """Hold `path` as a lock for the duration; raises LockHeld when another run has it."""
        if not self.is_local:
            raise UsageError(f"locking on {self.uri} is not supported yet; use a local --state")
        from pipeline.lock import local_lock

        with local_lock(self._root / path, holder):
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
