"""The run lock: one export at a time per state location.

On local disk it is an `flock` on a file, so the kernel drops it when the holder dies:
a lock left by a killed run never blocks the next one.

On object storage it is a lease: an object created only if absent that names its holder
and how long it lasts, rewritten by a heartbeat thread while the run is alive (each
rewrite conditional on the version it last wrote). A lease not renewed for its duration,
by the store's own clock, is expired and the next run takes it over with a write
conditional on the version it read, so a killed run blocks the next one for at most that
long. One `Lease` does this over a `LeaseStore`: S3 (`If-None-Match: *` / `If-Match` on the
ETag, through boto3) or GCS (`ifGenerationMatch=0` / the generation, through its JSON API).
pyarrow's filesystems cannot make conditional writes, so this one object bypasses them.
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
from typing import Any, Protocol
from urllib.parse import quote

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


# -- the lease, over any store with conditional writes -----------------------------------


@dataclass(frozen=True)
class LeaseRecord:
    """The lease object as read back: who holds it and whether its time has run out."""

    holder: str
    version: str  # the S3 ETag or the GCS generation the next conditional write names
    age_seconds: float
    seconds: float

    @property
    def expired(self) -> bool:
        return self.age_seconds > self.seconds


class Conflict(Exception):
    """A conditional write lost: the object exists, changed, or is gone."""


class StoreFailure(Exception):
    """The store failed for another reason; the message says what to check."""


class LeaseStore(Protocol):
    """One lease object on a store that makes conditional writes."""

    display: str  # s3://bucket/key or gs://bucket/key, for messages

    def create(self, body: bytes) -> str:
        """Write the object only if absent; its new version, or `Conflict`."""
        ...

    def replace(self, body: bytes, version: str) -> str:
        """Overwrite the object only if it is still at `version`; `Conflict` otherwise."""
        ...

    def read(self) -> LeaseRecord | None:
        """The object, aged by the store's clock; None when absent."""
        ...

    def delete(self, version: str) -> None:
        """Delete the object only if it is still at `version`."""
        ...

    def close(self) -> None:
        """Let go of connections."""
        ...


def _lease_body(holder: str, token: str, seconds: float) -> bytes:
    renewed = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    record = {"holder": holder, "token": token, "seconds": seconds, "renewed": renewed}
    return json.dumps(record).encode()


def _record(body: bytes, version: str, age_seconds: float) -> LeaseRecord:
    try:
        record: dict[str, Any] = json.loads(body)
        holder, seconds = str(record["holder"]), float(record["seconds"])
    except (ValueError, TypeError, KeyError):
        holder, seconds = "an unreadable lease", LEASE_SECONDS
    return LeaseRecord(holder, version, age_seconds, seconds)


class Lease:
    """Acquire, renew, release one lease object. Each call is one or two requests."""

    def __init__(self, store: LeaseStore, holder: str, seconds: float = LEASE_SECONDS) -> None:
        self.store = store
        self.holder = holder
        self.seconds = seconds
        self.token = uuid.uuid4().hex
        self.version: str | None = None
        self.lost = False
        self._renewed_at = 0.0

    def _body(self) -> bytes:
        return _lease_body(self.holder, self.token, self.seconds)

    def _fail(self, what: str, error: Exception) -> StorageError:
        return StorageError(f"cannot {what} the lock {self.store.display}: {error}")

    def acquire(self) -> None:
        """Create the lease, or take over an expired one; `LockHeld` if another run has it."""
        for _ in range(3):  # the object may vanish or change between the write and the read
            try:
                self.version = self.store.create(self._body())
                self._check_conditions_honoured()
                self._renewed_at = time.monotonic()
                return
            except Conflict:
                pass
            except StoreFailure as error:
                raise self._fail("take", error) from None
            try:
                record = self.store.read()
            except StoreFailure as error:
                raise self._fail("read", error) from None
            if record is None:
                continue
            if not record.expired:
                left = max(0, round(record.seconds - record.age_seconds))
                raise LockHeld(
                    f"another export holds the lock {self.store.display} ({record.holder}); "
                    f"its lease lapses in {left}s unless renewed; wait for it to finish"
                )
            try:
                self.version = self.store.replace(self._body(), record.version)
            except Conflict:
                continue  # another run took it over first, or it was released
            except StoreFailure as error:
                raise self._fail("take", error) from None
            log.warning(
                "took over the lock %s: its lease (%s) expired %.0fs ago",
                self.store.display,
                record.holder,
                record.age_seconds - record.seconds,
            )
            self._renewed_at = time.monotonic()
            return
        raise LockHeld(f"the lock {self.store.display} keeps changing hands; try again later")

    def _check_conditions_honoured(self) -> None:
        """A store that ignores create-if-absent would let two runs hold the lease at once."""
        try:
            self.version = self.store.create(self._body())
        except Conflict:
            return
        self.release()
        raise StorageError(
            f"the store of {self.store.display} ignores conditional writes, so it cannot hold "
            "the run lock; put --state on local disk or on a store that has them"
        )

    def read(self) -> LeaseRecord | None:
        try:
            return self.store.read()
        except StoreFailure as error:
            raise self._fail("read", error) from None

    def renew(self) -> bool:
        """Rewrite the lease if it is still ours; False once it is lost."""
        try:
            self.version = self.store.replace(self._body(), self.version or "")
            self._renewed_at = time.monotonic()
            return True
        except Conflict:
            return self._lose("another run took it over")
        except StoreFailure as error:
            reason = str(error)
        if time.monotonic() - self._renewed_at > self.seconds:
            return self._lose(f"it could not be renewed for {self.seconds:.0f}s ({reason})")
        log.warning("could not renew the lock %s (%s); retrying", self.store.display, reason)
        return True

    def _lose(self, why: str) -> bool:
        self.lost = True
        log.error("lost the lock %s: %s", self.store.display, why)
        return False

    def release(self) -> None:
        """Delete the lease if it is still ours; a failure only delays the next run."""
        try:
            self.store.delete(self.version or "")
        except Conflict:
            pass
        except StoreFailure as error:
            log.warning(
                "could not remove the lock %s (%s); it lapses by itself within %.0fs",
                self.store.display,
                error,
                self.seconds,
            )


class _Heartbeat(threading.Thread):
    def __init__(self, lease: Lease) -> None:
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
def lease_lock(
    target: LeaseTarget | GcsLeaseTarget, holder: str, seconds: float = LEASE_SECONDS
) -> Iterator[None]:
    """Hold the lease at `target` (S3 or GCS) for the duration of the block."""
    lease = Lease(store_for(target), holder, seconds)
    try:
        lease.acquire()
    except BaseException:
        lease.store.close()
        raise
    heartbeat = _Heartbeat(lease)
    heartbeat.start()
    try:
        yield
    finally:
        heartbeat.stop()
        if not lease.lost:
            lease.release()
        lease.store.close()
    if lease.lost:
        raise StorageError(
            f"lost the lock {target.display} during the run, so another export may have run "
            "at the same time; run `verify`, and `compact` if it reports duplicate versions"
        )


def store_for(target: LeaseTarget | GcsLeaseTarget) -> LeaseStore:
    return GcsLeaseStore(target) if isinstance(target, GcsLeaseTarget) else S3LeaseStore(target)


# -- S3: If-None-Match / If-Match on the ETag, through boto3 ------------------------------


@dataclass(frozen=True)
class LeaseTarget:
    """Where an S3 lease object lives and how to reach the store."""

    bucket: str
    key: str
    region: str | None
    endpoint: str | None  # an S3-compatible store; None for AWS itself
    display: str  # s3://bucket/key, for messages


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


class S3LeaseStore:
    """The lease object on S3 or an S3-compatible store."""

    def __init__(self, target: LeaseTarget) -> None:
        self.target = target
        self.display = target.display
        self._client = _s3_client(target)

    def _call(self, method: str, gone_is_conflict: bool = True, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, method)(
                Bucket=self.target.bucket, Key=self.target.key, **kwargs
            )
        except ClientError as error:
            code = _code(error)
            if code in _CONFLICT or (gone_is_conflict and code in _GONE):
                raise Conflict(code) from None
            raise StoreFailure(_describe_boto(error)) from None
        except BotoCoreError as error:
            raise StoreFailure(_describe_boto(error)) from None

    def _put(self, body: bytes, **condition: str) -> str:
        response = self._call("put_object", Body=body, ContentType="application/json", **condition)
        return str(response["ETag"])

    def create(self, body: bytes) -> str:
        return self._put(body, IfNoneMatch="*")

    def replace(self, body: bytes, version: str) -> str:
        return self._put(body, IfMatch=version)

    def read(self) -> LeaseRecord | None:
        try:
            response = self._call("get_object")
            body = response["Body"].read()
        except Conflict:
            return None
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(UTC)
        age = (now - response["LastModified"]).total_seconds()
        return _record(body, str(response["ETag"]), age)

    def delete(self, version: str) -> None:
        self._call("delete_object", IfMatch=version)

    def close(self) -> None:
        self._client.close()


class S3Lease(Lease):
    """The lease on S3 (kept by name for callers that build one from a `LeaseTarget`)."""

    def __init__(self, target: LeaseTarget, holder: str, seconds: float = LEASE_SECONDS) -> None:
        super().__init__(S3LeaseStore(target), holder, seconds)
        self.target = target


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


# -- GCS: ifGenerationMatch, through the JSON API -----------------------------------------

GCS_ENDPOINT = "https://storage.googleapis.com"
GCS_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"


@dataclass(frozen=True)
class GcsLeaseTarget:
    """Where a GCS lease object lives; `emulator` is `STORAGE_EMULATOR_HOST` when set."""

    bucket: str
    key: str
    emulator: str | None
    display: str  # gs://bucket/key, for messages


class GcsLeaseStore:
    """The lease object on Google Cloud Storage: generation preconditions do the locking.

    Credentials come the standard Google way (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's
    application-default login, the metadata server), through google-auth; an emulator
    (`STORAGE_EMULATOR_HOST`) takes none.
    """

    def __init__(self, target: GcsLeaseTarget) -> None:
        import httpx

        self.target = target
        self.display = target.display
        endpoint = target.emulator or GCS_ENDPOINT
        if "://" not in endpoint:
            endpoint = f"http://{endpoint}"
        self._object = f"/storage/v1/b/{quote(target.bucket, safe='')}/o/" + quote(
            target.key, safe=""
        )
        self._upload = f"/upload/storage/v1/b/{quote(target.bucket, safe='')}/o"
        self._http = httpx.Client(base_url=endpoint.rstrip("/"), timeout=30.0)
        self._credentials = None if target.emulator else _google_credentials()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        headers = dict(kwargs.pop("headers", {}))
        if self._credentials is not None:
            headers["Authorization"] = f"Bearer {_google_token(self._credentials)}"
        try:
            response = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.TransportError as error:
            raise StoreFailure(
                f"cannot reach the storage endpoint ({type(error).__name__}); "
                "check STORAGE_EMULATOR_HOST or the network"
            ) from None
        if response.status_code == 412:
            raise Conflict("412")
        if response.status_code in (401, 403):
            raise StoreFailure(
                "access denied: check the credentials (GOOGLE_APPLICATION_CREDENTIALS) and "
                "their permissions on the bucket"
            )
        return response

    def _write(self, body: bytes, generation: str) -> str:
        boundary = uuid.uuid4().hex
        metadata = json.dumps({"name": self.target.key, "contentType": "application/json"})
        payload = (
            (
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
                f"{metadata}\r\n--{boundary}\r\nContent-Type: application/json\r\n\r\n"
            ).encode()
            + body
            + f"\r\n--{boundary}--\r\n".encode()
        )
        # multipart, not media: some emulators honour preconditions only on this form
        response = self._request(
            "POST",
            self._upload,
            params={"uploadType": "multipart", "ifGenerationMatch": generation},
            content=payload,
            headers={"Content-Type": f"multipart/related; boundary={boundary}"},
        )
        if response.status_code == 404:
            if generation != "0":
                raise Conflict("404")  # gone since we read it
            raise StoreFailure("the bucket does not exist")
        if response.status_code >= 300:
            raise StoreFailure(_gcs_error(response))
        return str(response.json()["generation"])

    def create(self, body: bytes) -> str:
        return self._write(body, "0")

    def replace(self, body: bytes, version: str) -> str:
        return self._write(body, version)

    def read(self) -> LeaseRecord | None:
        meta = self._request("GET", self._object)
        if meta.status_code == 404:
            return None
        if meta.status_code >= 300:
            raise StoreFailure(_gcs_error(meta))
        info = meta.json()
        generation = str(info["generation"])
        try:
            media = self._request(
                "GET", self._object, params={"alt": "media", "ifGenerationMatch": generation}
            )
        except Conflict:
            media = None  # rewritten since: read it as held by someone unknown
        body = media.content if media is not None and media.status_code == 200 else b""
        date = meta.headers.get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(UTC)
        return _record(body, generation, (now - _rfc3339(info["updated"])).total_seconds())

    def delete(self, version: str) -> None:
        response = self._request("DELETE", self._object, params={"ifGenerationMatch": version})
        if response.status_code == 404:
            raise Conflict("404")
        if response.status_code >= 300:
            raise StoreFailure(_gcs_error(response))

    def close(self) -> None:
        self._http.close()


def _rfc3339(text: str) -> datetime:
    """GCS times (`2026-11-29T15:51:08.02655Z`), any number of fraction digits."""
    main, _, fraction = text.rstrip("Z").partition(".")
    moment = datetime.fromisoformat(main).replace(tzinfo=UTC)
    return moment.replace(microsecond=int((fraction + "000000")[:6]) if fraction else 0)


def _gcs_error(response: Any) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:120] or "no detail"
    return f"HTTP {response.status_code}: {message}"


def _google_credentials() -> Any:
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
    except ImportError:
        raise StorageError(
            "the gs:// lock needs google-auth: pip install 'trigger-sessions-export[gcs]'"
        ) from None
    try:
        credentials, _ = google.auth.default(scopes=[GCS_SCOPE])
    except DefaultCredentialsError:
        raise StorageError(
            "no Google credentials found: set GOOGLE_APPLICATION_CREDENTIALS or run "
            "`gcloud auth application-default login`"
        ) from None
    return credentials


def _google_token(credentials: Any) -> str:
    import google.auth.transport.urllib3
    import urllib3

    if not credentials.valid:
        try:
            credentials.refresh(google.auth.transport.urllib3.Request(urllib3.PoolManager()))
        except Exception as error:  # google-auth raises many kinds
            raise StoreFailure(f"cannot get a Google access token ({error})") from None
    return str(credentials.token)
