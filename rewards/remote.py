"""Rewards over HTTP: the wire format, and the `remote` reward client of `solray reward-server` (rewards.server).

Protocol (never pickle: a reward server may face many clients, and unpickling runs code)
  POST /score   body {"images": [...], "prompts": [str], "metadata": [dict]}   (metadata optional)
                  Content-Type application/msgpack: images are PNG or JPEG bytes
                  Content-Type application/json:    images are base64 strings of PNG or JPEG bytes
                -> 200 {"scores": [float]} in the request's format; JSON writes NaN ("not applicable") as null
  GET /health   -> 200 {"status": "ok", "reward": name, "queued": jobs waiting, "max_batch": ..., "max_request_bytes": ...,
                         "max_request_pixels": ...}
  auth          a server started with a token wants `Authorization: Bearer <token>` on every request (else 401);
                the `remote` reward sends the token in the environment variable `token_env` (SOLRAY_REWARD_TOKEN)
  errors        -> 4xx / 5xx with JSON {"error": message}; 4xx are the client's fault and never retried;
                   413: a body over max_request_bytes or images over max_request_pixels; 503: busy, retried
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, ClassVar

import msgpack
import numpy as np
from PIL import Image

from rewards.base import Reward, register_reward

MSGPACK, JSON = "application/msgpack", "application/json"
WIRE_FORMATS = {"msgpack": MSGPACK, "json": JSON}
IMAGE_FORMATS = ("png", "jpeg")
TOKEN_ENV = "SOLRAY_REWARD_TOKEN"
DEFAULT_MAX_REQUEST_PIXELS = 32 << 20  # the server's default limit too (rewards.server.ServerSettings)


def encode_image(image: np.ndarray, image_format: str = "png", jpeg_quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=image_format.upper(), **({"quality": jpeg_quality} if image_format == "jpeg" else {}))
    return buffer.getvalue()


def pack(payload: dict[str, Any], content_type: str) -> bytes:
    """A request or response body; in JSON, bytes become base64 strings and NaN becomes null."""
    if content_type == MSGPACK:
        return msgpack.packb(payload, use_bin_type=True)

    def plain(value: Any) -> Any:
        if isinstance(value, bytes):
            return base64.b64encode(value).decode("ascii")
        if isinstance(value, float) and value != value:
            return None
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return json.dumps(plain(payload)).encode()


def unpack(body: bytes, content_type: str) -> dict[str, Any]:
    """The inverse of `pack` (images stay base64 strings in JSON; the server decodes them)."""
    payload = msgpack.unpackb(body, raw=False) if content_type == MSGPACK else json.loads(body)
    if not isinstance(payload, dict):
        raise ValueError(f"the body must be a map/object, got {type(payload).__name__}")
    return payload


@register_reward
class RemoteReward(Reward):
    """Scores by POSTing images to a reward server, `batch_size` images per request (retries: `post_with_retries`)."""

    name = "remote"
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0}  # PNG encoding; the model runs on the server

    def __init__(
        self,
        url: str,
        wire_format: str = "msgpack",
        image_format: str = "png",
        jpeg_quality: int = 95,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        batch_size: int = 64,
        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
        token_env: str = TOKEN_ENV,
    ) -> None:
        """url: the server's base URL, e.g. http://host:8000; png is lossless, jpeg is smaller and lossy.
        A request holds at most `batch_size` images and `max_request_pixels` pixels (the server's limit).
        The server's token, if it has one, is read from the environment variable `token_env` at each request."""
        if wire_format not in WIRE_FORMATS:
            raise ValueError(f"reward 'remote': wire_format must be one of {tuple(WIRE_FORMATS)}, got {wire_format!r}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"reward 'remote': image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        self.url = url.rstrip("/")
        self.content_type = WIRE_FORMATS[wire_format]
        self.image_format, self.jpeg_quality = image_format, jpeg_quality
        self.timeout, self.retries, self.backoff, self.batch_size = timeout, retries, backoff, batch_size
        self.max_request_pixels, self.token_env = max_request_pixels, token_env

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
        per_request = max(1, min(self.batch_size, self.max_request_pixels // max(1, images.shape[1] * images.shape[2])))
        parts = [slice(start, start + per_request) for start in range(0, len(images), per_request)]
        return np.concatenate([self._post(images[part], prompts[part], metadata[part]) for part in parts])

    def _post(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
        encoded = [encode_image(image, self.image_format, self.jpeg_quality) for image in images]
        body = pack({"images": encoded, "prompts": prompts, "metadata": metadata}, self.content_type)
        headers = {"Content-Type": self.content_type}
        if token := os.environ.get(self.token_env):
            headers["Authorization"] = f"Bearer {token}"
        answer, content_type = post_with_retries(f"{self.url}/score", body, headers, self.timeout, self.retries, self.backoff)
        scores = unpack(answer, content_type)["scores"]
        if len(scores) != len(images):
            raise RuntimeError(f"{self.url}/score returned {len(scores)} scores for {len(images)} images")
        return np.array([np.nan if s is None else s for s in scores], dtype=np.float64)


def post_with_retries(url: str, body: bytes, headers: dict[str, str], timeout: float, retries: int, backoff: float) -> tuple[bytes, str]:
    """POST and return (body, content type). Connection errors, timeouts and 5xx are retried `retries` times,
    waiting backoff * 2**attempt seconds; a 4xx raises at once with the server's message."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    last_error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read(), response.headers.get_content_type()
        except urllib.error.HTTPError as error:
            last_error = f"HTTP {error.code}: {_error_message(error)}"
            if error.code < 500:
                raise RuntimeError(f"{url} refused the request: {last_error}") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
            last_error = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
    raise RuntimeError(f"{url} failed {retries + 1} times; last error: {last_error}")


def _error_message(error: urllib.error.HTTPError) -> str:
    """The {"error": ...} message of a reward server, OpenAI's {"error": {"message": ...}}, or the raw body."""
    body = error.read()
    try:
        message = json.loads(body)["error"]
        return message["message"] if isinstance(message, dict) else str(message)
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:500] or str(error.reason)
