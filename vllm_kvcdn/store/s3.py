"""``s3://bucket/prefix`` store over boto3: AWS S3 or any S3-compatible server (MinIO, R2,
Ceph RGW).

Configured the boto3 way: credentials, region and endpoint come from the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, ...), a profile or an instance
role. The URL's query string may name what differs per store::

    s3://bucket/prefix?endpoint_url=http://minio:9000&region=us-east-1&profile=kv

and tunes the client (defaults in ``S3Options``). What it does for a fleet:
- a missing object is a miss (``None``), never an error; a missing bucket is an error;
- large objects are read in parallel ranged GETs (``part_mib``) over a bounded pool;
- 5xx, throttling (503 SlowDown) and dropped connections are retried with backoff
  (botocore's "standard" mode for requests, here for a body cut mid-read);
- a circuit breaker fails at once while the store is down, so an outage costs a request
  a bounded delay, not a pile of timeouts;
- manifests are written with ``If-None-Match: *`` where the server supports it, so two
  servers publishing one document end with one manifest.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, fields
from urllib.parse import parse_qsl

from vllm_kvcdn.log import get_logger
from vllm_kvcdn.store.base import ObjectInfo, Store, StoreError, new_buffer
from vllm_kvcdn.store.breaker import CircuitBreaker

logger = get_logger(__name__)

_MISSING = object()


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None  # else boto3's (AWS_ENDPOINT_URL, profile, AWS)
    region: str | None = None
    profile: str | None = None
    addressing: str = ""  # path | virtual | auto; default: path with an endpoint_url, else auto
    # Ranged GET size: objects above it are read in parallel parts. Chunks are already read
    # io_threads at a time, so parts only need to keep one connection's request overhead
    # (botocore: ~3 ms of CPU each) small against its bytes: a 29 MB chunk is two GETs.
    part_mib: int = 16
    connections: int = 16  # HTTP connection pool (and parallel part reads)
    attempts: int = 4  # tries per request (botocore standard retries), and per cut body
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 10.0
    breaker_failures: int = 5  # failures in a row that open the circuit
    breaker_cooldown_s: float = 5.0  # how long an open circuit refuses calls

    @classmethod
    def from_query(cls, query: str) -> "S3Options":
        types = {f.name: f.type for f in fields(cls)}
        values = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name not in types:
                raise ValueError(f"unknown s3:// URL option {name!r}; known options: {sorted(types)}")
            kind = types[name]
            values[name] = int(value) if kind == "int" else float(value) if kind == "float" else value
        return cls(**values)


def _transient_errors():
    from botocore.exceptions import (
        ConnectionClosedError,
        EndpointConnectionError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import ProtocolError

    return (ConnectionClosedError, EndpointConnectionError, IncompleteReadError, ReadTimeoutError,
            ResponseStreamingError, ProtocolError, ConnectionError)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", options: S3Options | None = None):
        import boto3
        from botocore.config import Config

        if not bucket:
            raise ValueError("s3:// URL without a bucket: use s3://BUCKET[/PREFIX]")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.options = o = options or S3Options()
        self.url = f"s3://{bucket}/{self.prefix}"
        session = boto3.session.Session(profile_name=o.profile) if o.profile else boto3.session.Session()
        addressing = o.addressing or ("path" if o.endpoint_url else "auto")
        self._client = session.client("s3", endpoint_url=o.endpoint_url, region_name=o.region, config=Config(
            max_pool_connections=o.connections, connect_timeout=o.connect_timeout_s,
            read_timeout=o.read_timeout_s, retries={"mode": "standard", "total_max_attempts": o.attempts},
            s3={"addressing_style": addressing},
            # Chunks carry their own checksums, verified after the read: botocore's CRC of
            # every whole-object GET would cost a quarter of the client's CPU per byte again.
            response_checksum_validation="when_required",
        ))
        self.breaker = CircuitBreaker(self.url, o.breaker_failures, o.breaker_cooldown_s)
        self._part_bytes = o.part_mib << 20
        self._parts = ThreadPoolExecutor(o.connections, thread_name_prefix="kvcdn-s3")
        self._transient = _transient_errors()
        self._conditional_puts = True  # until the server says it does not support them
        self._warned = threading.Event()

    # -- one request, with the breaker and the error mapping ---------------------------

    def _call(self, what: str, request):
        """``request()``, with a missing object as ``_MISSING`` and every other failure
        as ``StoreError`` (counted by the breaker)."""
        from botocore.exceptions import BotoCoreError, ClientError

        self.breaker.before_call()
        try:
            result = request()
        except ClientError as e:
            code, status = _error_code(e)
            if code in ("NoSuchKey", "NotFound", "404"):
                self.breaker.succeeded()  # the store answered: a miss
                return _MISSING
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                self.breaker.succeeded()
                raise _Precondition(code) from e
            if code in ("NotImplemented", "InvalidArgument") and what.startswith("conditional"):
                self.breaker.succeeded()
                raise _Unsupported(code) from e
            if code == "NoSuchBucket":
                self.breaker.succeeded()  # answered, but the configuration is wrong
                raise StoreError(f"bucket {self.bucket!r} does not exist at {self._endpoint()}: create it, or fix "
                                 f"the store URL") from e
            self.breaker.failed()
            raise StoreError(f"{what} on {self.url}: {code} (HTTP {status})") from e
        except (BotoCoreError, *self._transient) as e:
            self.breaker.failed()
            raise StoreError(f"{what} on {self.url}: {e}") from e
        self.breaker.succeeded()
        return result

    def _endpoint(self) -> str:
        return self._client.meta.endpoint_url

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid store key {key!r}")
        return self.prefix + key

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str, into: memoryview | None = None) -> bytearray | memoryview | None:
        first = self._call(f"GET {key}", lambda: self._open(key))
        if first is _MISSING:
            return None
        response, total, etag = first
        if response is None:
            return bytearray()
        buf = new_buffer(total, into)  # one buffer, filled in place; writable: tensors view it without a copy
        view = memoryview(buf).cast("B")
        head = int(response["ContentLength"])
        # The other parts start now and run while this thread reads the first one's body.
        parts = [self._parts.submit(self._call, f"GET {key} from byte {s}", lambda s=s: self._fill(
            key, view[s : s + self._part_bytes], s, etag)) for s in range(head, total, self._part_bytes)]
        try:
            self._call(f"GET {key}", lambda: self._fill(key, view[:head], 0, etag, response=response))
            if any(part.result() is _MISSING for part in parts):
                return None  # deleted while we read it: a miss
        except _Precondition:
            raise StoreError(f"{key} on {self.url} was replaced while it was read") from None
        finally:
            for part in parts:
                part.cancel()
            futures_wait(parts)  # none may write into the buffer (maybe the caller's) after we return
        return buf

    def _open(self, key: str) -> tuple[dict | None, int, str | None]:
        """The response to a GET of the object's first part (its body not read yet), the
        whole object's size and its etag; no response for an empty object."""
        from botocore.exceptions import ClientError

        try:
            r = self._client.get_object(Bucket=self.bucket, Key=self._key(key),
                                        Range=f"bytes=0-{self._part_bytes - 1}")
        except ClientError as e:
            if _error_code(e)[0] != "InvalidRange":
                raise
            return None, 0, None  # an empty object has no byte 0
        return r, _total_size(r), r.get("ETag")

    def _fill(self, key: str, into: memoryview, start: int, etag: str | None, response=None) -> None:
        """Fill ``into`` with the object's bytes from ``start``. A body cut mid-read (reset,
        timeout) is asked again from where it stopped, of the same version (``If-Match``)."""
        got = 0
        for attempt in range(self.options.attempts):
            if response is None:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start + got}-{start + len(into) - 1}",
                    **({"IfMatch": etag} if etag else {}))
            try:
                got += _read_into(response["Body"], into[got:])
                return
            except self._transient as e:
                got += getattr(e, "kvcdn_bytes_read", 0)
                if attempt + 1 == self.options.attempts:
                    raise
                logger.warning("kvcdn: %s: reading %s was cut at byte %d (%r); asking for the rest",
                               self.url, key, start + got, e)
            finally:
                response["Body"].close()
                response = None

    def contains(self, key: str) -> bool:
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        r = self._call(f"HEAD {key}", lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(key)))
        return None if r is _MISSING else int(r["ContentLength"])

    def scan(self, prefix: str = "") -> Iterator[ObjectInfo]:
        def listing() -> list[ObjectInfo]:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix) if prefix else self.prefix)
            return [ObjectInfo(o["Key"][len(self.prefix):], int(o["Size"]), o["LastModified"].timestamp(),
                               o.get("ETag", "")) for page in pages for o in page.get("Contents", ())]

        found = self._call(f"LIST {prefix}", listing)
        return iter(() if found is _MISSING else found)

    # -- writes --------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        self._call(f"PUT {key}", lambda: self._client.put_object(Bucket=self.bucket, Key=self._key(key),
                                                                   Body=bytes(data)))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        if self._conditional_puts:
            try:
                self._call("conditional PUT", lambda: self._client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=bytes(data), IfNoneMatch="*"))
                return True
            except _Precondition:
                return False
            except _Unsupported as e:
                self._conditional_puts = False
                logger.warning("kvcdn: %s does not support conditional writes (%s); a concurrent publish of "
                               "one document may then write its manifest twice (same chunks)", self.url, e)
        return super().put_if_absent(key, data)

    def delete(self, key: str) -> bool:
        if not self.contains(key):  # S3 answers a delete of nothing with success
            return False
        self._call(f"DELETE {key}", lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(key)))
        return True


class _Precondition(StoreError):
    """The server refused a conditional request (the object exists, or changed)."""


class _Unsupported(StoreError):
    """The server does not implement a conditional request."""


def _error_code(e) -> tuple[str, int | None]:
    response = getattr(e, "response", {}) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code, response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _total_size(response: dict) -> int:
    """The whole object's size from a ranged GET (``Content-Range: bytes a-b/TOTAL``)."""
    content_range = response.get("ContentRange")
    if content_range and "/" in content_range:
        return int(content_range.rsplit("/", 1)[1])
    return int(response["ContentLength"])  # the server ignored the range: the whole object


_READ_STEP = 4 << 20


def _read_into(body, into: memoryview) -> int:
    """Read the body into ``into``; on a cut body, the exception carries how far it got."""
    got = 0
    try:
        while got < len(into):
            # Bounded reads: urllib3 serves a readinto by reading that many bytes into a
            # fresh buffer first; for a whole 29 MB part that costs 1.7x the client CPU.
            n = body.readinto(into[got : got + _READ_STEP])
            if not n:
                from botocore.exceptions import IncompleteReadError

                raise IncompleteReadError(actual_bytes=got, expected_bytes=len(into))
            got += n
    except Exception as e:
        e.kvcdn_bytes_read = got
        raise
    return got
