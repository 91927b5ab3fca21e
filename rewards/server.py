"""`solray reward-server`: any registered reward behind HTTP (protocol in rewards.remote), with batching.

HTTP requests are handled on threads; one batcher thread owns the reward. It takes the oldest
waiting job, waits up to `batch_wait` seconds for more, and scores together every waiting job of the
same image size that fits in `max_batch` images. Requests larger than `max_batch` are split into
jobs. If a merged batch fails, each of its jobs is scored alone, so one bad request fails only itself.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

from rewards.base import Reward
from rewards.remote import JSON, MSGPACK, pack, unpack

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 4096 * 4096  # per decoded image: a small PNG can expand to gigabytes
SHUTDOWN_POLL_SECONDS = 0.05  # how often a background server checks for `close` (the stdlib default waits 0.5 s)


class RequestError(Exception):
    """A request the server refuses: carries the HTTP status (4xx) and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    images: np.ndarray
    prompts: list[str]
    metadata: list[dict[str, Any]]
    done: threading.Event = field(default_factory=threading.Event)
    scores: np.ndarray | None = None
    error: str | None = None


class RewardServer:
    """Serves `reward` on http://host:port (port 0 picks a free one); `start` runs it on background threads."""

    def __init__(
        self,
        reward: Reward,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_batch: int = 64,
        max_request_bytes: int = 64 << 20,
        batch_wait: float = 0.005,
    ) -> None:
        self.reward = reward
        self.max_batch, self.max_request_bytes, self.batch_wait = max_batch, max_request_bytes, batch_wait
        self._pending: list[_Job] = []
        self._condition = threading.Condition()
        self._closed = False
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.app = self
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def queued(self) -> int:
        """Jobs waiting for the batcher (not counting the batch being scored)."""
        with self._condition:
            return len(self._pending)

    def start(self) -> RewardServer:
        """Serve on background threads (tests, notebooks); `close` stops them."""
        self._start_thread(self._run_batches)
        self._start_thread(self._httpd.serve_forever, SHUTDOWN_POLL_SECONDS)
        return self

    def serve_forever(self) -> None:
        """Serve in the foreground until interrupted (the CLI's mode)."""
        self._start_thread(self._run_batches)
        try:
            self._httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def _start_thread(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=f"reward-server-{target.__name__.strip('_')}")
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        """Stop serving; jobs still waiting fail with "server is shutting down"."""
        with self._condition:
            self._closed = True
            for job in self._pending:
                job.error = "the reward server is shutting down"
                job.done.set()
            self._pending.clear()
            self._condition.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def score(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
        """Queue a request as jobs of <= max_batch images and wait for their scores (called by handler threads)."""
        jobs = [
            _Job(images[start : start + self.max_batch], prompts[start : start + self.max_batch], metadata[start : start + self.max_batch])
            for start in range(0, len(images), self.max_batch)
        ]
        with self._condition:
            if self._closed:
                raise RuntimeError("the reward server is shutting down")
            self._pending.extend(jobs)
            self._condition.notify_all()
        for job in jobs:
            job.done.wait()
            if job.error is not None:
                raise RuntimeError(job.error)
        return np.concatenate([job.scores for job in jobs])

    def _run_batches(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                deadline = time.monotonic() + self.batch_wait
                while sum(len(job.images) for job in self._pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._condition.wait(left)
                batch = self._take_batch()
            self._score_jobs(batch)

    def _take_batch(self) -> list[_Job]:
        """The oldest job, plus later ones of its image size while they fit in max_batch (lock held)."""
        first = self._pending[0]
        batch, size = [], 0
        for job in list(self._pending):
            if job.images.shape[1:] == first.images.shape[1:] and size + len(job.images) <= self.max_batch:
                batch.append(job)
                size += len(job.images)
                self._pending.remove(job)
        return batch

    def _score_jobs(self, jobs: list[_Job]) -> None:
        try:
            scores = self.reward.score(
                np.concatenate([job.images for job in jobs]),
                [p for job in jobs for p in job.prompts],
                [m for job in jobs for m in job.metadata],
            )
        except Exception as error:  # RewardError, or anything else: the batcher thread must outlive every batch
            if len(jobs) > 1:
                for job in jobs:
                    self._score_jobs([job])
                return
            jobs[0].error = str(error)
            jobs[0].done.set()
            return
        offset = 0
        for job in jobs:
            job.scores = scores[offset : offset + len(job.images)]
            offset += len(job.images)
            job.done.set()


def decode_request(payload: dict[str, Any], content_type: str) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
    """Validated (images uint8 [B, H, W, 3], prompts, metadata) from a /score body, or RequestError(400 / 413)."""
    images, prompts = payload.get("images"), payload.get("prompts")
    if not isinstance(images, list) or not isinstance(prompts, list):
        raise RequestError(400, 'the body needs "images" and "prompts" lists')
    metadata = payload.get("metadata") or [{} for _ in images]
    if not (len(images) == len(prompts) == len(metadata)):
        raise RequestError(
            400, f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata entries: give one of each per image"
        )
    if not all(isinstance(p, str) for p in prompts) or not all(isinstance(m, dict) for m in metadata):
        raise RequestError(400, "prompts must be strings and metadata entries maps")
    if not images:
        raise RequestError(400, "no images")
    arrays = [_decode_image(image, i, content_type) for i, image in enumerate(images)]
    if len({a.shape for a in arrays}) > 1:
        raise RequestError(400, f"all images of a request must have one size, got {sorted({a.shape[:2] for a in arrays})}")
    return np.stack(arrays), prompts, metadata


def _decode_image(image: Any, index: int, content_type: str) -> np.ndarray:
    if content_type == JSON:
        if not isinstance(image, str):
            raise RequestError(400, f"image {index}: JSON images must be base64 strings")
        try:
            image = base64.b64decode(image, validate=True)
        except binascii.Error:
            raise RequestError(400, f"image {index}: invalid base64") from None
    if not isinstance(image, bytes):
        raise RequestError(400, f"image {index}: msgpack images must be bytes (bin), got {type(image).__name__}")
    try:
        with Image.open(io.BytesIO(image), formats=["PNG", "JPEG"]) as decoded:
            if decoded.width * decoded.height > MAX_IMAGE_PIXELS:
                raise RequestError(413, f"image {index}: {decoded.width}x{decoded.height} exceeds {MAX_IMAGE_PIXELS} pixels")
            return np.asarray(decoded.convert("RGB"), dtype=np.uint8)
    except (OSError, Image.DecompressionBombError) as error:
        raise RequestError(400, f"image {index}: not a PNG or JPEG image ({error})") from None


class _Handler(BaseHTTPRequestHandler):
    server_version = "solray-reward-server"
    protocol_version = "HTTP/1.1"

    @property
    def app(self) -> RewardServer:
        return self.server.app

    def do_GET(self) -> None:
        if self.path == "/health":
            app = self.app
            info = {
                "status": "ok",
                "reward": app.reward.name,
                "queued": app.queued,
                "max_batch": app.max_batch,
                "max_request_bytes": app.max_request_bytes,
            }
            self._send(200, info, JSON)
        elif self.path == "/score":
            self._send_error(405, "use POST for /score")
        else:
            self._send_error(404, f"no endpoint {self.path}; use POST /score or GET /health")

    def do_POST(self) -> None:
        if self.path != "/score":
            self._send_error(405 if self.path == "/health" else 404, f"POST goes to /score, not {self.path}")
            return
        try:
            content_type = self.headers.get_content_type()
            if content_type not in (MSGPACK, JSON):
                raise RequestError(415, f"Content-Type must be {MSGPACK} or {JSON}, got {content_type}")
            length = self.headers.get("Content-Length")
            if length is None:
                raise RequestError(411, "a Content-Length header is required")
            if not length.isdigit():
                raise RequestError(400, f"bad Content-Length {length!r}")
            if int(length) > self.app.max_request_bytes:
                raise RequestError(413, f"the body is {length} bytes; this server accepts at most {self.app.max_request_bytes}")
            try:
                payload = unpack(self.rfile.read(int(length)), content_type)
            except Exception as error:  # msgpack and json raise many types on malformed input
                raise RequestError(400, f"malformed {content_type} body: {error}") from None
            images, prompts, metadata = decode_request(payload, content_type)
        except RequestError as error:
            self._send_error(error.status, str(error))
            return
        try:
            scores = self.app.score(images, prompts, metadata)
        except RuntimeError as error:
            self._send_error(500, str(error))
            return
        self._send(200, {"scores": [float(s) for s in scores]}, content_type)

    def _send_error(self, status: int, message: str) -> None:
        # The body may be unread (413, 411, 415): close the connection rather than parse leftovers as a request.
        self.close_connection = True
        self._send(status, {"error": message}, JSON)

    def _send(self, status: int, payload: dict[str, Any], content_type: str) -> None:
        body = pack(payload, content_type)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)
