"""VLM-as-judge reward: a vision-language model served by vLLM scores each image against its prompt.

Talks to vLLM's OpenAI-compatible POST /v1/chat/completions with urllib (no openai package at run
time), one request per image, `concurrency` in flight (vLLM batches them on the GPU). Start vLLM
(the `vllm` extra) on the reward node, e.g.

    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000 --max-model-len 8192 --limit-mm-per-prompt '{"image": 1}'

and name it in the recipe: rewards: [{name: vlm_judge, kwargs: {url: http://HOST:8000/v1}}].
A server that wants a key (`vllm serve --api-key`) gets it from the environment variable that
`api_key_env` names (SOLRAY_VLM_API_KEY), set where the reward workers run; an `api_key` kwarg works
too, but only the environment keeps it out of the recipe (checkpoints and W&B hold it redacted).

The answer is parsed by `parse_score`; a score is returned normalised to [0, 1]. An answer without
a usable score gives NaN ("not applicable": advantages skip it) and counts in `metrics()`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np

from rewards.base import Reward, register_reward
from rewards.remote import IMAGE_FORMATS, encode_image, post_with_retries

DEFAULT_RUBRIC = (
    "You judge images made by a text-to-image model. Given the prompt and the image, rate from 0 to 10 how "
    "faithfully the image shows everything the prompt asks for (objects, counts, colours, positions, text) "
    "and how good it looks; 10 is a perfect, flawless match. Answer in the form 'Score: N/10', then one "
    "sentence of reasons."
)
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
# "Score: 7/10", "score = 7.5", "Rating: 8 out of 10", "**Score**: 6"
_KEYWORD_SCORE = re.compile(rf"\b(?:score|rating)\b[^0-9+\-\n]{{0,12}}({_NUMBER})(?:\s*(?:/|out of)\s*({_NUMBER}))?", re.IGNORECASE)
_FRACTION = re.compile(rf"({_NUMBER})\s*(?:/|out of)\s*({_NUMBER})", re.IGNORECASE)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")


def parse_score(answer: str, max_score: float = 10.0) -> float | None:
    """The score in [0, 1] a judge's answer gives, or None when it has no usable one.

    Tried in order: a JSON object with a "score" key; "score"/"rating" followed by a number (and an
    optional "/ N" or "out of N"); the first "a/b" or "a out of b"; the whole answer as one number.
    A number without its own denominator is out of `max_score`; a score outside [0, max] is unusable.
    """
    for match in _JSON_OBJECT.finditer(answer):
        try:
            fields = {str(k).lower(): v for k, v in json.loads(match.group()).items()}
        except (ValueError, AttributeError):
            continue
        if isinstance(fields.get("score"), int | float) and not isinstance(fields["score"], bool):
            return _normalise(float(fields["score"]), max_score)
    match = _KEYWORD_SCORE.search(answer) or _FRACTION.search(answer)
    if match:
        value, denominator = match.groups()
        return _normalise(float(value), float(denominator) if denominator else max_score)
    if re.fullmatch(rf"\s*({_NUMBER})\s*\.?\s*", answer):
        return _normalise(float(answer.strip().rstrip(".")), max_score)
    return None


def _normalise(value: float, scale: float) -> float | None:
    return value / scale if scale > 0 and 0 <= value <= scale else None


@register_reward
class VLMJudge(Reward):
    name = "vlm_judge"
    resources: ClassVar[dict[str, float]] = {"num_cpus": 1.0}  # the VLM runs in the vLLM server

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000/v1",
        model: str | None = None,
        rubric: str = DEFAULT_RUBRIC,
        max_score: float = 10.0,
        temperature: float = 0.0,
        max_tokens: int = 128,
        image_format: str = "png",
        concurrency: int = 16,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        api_key: str | None = None,
        api_key_env: str = "SOLRAY_VLM_API_KEY",
    ) -> None:
        """url: the server's OpenAI base URL (…/v1); model: the served model name (None: the server's first);
        rubric: the system message; max_score: the scale the rubric asks for (for bare numbers);
        api_key: the server's key, else the value of the environment variable api_key_env (no key when unset)."""
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"reward 'vlm_judge': image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        self.url = url.rstrip("/")
        self.rubric, self.max_score, self.temperature, self.max_tokens = rubric, max_score, temperature, max_tokens
        self.image_format, self.concurrency = image_format, concurrency
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        api_key = api_key or os.environ.get(api_key_env)
        self.headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
        self.model = model  # None: asked from the server on the first call (vLLM may still be loading now)
        self.unparsable_total = 0  # answers without a usable score, over the reward's life
        self.unparsable_last = 0  # ... in the last batch
        self.last_answers: list[str] = []  # the raw answers of the last batch, for logging examples

    def _served_model(self) -> str:
        request = urllib.request.Request(f"{self.url}/models", headers=self.headers)
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            served = json.loads(response.read())["data"]
        if not served:
            raise RuntimeError(f"{self.url}/models lists no model; pass model=...")
        return served[0]["id"]

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
        if self.model is None:
            self.model = self._served_model()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            self.last_answers = list(pool.map(self._ask, images, prompts))
        scores = [parse_score(answer, self.max_score) for answer in self.last_answers]
        self.unparsable_last = sum(score is None for score in scores)
        self.unparsable_total += self.unparsable_last
        return np.array([np.nan if score is None else score for score in scores], dtype=np.float64)

    def metrics(self) -> dict[str, float]:
        return {
            "reward/vlm_judge/unparsable": float(self.unparsable_last),
            "reward/vlm_judge/unparsable_total": float(self.unparsable_total),
        }

    def _ask(self, image: np.ndarray, prompt: str) -> str:
        data_url = f"data:image/{self.image_format};base64,{base64.b64encode(encode_image(image, self.image_format)).decode('ascii')}"
        request = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.rubric},
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": f"Prompt: {prompt}"}],
                },
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        url = f"{self.url}/chat/completions"
        body, _ = post_with_retries(url, json.dumps(request).encode(), self.headers, self.timeout, self.retries, self.backoff)
        try:
            return json.loads(body)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise RuntimeError(f"{url} answered without choices[0].message.content: {body[:300]!r}") from error
