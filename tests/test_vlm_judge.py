"""The `vlm_judge` reward against a fake OpenAI-compatible server on 127.0.0.1 (vLLM cannot run here).

The fake implements the two endpoints the judge uses, GET /v1/models and POST /v1/chat/completions,
answers with a canned text chosen by the prompt, and records every request it receives.
"""

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from rewards import RewardError, build_reward
from rewards.server import ServerSettings
from rewards.vlm_judge import DEFAULT_RUBRIC, parse_score

ANSWERS = {
    "a red circle": "Score: 7/10. The circle is red but slightly off-centre.",
    "two squares": '{"score": 9, "reason": "two clear squares"}',
    "a blue cross": "I cannot judge this image.",
    "three crosses": "Rating: 4 out of 5",
}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Score: 7/10", 0.7),
        ("**Score**: 6\nThe colours are right.", 0.6),
        ("score = 7.5", 0.75),
        ("Rating: 8 out of 10", 0.8),
        ("Score: 4/5", 0.8),
        ('Sure! {"score": 3, "reason": "wrong count"}', 0.3),
        ('{"Score": 10}', 1.0),
        ("I'd give it 9/10 overall.", 0.9),
        ("The image deserves a score of 8 because it matches.", 0.8),
        ("8", 0.8),
        (" 6.5. ", 0.65),
        ("Score: 12/10", None),
        ("Score: -3", None),
        ("The image shows 3 cats on a mat.", None),
        ("I cannot judge this image.", None),
        ("", None),
    ],
)
def test_parse_score(answer, expected):
    assert parse_score(answer) == (None if expected is None else pytest.approx(expected))


class FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/models and /v1/chat/completions; fails the first `server.failures` completions with 503."""

    def do_GET(self):
        assert self.path == "/v1/models"
        self._json(200, {"object": "list", "data": [{"id": "fake-vlm", "object": "model"}]})

    def do_POST(self):
        assert self.path == "/v1/chat/completions"
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append(request | {"authorization": self.headers.get("Authorization")})
            failing = self.server.failures > 0
            self.server.failures -= failing
        if failing:
            self._json(503, {"error": {"message": "model is loading"}})
            return
        prompt = request["messages"][1]["content"][1]["text"].removeprefix("Prompt: ")
        self._json(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWERS[prompt]}}],
            },
        )

    def _json(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_vllm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    server.requests, server.failures, server.lock = [], 0, threading.Lock()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def images(count=4):
    return np.random.default_rng(0).integers(0, 256, size=(count, 16, 16, 3), dtype=np.uint8)


def test_judge_scores_parses_and_counts_unparsable_answers(fake_vllm):
    url = f"http://127.0.0.1:{fake_vllm.server_address[1]}/v1"
    judge = build_reward("vlm_judge", url=url, api_key="secret", max_tokens=32)
    prompts = list(ANSWERS)
    scores = judge.score(images(), prompts)
    np.testing.assert_allclose(scores, [0.7, 0.9, np.nan, 0.8])
    assert judge.metrics() == {"reward/vlm_judge/unparsable": 1.0, "reward/vlm_judge/unparsable_total": 1.0}
    judge.score(images(2), prompts[2:4])
    assert judge.metrics() == {"reward/vlm_judge/unparsable": 1.0, "reward/vlm_judge/unparsable_total": 2.0}
    assert judge.last_answers == [ANSWERS["a blue cross"], ANSWERS["three crosses"]]

    sent = {}  # prompt -> the image sent with it (requests arrive in any order: concurrency 16)
    for request in fake_vllm.requests[:4]:
        assert request["model"] == "fake-vlm"  # asked from /v1/models
        assert (request["temperature"], request["max_tokens"], request["authorization"]) == (0.0, 32, "Bearer secret")
        system, user = request["messages"]
        assert system == {"role": "system", "content": DEFAULT_RUBRIC} and user["role"] == "user"
        image_part, text_part = user["content"]
        header, data = image_part["image_url"]["url"].split(",", 1)
        assert image_part["type"] == "image_url" and header == "data:image/png;base64" and text_part["type"] == "text"
        sent[text_part["text"].removeprefix("Prompt: ")] = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
    for image, prompt in zip(images(), prompts):
        assert np.array_equal(sent[prompt], image)  # each image went out with its prompt, losslessly


def test_judge_reads_its_api_key_from_the_environment_variable_api_key_env_names(fake_vllm, monkeypatch):
    url = f"http://127.0.0.1:{fake_vllm.server_address[1]}/v1"
    monkeypatch.setenv("SOLRAY_VLM_API_KEY", "from-default-env")
    monkeypatch.setenv("MY_JUDGE_KEY", "from-my-env")
    monkeypatch.delenv("UNSET_JUDGE_KEY", raising=False)
    for kwargs, expected in [
        ({}, "Bearer from-default-env"),
        ({"api_key_env": "MY_JUDGE_KEY"}, "Bearer from-my-env"),
        ({"api_key": "given", "api_key_env": "MY_JUDGE_KEY"}, "Bearer given"),
        ({"api_key_env": "UNSET_JUDGE_KEY"}, None),
    ]:
        build_reward("vlm_judge", url=url, model="m", concurrency=1, **kwargs).score(images(1), ["three crosses"])
        assert fake_vllm.requests[-1]["authorization"] == expected


def test_judge_uses_a_custom_rubric_and_retries_a_loading_server(fake_vllm):
    url = f"http://127.0.0.1:{fake_vllm.server_address[1]}/v1"
    fake_vllm.failures = 2
    judge = build_reward("vlm_judge", url=url, model="my-judge", rubric="Rate 0-5.", max_score=5, retries=2, backoff=0.0, concurrency=1)
    assert judge.score(images(1), ["three crosses"])[0] == pytest.approx(0.8)
    assert len(fake_vllm.requests) == 3 and fake_vllm.requests[-1]["model"] == "my-judge"
    assert fake_vllm.requests[-1]["messages"][0]["content"] == "Rate 0-5."
    fake_vllm.failures = 5
    with pytest.raises(
        RewardError, match=r"reward 'vlm_judge' raised RuntimeError: .*failed 3 times; last error: HTTP 503: model is loading"
    ):
        judge.score(images(1), ["three crosses"])


def test_judge_served_by_the_reward_server(fake_vllm):
    """The judge behind `solray reward-server` (a Ray Serve replica), called through the `remote` reward: NaN survives both hops."""
    import ray
    from ray import serve

    from solray.reward_server import deploy_reward, serve_http

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    judge = {"url": f"http://127.0.0.1:{fake_vllm.server_address[1]}/v1"}
    try:
        settings = ServerSettings(port=0)
        with deploy_reward("vlm_judge", judge, settings, app_name="test-vlm-judge") as handle, serve_http(handle, settings) as url:
            for wire_format in ("msgpack", "json"):
                scores = build_reward("remote", url=url, wire_format=wire_format).score(images(), list(ANSWERS))
                np.testing.assert_allclose(scores, [0.7, 0.9, np.nan, 0.8])
    finally:
        serve.shutdown()
        ray.shutdown()
