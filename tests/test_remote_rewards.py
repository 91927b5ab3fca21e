"""`solray reward-server` and the `remote` reward: the real server on 127.0.0.1 (ephemeral port, threads)."""

import base64
import json
import threading
import time
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest

from rewards import Reward, RewardError, build_reward
from rewards.remote import encode_image
from rewards.server import RewardServer
from rollout.tiny import render
from solray.cli import build_parser

PROMPTS = ["a red circle", "two squares", "a photo of a cat"]  # the last is outside the tiny world: NaN


def images(count=3, seed=0):
    """Ground-truth renders of the two tiny-world prompts, alternating."""
    return np.stack([render(PROMPTS[i % 2], seed + i) for i in range(count)])


class Recording(Reward):
    """Mean pixel value, recording the size of every batch it scores; can be gated or made to fail."""

    name = "recording"

    def __init__(self, failures=0, delay=0.0):
        self.batches, self.failures, self.delay = [], failures, delay
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def __call__(self, images, prompts, metadata):
        self.entered.set()
        self.gate.wait()
        time.sleep(self.delay)
        self.batches.append(len(images))
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("transient failure")
        if any(m.get("bad") for m in metadata):
            raise ValueError("bad metadata")
        return images.mean(axis=(1, 2, 3)) / 255


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def post(url, body, content_type):
    request = urllib.request.Request(f"{url}/score", data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get_content_type(), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get_content_type(), error.read()


@pytest.mark.parametrize("wire_format", ["msgpack", "json"])
def test_remote_scores_equal_local_scores_including_nan(wire_format):
    batch = images()
    local = build_reward("tiny_verifier").score(batch, PROMPTS)
    assert np.isnan(local[2]) and not np.isnan(local[:2]).any()
    with RewardServer(build_reward("tiny_verifier"), port=0) as server:
        remote = build_reward("remote", url=server.url, wire_format=wire_format)
        np.testing.assert_array_equal(remote.score(batch, PROMPTS), local)  # PNG is lossless
        assert remote.resources == {"num_cpus": 1.0}


def test_jpeg_images_score_close_and_health_reports_the_reward():
    batch = images()
    local = build_reward("brightness").score(batch, PROMPTS)
    with RewardServer(build_reward("brightness"), port=0, max_batch=16) as server:
        jpeg = build_reward("remote", url=server.url, image_format="jpeg", jpeg_quality=90).score(batch, PROMPTS)
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as response:
            health = json.loads(response.read())
    np.testing.assert_allclose(jpeg, local, atol=0.01)
    assert health == {"status": "ok", "reward": "brightness", "queued": 0, "max_batch": 16, "max_request_bytes": 64 << 20}


def test_concurrent_requests_are_batched_and_each_gets_its_own_scores():
    reward = Recording()
    reward.gate.clear()
    with RewardServer(reward, port=0, max_batch=8, batch_wait=0.0) as server:
        client = build_reward("remote", url=server.url)
        requests = [images(2, seed=10 * i) for i in range(5)]
        results = [None] * 5

        def run(i):
            results[i] = client.score(requests[i], PROMPTS[:2])

        threads = [threading.Thread(target=run, args=(0,))]
        threads[0].start()
        assert reward.entered.wait(10)  # the first request is being scored: the others queue behind it
        threads += [threading.Thread(target=run, args=(i,)) for i in range(1, 5)]
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: server.queued == 4)
        reward.gate.set()
        for thread in threads:
            thread.join(10)
    assert reward.batches == [2, 8]  # four queued requests of 2 images became one reward call
    for request, result in zip(requests, results):
        np.testing.assert_allclose(result, request.mean(axis=(1, 2, 3)) / 255)


def test_large_requests_are_split_into_max_batch_calls():
    reward = Recording()
    batch = images(20)
    with RewardServer(reward, port=0, max_batch=8) as server:
        scores = build_reward("remote", url=server.url).score(batch, [PROMPTS[0]] * 20)
    assert sorted(reward.batches) == [4, 8, 8] and max(reward.batches) <= 8
    np.testing.assert_allclose(scores, batch.mean(axis=(1, 2, 3)) / 255)


def test_a_failing_request_does_not_fail_the_requests_batched_with_it():
    reward = Recording()
    reward.gate.clear()
    with RewardServer(reward, port=0, max_batch=8, batch_wait=0.0) as server:
        client = build_reward("remote", url=server.url, retries=0)
        outcomes = {}

        def run(name, metadata):
            try:
                outcomes[name] = client.score(images(2), PROMPTS[:2], metadata)
            except RewardError as error:
                outcomes[name] = error

        first = threading.Thread(target=run, args=("first", None))
        first.start()
        assert reward.entered.wait(10)
        others = [threading.Thread(target=run, args=("good", None)), threading.Thread(target=run, args=("bad", [{"bad": True}, {}]))]
        for thread in others:
            thread.start()
        wait_until(lambda: server.queued == 2)
        reward.gate.set()
        for thread in [first, *others]:
            thread.join(10)
    assert isinstance(outcomes["good"], np.ndarray) and len(outcomes["good"]) == 2
    assert isinstance(outcomes["bad"], RewardError)
    assert "HTTP 500" in str(outcomes["bad"]) and "reward 'recording' raised ValueError: bad metadata" in str(outcomes["bad"])


def test_client_retries_server_errors_then_succeeds():
    reward = Recording(failures=2)
    with RewardServer(reward, port=0) as server:
        scores = build_reward("remote", url=server.url, retries=2, backoff=0.0).score(images(), PROMPTS)
    assert len(reward.batches) == 3 and np.isfinite(scores).all()


def test_client_gives_up_after_retries_on_timeouts_and_refused_connections():
    with RewardServer(Recording(delay=1.0), port=0) as server:
        client = build_reward("remote", url=server.url, timeout=0.2, retries=1, backoff=0.0)
        with pytest.raises(RewardError, match=r"reward 'remote' raised RuntimeError: .*/score failed 2 times; last error: TimeoutError"):
            client.score(images(1), PROMPTS[:1])
        url = server.url
    with pytest.raises(RewardError, match="failed 2 times; last error: URLError"):
        build_reward("remote", url=url, retries=1, backoff=0.0).score(images(1), PROMPTS[:1])


def test_bad_requests_get_clear_4xx_errors():
    png = encode_image(images(1)[0])
    small_png = encode_image(images(1)[0][:16])
    with RewardServer(build_reward("brightness"), port=0, max_request_bytes=2_000) as server:
        url = server.url

        def status_and_error(body, content_type="application/msgpack"):
            status, _, answer = post(url, body, content_type)
            return status, json.loads(answer)["error"]

        def packed(**payload):
            return msgpack.packb(payload, use_bin_type=True)

        cases = [
            (packed(images=[png] * 40, prompts=["a"] * 40), 413, "this server accepts at most 2000"),
            (b"hello", 415, "Content-Type must be application/msgpack or application/json, got text/plain"),
            (b"\xc1", 400, "malformed application/msgpack body"),
            (packed(prompts=["a"]), 400, 'the body needs "images" and "prompts" lists'),
            (packed(images=[png, png], prompts=["a"]), 400, "2 images, 1 prompts and 2 metadata entries"),
            (packed(images=[b"not an image"], prompts=["a"]), 400, "image 0: not a PNG or JPEG image"),
            (packed(images=[png, small_png], prompts=["a", "b"]), 400, "all images of a request must have one size"),
            (json.dumps({"images": ["%%%"], "prompts": ["a"]}).encode(), 400, "image 0: invalid base64"),
            (json.dumps({"images": [base64.b64encode(png).decode()], "prompts": [3]}).encode(), 400, "prompts must be strings"),
        ]
        for body, status, message in cases:
            content_type = "text/plain" if body == b"hello" else "application/json" if body.startswith(b"{") else "application/msgpack"
            got_status, error = status_and_error(body, content_type)
            assert (got_status, message in error) == (status, True), (status, message, got_status, error)
        request = urllib.request.Request(f"{url}/nowhere", method="GET")
        with pytest.raises(urllib.error.HTTPError) as not_found:
            urllib.request.urlopen(request, timeout=10)
        assert not_found.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as wrong_method:
            urllib.request.urlopen(f"{url}/score", timeout=10)
        assert wrong_method.value.code == 405
        # the client does not retry a 4xx: it fails at once with the server's reason
        client = build_reward("remote", url=url, retries=5, backoff=10.0)
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"refused the request: HTTP 413: the body is \d+ bytes"):
            client.score(images(40), ["a"] * 40)
        assert time.monotonic() - start < 5


def test_reward_server_command_line():
    args = build_parser().parse_args(
        ["reward-server", "pickscore", "--arg", "model=/ckpt/pick", "--arg", "batch_size=16", "--port", "0", "--max-batch", "32"]
    )
    assert args.reward == "pickscore" and dict(args.arg) == {"model": "/ckpt/pick", "batch_size": 16}
    assert (args.port, args.max_batch, args.host) == (0, 32, "127.0.0.1")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reward-server", "pickscore", "--arg", "no-equals-sign"])
