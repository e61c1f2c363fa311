"""The run lock: one export at a time per state location.

On local disk it is an `flock` on a file, so the kernel drops it when the holder dies:
a lock left by a killed run never blocks the next one.

On S3 it is a lease: an object created only if absent (`If-None-Match: *`) that names its
holder and how long it lasts, rewritten by a heartbeat thread while the run is alive (each
rewrite conditional on the version it last wrote, `If-Match`). A lease not renewed for
its duration, by the store's own clock, is expired and the next run takes it over with a
conditional write, so a killed run blocks the next one for at most that long. pyarrow's
filesystems cannot make conditional writes, so this one object goes through boto3.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from pipeline.errors import LockHeld, StorageError


def lock_holder() -> str:
    """Who holds a lock, as written into it: process, host and since when (UTC)."""
    since = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return f"pid={os.getpid()} host={os.uname().nodename} since={since}"


log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0
RENEWALS_PER_LEASE = 3  # a renewal may fail twice in a row and the lease still holds


@contextmanager
def local_lock(path: Path, holder: str) -> Iterator[None]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise StorageError(f"cannot create lock {path}: {error.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise LockHeld(
                f"another export holds the lock {path} ({other}); "
                "wait for it to finish or check that it is still running"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# -- the S3 lease ------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseTarget:
    """Where a lease object lives and how to reach the store."""

    bucket: str
    key: str
    region: str | None
    endpoint: str | None  # an S3-compatible store; None for AWS itself
    display: str  # s3://bucket/key, for messages


@dataclass(frozen=True)
class LeaseRecord:
    """The lease object as read back: who holds it and whether its time has run out."""

    holder: str
    etag: str
    age_seconds: float
    seconds: float

    @property
    def expired(self) -> bool:
        return self.age_seconds > self.seconds


def _lease_body(holder: str, token: str, seconds: float) -> bytes:
    renewed = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    record = {"holder": holder, "token": token, "seconds": seconds, "renewed": renewed}
    return json.dumps(record).encode()


def _code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_GONE = {"NoSuchKey", "404"}


def _describe_boto(error: Exception) -> str:
    code = _code(error)
    meanings = {
        "NoSuchBucket": "the bucket does not exist",
        "AccessDenied": "access denied: check the credentials' permissions and the bucket policy",
        "InvalidAccessKeyId": "the credentials were rejected: check AWS_ACCESS_KEY_ID",
        "SignatureDoesNotMatch": "the credentials were rejected: check AWS_SECRET_ACCESS_KEY",
    }
    if code in meanings:
        return meanings[code]
    status = (getattr(error, "response", None) or {}).get("ResponseMetadata", {})
    if status.get("HTTPStatusCode") == 403:
        return meanings["AccessDenied"]
    name = type(error).__name__
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return "cannot reach the storage endpoint: check AWS_ENDPOINT_URL"
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    return " ".join(str(error).split()) or name


class S3Lease:
    """One lease object: acquire, renew, release. Each call is one or two requests."""

    def __init__(self, target: LeaseTarget, holder: str, seconds: float = LEASE_SECONDS) -> None:
        self.target = target
        self.holder = holder
        self.seconds = seconds
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost = False
        self._renewed_at = 0.0
        self._client = _s3_client(target)

    def _put(self, **condition: str) -> str:
        response = self._client.put_object(
            Bucket=self.target.bucket,
            Key=self.target.key,
            Body=_lease_body(self.holder, self.token, self.seconds),
            ContentType="application/json",
            **condition,
        )
        return str(response["ETag"])

    def _fail(self, what: str, error: Exception) -> StorageError:
        reason = _describe_boto(error)
        return StorageError(f"cannot {what} the lock {self.target.display}: {reason}")

    def acquire(self) -> None:
        """Create the lease, or take over an expired one; `LockHeld` if another run has it."""
        from botocore.exceptions import BotoCoreError, ClientError

        for _ in range(3):  # the object may vanish or change between the write and the read
            try:
                self.etag = self._put(IfNoneMatch="*")
                self._check_conditions_honoured()
                self._renewed_at = time.monotonic()
                return
            except ClientError as error:
                if _code(error) not in _CONFLICT:
                    raise self._fail("take", error) from None
            except BotoCoreError as error:
                raise self._fail("take", error) from None
            record = self.read()
            if record is None:
                continue
            if not record.expired:
                left = max(0, round(record.seconds - record.age_seconds))
                raise LockHeld(
                    f"another export holds the lock {self.target.display} ({record.holder}); "
                    f"its lease lapses in {left}s unless renewed; wait for it to finish"
                )
            try:
                self.etag = self._put(IfMatch=record.etag)
            except ClientError as error:
                if _code(error) in _CONFLICT | _GONE:
                    continue  # another run took it over first, or it was released
                raise self._fail("take", error) from None
            except BotoCoreError as error:
                raise self._fail("take", error) from None
            log.warning(
                "took over the lock %s: its lease (%s) expired %.0fs ago",
                self.target.display,
                record.holder,
                record.age_seconds - record.seconds,
            )
            self._renewed_at = time.monotonic()
            return
        raise LockHeld(f"the lock {self.target.display} keeps changing hands; try again later")

    def _check_conditions_honoured(self) -> None:
        """A store that ignores If-None-Match would let two runs hold the lease at once."""
        from botocore.exceptions import ClientError

        try:
            self.etag = self._put(IfNoneMatch="*")
        except ClientError as error:
            if _code(error) in _CONFLICT:
                return
            raise
        self.release()
        raise StorageError(
            f"the store of {self.target.display} ignores conditional writes (If-None-Match), "
            "so it cannot hold the run lock; put --state on local disk or on a store that has them"
        )

    def read(self) -> LeaseRecord | None:
        """The current lease, aged by the store's clock (not ours), or None when absent."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._client.get_object(Bucket=self.target.bucket, Key=self.target.key)
            body = response["Body"].read()
        except ClientError as error:
            if _code(error) in _GONE:
                return None
            raise self._fail("read", error) from None
        except BotoCoreError as error:
            raise self._fail("read", error) from None
        try:
            record: dict[str, Any] = json.loads(body)
            holder, seconds = str(record["holder"]), float(record["seconds"])
        except (ValueError, TypeError, KeyError):
            holder, seconds = "an unreadable lease", LEASE_SECONDS
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(UTC)
        age = (now - response["LastModified"]).total_seconds()
        return LeaseRecord(holder, str(response["ETag"]), age, seconds)

    def renew(self) -> bool:
        """Rewrite the lease if it is still ours; False once it is lost."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.etag = self._put(IfMatch=self.etag or "")
            self._renewed_at = time.monotonic()
            return True
        except ClientError as error:
            if _code(error) in _CONFLICT | _GONE:
                return self._lose("another run took it over")
            reason = _describe_boto(error)
        except BotoCoreError as error:
            reason = _describe_boto(error)
        if time.monotonic() - self._renewed_at > self.seconds:
            return self._lose(f"it could not be renewed for {self.seconds:.0f}s ({reason})")
        log.warning("could not renew the lock %s (%s); retrying", self.target.display, reason)
        return True

    def _lose(self, why: str) -> bool:
        self.lost = True
        log.error("lost the lock %s: %s", self.target.display, why)
        return False

    def release(self) -> None:
        """Delete the lease if it is still ours; a failure only delays the next run."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(
                Bucket=self.target.bucket, Key=self.target.key, IfMatch=self.etag or ""
            )
        except ClientError as error:
            if _code(error) not in _CONFLICT | _GONE:
                self._release_failed(_describe_boto(error))
        except BotoCoreError as error:
            self._release_failed(_describe_boto(error))

    def _release_failed(self, reason: str) -> None:
        log.warning(
            "could not remove the lock %s (%s); it lapses by itself within %.0fs",
            self.target.display,
            reason,
            self.seconds,
        )


def _s3_client(target: LeaseTarget) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:  # pragma: no cover - boto3 is a dependency
        raise StorageError("the S3 lock needs boto3: pip install boto3") from None
    config = Config(
        connect_timeout=10, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"}
    )
    return boto3.client(
        "s3", region_name=target.region or None, endpoint_url=target.endpoint, config=config
    )


class _Heartbeat(threading.Thread):
    def __init__(self, lease: S3Lease) -> None:
        super().__init__(name="lock-heartbeat", daemon=True)
        self.lease = lease
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = self.lease.seconds / RENEWALS_PER_LEASE
        while not self.stopped.wait(interval):
            if not self.lease.renew():
                return

    def stop(self) -> None:
        self.stopped.set()
        self.join()


@contextmanager
def lease_lock(target: LeaseTarget, holder: str, seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Hold the S3 lease at `target` for the duration of the block."""
    lease = S3Lease(target, holder, seconds)
    lease.acquire()
    heartbeat = _Heartbeat(lease)
    heartbeat.start()
    try:
        yield
    finally:
        heartbeat.stop()
        if not lease.lost:
            lease.release()
    if lease.lost:
        raise StorageError(
            f"lost the lock {target.display} during the run, so another export may have run "
            "at the same time; run `verify`, and `compact` if it reports duplicate versions"
        )
