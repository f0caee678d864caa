"""S3 through boto3: one client per process, adaptive retries, errors that name the bucket.

Credentials come from the standard AWS chain (environment, profile, instance role) and never
from our configs; `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` select an S3-compatible store.
A streaming read that loses its connection, or is throttled (503 SlowDown) beyond botocore's own retries,
backs off and resumes with a `Range` request where it stopped, pinned to the object it started (`If-Match`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import threading
import time
from typing import Iterator

import boto3
import botocore.exceptions as bex
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from dcgan_dist.errors import DataError

log = logging.getLogger(__name__)

_clients: dict[int, object] = {}
_lock = threading.Lock()
_retries = {"count": 0}  # this process's S3 read retries, ours and botocore's (the data_retries metric)


def retries() -> int:
    return _retries["count"]

# What a dropped or refused connection looks like while reading or connecting.
TRANSIENT = (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ReadTimeoutError,
             bex.ConnectTimeoutError, bex.ResponseStreamingError, bex.IncompleteReadError,
             ConnectionError, TimeoutError)
# Throttling and server trouble that outlast botocore's retries: wait and try again rather than skip the shard.
THROTTLED = ("SlowDown", "ServiceUnavailable", "RequestLimitExceeded", "Throttling", "InternalError")


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    if not is_s3(url) or len(url) <= 5:
        raise DataError(f"{url!r} is not an s3://bucket/key URL")
    bucket, _, key = url[5:].partition("/")
    if not bucket:
        raise DataError(f"{url!r} names no bucket")
    return bucket, key


MAX_ATTEMPTS = 5  # botocore's own tries per request, before ours (ResumableBody)


def client():
    """This process's S3 client (boto3 clients are thread-safe but must not cross a fork)."""
    pid = os.getpid()
    with _lock:
        if pid not in _clients:
            cfg = Config(retries={"mode": "adaptive", "max_attempts": MAX_ATTEMPTS}, connect_timeout=5, read_timeout=30,
                         max_pool_connections=32)
            _clients[pid] = boto3.session.Session().client("s3", config=cfg)
        return _clients[pid]


@contextlib.contextmanager
def errors(url: str, action: str = "access") -> Iterator[None]:
    """Turn botocore failures into a DataError that says which bucket and what to do."""
    bucket = url[5:].split("/", 1)[0] if is_s3(url) else url
    try:
        yield
    except bex.NoCredentialsError:
        raise DataError(f"no AWS credentials to {action} {url}: set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
                        f"AWS_SECRET_ACCESS_KEY, or run where an instance role gives access") from None
    except (bex.EndpointConnectionError, bex.ConnectTimeoutError) as e:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        raise DataError(f"cannot reach the S3 endpoint ({endpoint}) to {action} {url}: {e}; check the network "
                        f"and AWS_ENDPOINT_URL_S3") from None
    except bex.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            raise DataError(f"bucket {bucket!r} does not exist ({action} {url}); create it or fix the name") from None
        if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
                raise DataError(f"S3 rejected the credentials ({code}) to {action} {url}: check "
                                f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile") from None
            raise DataError(f"access denied to {action} {url} in bucket {bucket!r}: the credentials' policy "
                            f"must allow s3:GetObject, s3:PutObject and s3:ListBucket there") from None
        if code in ("NoSuchKey", "404", "NotFound"):
            raise DataError(f"{url} does not exist") from None
        raise DataError(f"S3 error {code or status} trying to {action} {url}: {e}") from None


def exists(url: str) -> dict | None:
    """head_object -> {"bytes", "metadata"} or None when the object is missing."""
    bucket, key = split(url)
    with errors(url, "check"):
        try:
            head = client().head_object(Bucket=bucket, Key=key)
        except bex.ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise
    return {"bytes": head["ContentLength"], "metadata": head.get("Metadata", {})}


def read_bytes(url: str) -> bytes:
    bucket, key = split(url)
    with errors(url, "read"):
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(url: str, data: bytes, metadata: dict | None = None) -> None:
    """A single PUT: S3 shows the object whole or not at all."""
    bucket, key = split(url)
    with errors(url, "write"):
        client().put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata or {})


def upload_file(path: str, url: str, metadata: dict | None = None) -> None:
    """Multipart upload for big files: the object appears only when the upload is completed."""
    bucket, key = split(url)
    with errors(url, "write"):
        client().upload_file(path, bucket, key, ExtraArgs={"Metadata": metadata or {}},
                             Config=TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20,
                                                   use_threads=False))


def list_keys(url: str) -> list[str]:
    bucket, prefix = split(url)
    keys = []
    with errors(url, "list"):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def check_bucket(url: str, action: str) -> None:
    """Fail early, with the clear message, if the bucket is missing or unreachable."""
    bucket, _ = split(url)
    with errors(url, action):
        try:
            client().head_bucket(Bucket=bucket)
        except bex.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                e.response["Error"]["Code"] = "NoSuchBucket"  # HEAD responses carry no error code
            if status == 403:  # denied, or bad keys? a GET tells (its error has a body)
                client().list_objects_v2(Bucket=bucket, MaxKeys=1)
            raise


RETRIES, BACKOFF_S = 8, 0.5  # our re-requests; the first waits BACKOFF_S, doubling to max_backoff (~40 s in all)


class ResumableBody(io.RawIOBase):
    """A readable stream over one S3 object that survives dropped connections.

    On a transient failure or throttling it waits (exponential backoff with jitter) and re-requests the rest of
    the object with `Range: bytes=<pos>-` and `If-Match: <ETag of the first response>`, so an object replaced
    mid-read is refused (a DataError) instead of spliced from two versions. `retries()` counts those re-requests
    and botocore's own retries, per process; after `max_retries` in a row the error propagates (the reader then
    skips the shard).
    """

    def __init__(self, url: str, max_retries: int | None = None, backoff: float | None = None,
                 max_backoff: float = 8.0):
        self.url, (self.bucket, self.key) = url, split(url)
        self.max_retries = RETRIES if max_retries is None else max_retries
        self.backoff, self.max_backoff = backoff or BACKOFF_S, max_backoff
        self.pos, self.size, self.etag, self.body = 0, None, None, None
        self._connect()

    def _connect(self) -> None:
        failures = 0
        while True:
            try:
                with errors(self.url, "read"):
                    kw = {"Range": f"bytes={self.pos}-", "IfMatch": self.etag} if self.pos else {}
                    try:
                        resp = client().get_object(Bucket=self.bucket, Key=self.key, **kw)
                    except TRANSIENT as e:
                        raise _Transient(e) from None
                    except bex.ClientError as e:
                        code = e.response.get("Error", {}).get("Code", "")
                        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                        if code == "PreconditionFailed" or status == 412:
                            raise DataError(f"{self.url} was replaced while being read (at byte {self.pos}, ETag "
                                            f"{self.etag}); not splicing two versions") from None
                        if code in THROTTLED or status in (500, 503):
                            raise _Transient(e) from None
                        raise
                _retries["count"] += resp["ResponseMetadata"].get("RetryAttempts", 0)  # botocore's own retries
                if self.size is None:
                    self.size, self.etag = resp["ContentLength"], resp["ETag"]
                self.body = resp["Body"]
                return
            except _Transient as t:
                failures += 1
                self._wait_or_raise(failures, t.error)

    def _wait_or_raise(self, failures: int, error: Exception) -> None:
        if failures > self.max_retries:
            raise OSError(f"{self.url}: giving up at byte {self.pos} after {self.max_retries} retries: {error}")
        _retries["count"] += 1
        delay = min(self.max_backoff, self.backoff * 2 ** (failures - 1)) * (0.5 + random.random() / 2)
        log.warning("s3: %s at byte %d of %s; retry %d in %.1fs", type(error).__name__, self.pos, self.url,
                    failures, delay)
        time.sleep(delay)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        failures = 0
        while True:
            if self.pos >= self.size:  # known from the first response
                return 0
            try:
                data = self.body.read(len(buf))
                if not data:  # the connection closed early without an error (the end was handled above)
                    raise ConnectionError(f"{self.url} ended at byte {self.pos} of {self.size}")
            except Exception as e:  # botocore's transient errors, or urllib3's on a cut connection
                if not isinstance(e, TRANSIENT) and "urllib3" not in type(e).__module__:
                    raise
                failures += 1
                self._wait_or_raise(failures, e)
                self._connect()
                continue
            n = len(data)
            buf[:n] = data
            self.pos += n
            return n

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        super().close()


class _Transient(Exception):
    def __init__(self, error: Exception):
        self.error = error
