"""The HTTP front of `solray reward-server`: the protocol of rewards.remote on uvicorn, with limits.

The reward runs behind an async `score(images, prompts, metadata)` (solray.reward_server: a Ray Serve
deployment, or the same batching code in-process); this module receives, checks and decodes requests.
Every limit holds before the memory or the connection it guards is spent:

- connections: at most `max_connections` requests at once (uvicorn's limit_concurrency: 503 beyond), a
  listen backlog of `backlog`, the request line and headers within `header_timeout_s` and 64 KiB (408 /
  431, then the connection closes), idle keep-alive connections closed after `keep_alive_s`;
- bodies: a Content-Length of ASCII digits is required and checked before a byte is read (411 / 400 /
  413); the body must arrive within `read_timeout_s` (408); all bodies and decoded images in flight
  together stay under `max_inflight_bytes` (503, which the `remote` reward retries);
- images: each PNG / JPEG header is read before decoding, and a request's images together may hold at
  most `max_request_pixels` (413); decoding runs on `decode_workers` threads;
- scoring: at most `request_timeout_s` from the body's arrival to the scores (504);
- authentication: with a `token`, every request needs `Authorization: Bearer <token>` (401), compared
  in constant time; a host beyond loopback needs a token unless `insecure`.

A malformed request gets a 4xx with {"error": message} and a debug log line, never a traceback; a client
that leaves early is one info line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import uvicorn
from PIL import Image
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rewards.remote import DEFAULT_MAX_REQUEST_PIXELS, JSON, MSGPACK, TOKEN_ENV, pack, unpack

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 << 10  # request line plus headers
DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() accepts '²', which int() refuses
Score = Callable[[np.ndarray, list[str], list[dict[str, Any]]], Awaitable[np.ndarray]]


class RequestError(Exception):
    """A request the server refuses: carries the HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client closed its connection before its request was read."""


@dataclass(frozen=True)
class ServerSettings:
    """What `solray reward-server` is told; `check()` refuses nonsense before anything starts."""

    host: str = "127.0.0.1"  # 0.0.0.0 listens on every interface (then a token, or insecure)
    port: int = 8000  # 0 picks a free one
    max_batch: int = 64  # most images in one reward call
    batch_wait_s: float = 0.005  # how long a batch waits for more requests
    max_request_bytes: int = 64 << 20  # larger bodies get 413 before they are read
    max_image_pixels: int = 4096 * 4096  # per image
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS  # all images of a request: 32 of 1024x1024 (96 MiB decoded)
    max_inflight_bytes: int = 2 << 30  # bodies plus decoded images of every request in flight
    max_connections: int = 256  # concurrent requests; 503 beyond
    backlog: int = 1024  # connections the kernel queues before accept (capped by net.core.somaxconn)
    decode_workers: int = 4  # threads decoding PNG / JPEG
    header_timeout_s: float = 10.0
    read_timeout_s: float = 60.0  # for the whole body
    keep_alive_s: float = 5.0  # an idle connection between requests
    request_timeout_s: float = 300.0  # from the body's arrival to the scores: waiting for a batch plus scoring
    token: str | None = field(default=None, repr=False)  # never printed
    insecure: bool = False  # serve beyond loopback without a token

    def check(self) -> ServerSettings:
        """self, or ValueError naming the first setting that cannot work."""
        minimum = {"port": 0, "batch_wait_s": 0, "max_batch": 1, "max_request_bytes": 1, "max_image_pixels": 1, "max_request_pixels": 1}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float"):
                low = minimum.get(f.name)
                kind = int if f.type == "int" else int | float
                if isinstance(value, bool) or not isinstance(value, kind) or not np.isfinite(value):
                    raise ValueError(f"{f.name} must be {'an integer' if f.type == 'int' else 'a finite number'}, got {value!r}")
                if (low is None and value <= 0) or (low is not None and value < low):
                    raise ValueError(f"{f.name} must be {'> 0' if low is None else f'>= {low}'}, got {value!r}")
        if self.port > 65535:
            raise ValueError(f"port must be <= 65535, got {self.port}")
        if self.max_request_bytes > self.max_inflight_bytes:
            raise ValueError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) must hold one request of max_request_bytes ({self.max_request_bytes})"
            )
        if self.token is not None and not self.token.strip():
            raise ValueError(f"the token is empty (--token or {TOKEN_ENV})")
        if self.token is None and not self.insecure and not is_loopback(self.host):
            raise ValueError(f"{self.host!r} is reachable beyond this machine: set a token (--token or {TOKEN_ENV}) or pass --insecure")
        return self


def is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback one (127.0.0.0/8, ::1)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


@dataclass
class InspectedRequest:
    """A /score request whose image headers were read but not yet decoded."""

    images: list[Image.Image]
    prompts: list[str]
    metadata: list[dict[str, Any]]

    @property
    def decoded_bytes(self) -> int:
        return sum(image.width * image.height * 3 for image in self.images)

    def decode(self) -> np.ndarray:
        arrays = []
        for index, image in enumerate(self.images):
            try:
                arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
            except (OSError, ValueError, Image.DecompressionBombError) as error:  # a valid header on a truncated image
                raise RequestError(400, f"image {index}: not a PNG or JPEG image ({error})") from None
            finally:
                image.close()
        return np.stack(arrays)


def inspect_request(payload: dict[str, Any], content_type: str, settings: ServerSettings) -> InspectedRequest:
    """A /score body checked down to its image headers, or RequestError(400 / 413); nothing decoded yet."""
    images, prompts = payload.get("images"), payload.get("prompts")
    if not isinstance(images, list) or not isinstance(prompts, list):
        raise RequestError(400, 'the body needs "images" and "prompts" lists')
    metadata = payload.get("metadata")
    if metadata is None:
        metadata = [{} for _ in images]
    if not isinstance(metadata, list):
        raise RequestError(400, f'"metadata" must be a list of maps, got {type(metadata).__name__}')
    if not (len(images) == len(prompts) == len(metadata)):
        raise RequestError(
            400, f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata entries: give one of each per image"
        )
    if not all(isinstance(p, str) for p in prompts) or not all(isinstance(m, dict) for m in metadata):
        raise RequestError(400, "prompts must be strings and metadata entries maps")
    if not images:
        raise RequestError(400, "no images")
    opened = [_open_image(image, i, content_type, settings.max_image_pixels) for i, image in enumerate(images)]
    sizes = {image.size for image in opened}
    if len(sizes) > 1:
        raise RequestError(400, f"all images of a request must have one size, got {sorted(sizes)}")
    pixels = sum(image.width * image.height for image in opened)
    if pixels > settings.max_request_pixels:
        raise RequestError(413, f"the images hold {pixels} pixels; this server decodes at most {settings.max_request_pixels} per request")
    return InspectedRequest(opened, prompts, metadata)


def decode_request(
    payload: dict[str, Any], content_type: str, settings: ServerSettings
) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
    """Validated (images uint8 [B, H, W, 3], prompts, metadata) from a /score body, or RequestError(400 / 413)."""
    request = inspect_request(payload, content_type, settings)
    return request.decode(), request.prompts, request.metadata


def _open_image(image: Any, index: int, content_type: str, max_pixels: int) -> Image.Image:
    """The image with only its header read (PIL opens lazily)."""
    if content_type == JSON:
        if not isinstance(image, str):
            raise RequestError(400, f"image {index}: JSON images must be base64 strings")
        try:
            image = base64.b64decode(image.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise RequestError(400, f"image {index}: invalid base64") from None
    if not isinstance(image, bytes):
        raise RequestError(400, f"image {index}: msgpack images must be bytes (bin), got {type(image).__name__}")
    try:
        opened = Image.open(io.BytesIO(image), formats=["PNG", "JPEG"])
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RequestError(400, f"image {index}: not a PNG or JPEG image ({error})") from None
    if opened.width * opened.height > max_pixels:
        opened.close()
        raise RequestError(413, f"image {index}: {opened.width}x{opened.height} exceeds {max_pixels} pixels")
    return opened


class _Budget:
    """Bytes in flight across requests (used from the event loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise RequestError(503, f"the server is busy ({self.used} of {self.limit} bytes in flight); retry later")
        self.used += size


class ScoreApp:
    """The ASGI app: POST /score and GET /health (protocol in rewards.remote), scoring through `score`."""

    def __init__(self, settings: ServerSettings, score: Score, describe: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """describe: the reward's part of /health, {"reward": name, "queued": jobs waiting, "max_batch": images per call}."""
        self.settings, self._score, self._describe = settings.check(), score, describe
        self._decoders = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="reward-decode")
        self._inflight = _Budget(settings.max_inflight_bytes)

    def close(self) -> None:
        self._decoders.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":  # lifespan is off and websockets are refused by the server
            return
        host, port = scope.get("client") or ("?", "?")
        client = f"{host}:{port}"
        try:
            status, payload, content_type = await self._respond(scope, receive)
        except RequestError as error:
            logger.debug("%s %s %s: %d %s", client, scope["method"], scope["path"], error.status, error)
            # The body may be unread (401, 411, 413, 415, 408): close rather than parse leftovers as a request.
            await _send(send, error.status, {"error": str(error)}, JSON, close=True)
            return
        except ClientGone:
            logger.info("%s left before its %s %s was read", client, scope["method"], scope["path"])
            return
        await _send(send, status, payload, content_type)

    async def _respond(self, scope: dict[str, Any], receive: Callable) -> tuple[int, dict[str, Any], str]:
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        self._check_token(headers.get("authorization", ""))
        method, path = scope["method"], scope["path"]
        if path == "/health":
            if method != "GET":
                raise RequestError(405, "use GET for /health")
            limits = {"max_request_bytes": self.settings.max_request_bytes, "max_request_pixels": self.settings.max_request_pixels}
            return 200, {"status": "ok", **await self._describe(), **limits}, JSON
        if path != "/score":
            raise RequestError(404, f"no endpoint {path}; use POST /score or GET /health")
        if method != "POST":
            raise RequestError(405, "use POST for /score")
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in (MSGPACK, JSON):
            raise RequestError(415, f"Content-Type must be {MSGPACK} or {JSON}, got {content_type or 'none'}")
        length = self._content_length(headers)
        reserved = 0
        try:
            self._inflight.take(length)
            reserved = length
            loop = asyncio.get_running_loop()
            body = await self._read_body(receive, length, loop.time() + self.settings.read_timeout_s)
            request = await loop.run_in_executor(self._decoders, self._inspect, body, content_type)
            del body
            self._inflight.take(request.decoded_bytes)
            reserved += request.decoded_bytes
            images = await loop.run_in_executor(self._decoders, request.decode)
            try:
                scores = await asyncio.wait_for(self._score(images, request.prompts, request.metadata), self.settings.request_timeout_s)
            except TimeoutError:
                raise RequestError(504, f"no scores within {self.settings.request_timeout_s:g} s") from None
        finally:
            self._inflight.used -= reserved
        return 200, {"scores": [float(s) for s in scores]}, content_type

    def _check_token(self, authorization: str) -> None:
        if self.settings.token is None:
            return
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.settings.token.encode()):
            raise RequestError(401, "a valid token is required: Authorization: Bearer <token>")

    def _content_length(self, headers: dict[str, str]) -> int:
        if "transfer-encoding" in headers:
            raise RequestError(411, "chunked bodies are not accepted: send a Content-Length")
        length = headers.get("content-length")
        if length is None:
            raise RequestError(411, "a Content-Length header is required")
        if not DIGITS.fullmatch(length):
            raise RequestError(400, f"bad Content-Length {length[:40]!r}")
        if int(length) > self.settings.max_request_bytes:
            raise RequestError(413, f"the body is {length} bytes; this server accepts at most {self.settings.max_request_bytes}")
        return int(length)

    async def _read_body(self, receive: Callable, length: int, deadline: float) -> bytes:
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise RequestError(408, f"the body did not arrive within {self.settings.read_timeout_s:g} s") from None
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > length:  # the HTTP parser stops at Content-Length; this only guards the budget
                raise RequestError(400, f"the body is longer than its Content-Length {length}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _inspect(self, body: bytes, content_type: str) -> InspectedRequest:
        try:
            payload = unpack(body, content_type)
        except Exception as error:  # msgpack and json raise many types on malformed input
            raise RequestError(400, f"malformed {content_type} body: {error}") from None
        return inspect_request(payload, content_type, self.settings)


async def _send(send: Callable, status: int, payload: dict[str, Any], content_type: str, close: bool = False) -> None:
    body = pack(payload, content_type)
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})


class _GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with what it lacks: a deadline and a size cap for the request line and headers.

    uvicorn times out only idle connections between requests: a client that sends half a request line
    holds its connection (and a file descriptor) forever.
    """

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s, self.head_timer = header_timeout_s, None
        self.head_bytes = self.unfinished_head_bytes = 0  # parsed (URL, headers) and raw bytes of the current head

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of the next request on a kept-alive connection
        in_head = self.head_timer is not None
        super().data_received(data)
        # httptools reports a header only once the next one starts: an endless header line never reaches on_header,
        # so a head still unfinished after these bytes is bounded by its raw bytes too.
        if in_head and self.head_timer is not None:
            self.unfinished_head_bytes += len(data)
            if self.unfinished_head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, b"Request Header Fields Too Large", b"request line and headers over 64 KiB")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        self.head_bytes = self.unfinished_head_bytes = 0
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self.head_timer = self.loop.call_later(self.header_timeout_s, self._refuse, 408, b"Request Timeout", b"headers too slow")

    def _disarm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _count(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES:
            self._refuse(431, b"Request Header Fields Too Large", b"request line and headers over 64 KiB")
            raise RuntimeError("request head too large")  # stops the parser; the connection is already closed

    def _refuse(self, status: int, reason: bytes, log: bytes) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        logger.debug("%s: %d %s", self.client, status, log.decode())
        body = f'{{"error": "{log.decode()}"}}'.encode()
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self.transport.write(head % (status, reason, len(body)) + body)
        self.transport.close()


class HttpFront:
    """uvicorn serving `app` on a socket bound at construction (OSError there: the address is unusable)."""

    def __init__(self, app: ScoreApp, settings: ServerSettings) -> None:
        self.app = app
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((settings.host, settings.port))
        except (OSError, OverflowError):
            self.socket.close()
            raise
        config = uvicorn.Config(
            app,
            http=lambda **kwargs: _GuardedHttpTools(header_timeout_s=settings.header_timeout_s, **kwargs),
            ws="none",
            lifespan="off",
            limit_concurrency=settings.max_connections,
            backlog=settings.backlog,
            timeout_keep_alive=settings.keep_alive_s,
            timeout_graceful_shutdown=5,
            access_log=False,
            log_config=None,
            server_header=False,
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # the CLI handles Ctrl-C

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serve in this thread until `stop` (from another thread) or Ctrl-C."""
        try:
            asyncio.run(self.server.serve(sockets=[self.socket]))
        except KeyboardInterrupt:
            pass
        finally:
            self.socket.close()
            self.app.close()

    def stop(self) -> None:
        self.server.should_exit = True

    @contextmanager
    def running(self) -> Iterator[str]:
        """Serve on a background thread while the block runs; yields the URL."""
        thread = threading.Thread(target=self.serve_forever, name="reward-server-http", daemon=True)
        thread.start()
        try:
            while not self.server.started and thread.is_alive():
                thread.join(0.01)
            if not self.server.started:
                raise RuntimeError(f"the reward server did not start on {self.url}")
            yield self.url
        finally:
            self.stop()
            thread.join()
