"""`solray reward-server` and the `remote` reward: real Ray Serve deployments behind the HTTP front on 127.0.0.1.

One Ray and two deployments serve the whole module (a replica takes seconds to start): the tiny verifier,
and `Scripted` (tests/reward_server_helpers.py), whose calls each test finds in a log by its tag. Each test
starts its own HTTP front (ephemeral port) with the limits it checks.
"""

import base64
import json
import random
import socket
import threading
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest
import ray

from rewards import RewardError, build_reward
from rewards.remote import encode_image
from rewards.server import ServerSettings
from rollout.tiny import render
from solray.cli import build_parser, main
from solray.reward_server import deploy_reward, serve_http

PROMPTS = ["a red circle", "two squares", "a photo of a cat"]  # the last is outside the tiny world: NaN
MSGPACK, JSON = "application/msgpack", "application/json"


def images(count=3, seed=0):
    """Ground-truth renders of the two tiny-world prompts, alternating."""
    return np.stack([render(PROMPTS[i % 2], seed + i) for i in range(count)])


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """{"verifier": handle, "scripted": handle, "log": the Scripted calls log}, on a Ray of this module's own."""
    ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    log = tmp_path_factory.mktemp("scripted") / "calls.jsonl"
    log.touch()
    settings = ServerSettings(port=0, max_batch=8)
    with (
        deploy_reward("tiny_verifier", {}, settings, app_name="test-verifier") as verifier,
        deploy_reward("tests.reward_server_helpers:Scripted", {"log": str(log)}, settings, app_name="test-scripted") as scripted,
    ):
        yield {"verifier": verifier, "scripted": scripted, "log": log}
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def batching(handle, max_batch=8, batch_wait_s=0.0):
    handle.reconfigure.remote({"max_batch": max_batch, "batch_wait_s": batch_wait_s}).result()


def calls(deployed, tag):
    """Sizes of the Scripted reward's calls that held images tagged `tag`, in order."""
    rows = [json.loads(line) for line in deployed["log"].read_text().splitlines()]
    return [row["size"] for row in rows if tag in row["tags"]]


def tagged(tag, count, **extra):
    return [{"tag": tag, **extra} for _ in range(count)]


def post(url, body, content_type, headers=()):
    request = urllib.request.Request(f"{url}/score", data=body, headers={"Content-Type": content_type, **dict(headers)}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def raw(url, data, read=True, timeout=30.0):
    """Send raw bytes on a new connection; the status code of the answer (0: closed without one)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(data)
        answer = connection.recv(65536) if read else b""
    return int(answer.split()[1]) if answer.startswith(b"HTTP/1.1") else 0


def packed(**payload):
    return msgpack.packb(payload, use_bin_type=True)


def peak_rss_growth(action):
    """Bytes the peak resident memory of this process (where the HTTP front decodes) rose during `action`."""

    def peak():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) << 10 for line in status if line.startswith("VmHWM"))

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    before = peak()
    action()
    return peak() - before


@pytest.mark.parametrize("wire_format", ["msgpack", "json"])
def test_remote_scores_equal_local_scores_including_nan(deployed, wire_format):
    batch = images()
    local = build_reward("tiny_verifier").score(batch, PROMPTS)
    assert np.isnan(local[2]) and not np.isnan(local[:2]).any()
    with serve_http(deployed["verifier"], ServerSettings(port=0)) as url:
        remote = build_reward("remote", url=url, wire_format=wire_format)
        np.testing.assert_array_equal(remote.score(batch, PROMPTS), local)  # PNG is lossless
        assert remote.resources == {"num_cpus": 1.0}


def test_jpeg_images_score_close_and_health_reports_the_reward(deployed):
    batching(deployed["scripted"], max_batch=8)
    batch = images()
    with serve_http(deployed["scripted"], ServerSettings(port=0)) as url:
        jpeg = build_reward("remote", url=url, image_format="jpeg", jpeg_quality=90).score(batch, PROMPTS, tagged("jpeg", 3))
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            health = json.loads(response.read())
    np.testing.assert_allclose(jpeg, batch.mean(axis=(1, 2, 3)) / 255, atol=0.01)
    limits = {"max_request_bytes": 64 << 20, "max_request_pixels": 32 << 20}
    assert health == {"status": "ok", "reward": "scripted", "queued": 0, "max_batch": 8, **limits}


def test_concurrent_requests_are_batched_and_each_gets_its_own_scores(deployed):
    batching(deployed["scripted"], max_batch=8, batch_wait_s=30.0)  # a batch leaves when full: 4 requests of 2
    requests = [images(2, seed=10 * i) for i in range(4)]
    results = [None] * 4
    with serve_http(deployed["scripted"], ServerSettings(port=0)) as url:
        client = build_reward("remote", url=url)

        def run(i):
            results[i] = client.score(requests[i], PROMPTS[:2], tagged("concurrent", 2))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert calls(deployed, "concurrent") == [8]  # four requests of 2 images became one reward call
    for request, result in zip(requests, results):
        np.testing.assert_allclose(result, request.mean(axis=(1, 2, 3)) / 255)


def test_large_requests_are_split_into_max_batch_calls(deployed):
    batching(deployed["scripted"], max_batch=8)
    batch = images(20)
    with serve_http(deployed["scripted"], ServerSettings(port=0)) as url:
        scores = build_reward("remote", url=url).score(batch, [PROMPTS[0]] * 20, tagged("split", 20))
    assert sorted(calls(deployed, "split")) == [4, 8, 8]
    np.testing.assert_allclose(scores, batch.mean(axis=(1, 2, 3)) / 255)


def test_a_failing_request_does_not_fail_the_requests_batched_with_it(deployed):
    batching(deployed["scripted"], max_batch=8, batch_wait_s=30.0)
    outcomes = {}
    with serve_http(deployed["scripted"], ServerSettings(port=0)) as url:
        client = build_reward("remote", url=url, retries=0)

        def run(name, metadata):
            try:
                outcomes[name] = client.score(images(2), PROMPTS[:2], metadata)
            except RewardError as error:
                outcomes[name] = error

        cases = {f"good{i}": tagged("isolation", 2) for i in range(3)} | {"bad": tagged("isolation", 2, bad=True)}
        threads = [threading.Thread(target=run, args=case) for case in cases.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert calls(deployed, "isolation") == [8, 2, 2, 2, 2]  # the merged call failed: each request alone
    for i in range(3):
        np.testing.assert_allclose(outcomes[f"good{i}"], images(2).mean(axis=(1, 2, 3)) / 255)
    assert isinstance(outcomes["bad"], RewardError)
    assert "HTTP 500" in str(outcomes["bad"]) and "reward 'scripted' raised ValueError: bad metadata" in str(outcomes["bad"])


def test_client_retries_server_errors_then_succeeds(deployed):
    batching(deployed["scripted"])
    with serve_http(deployed["scripted"], ServerSettings(port=0)) as url:
        client = build_reward("remote", url=url, retries=2, backoff=0.0)
        scores = client.score(images(), PROMPTS, tagged("retry", 3, fail_first=2))
    assert calls(deployed, "retry") == [3, 3, 3] and np.isfinite(scores).all()


def test_client_gives_up_after_retries_on_timeouts_and_refused_connections(deployed):
    batching(deployed["scripted"])
    with serve_http(deployed["scripted"], ServerSettings(port=0)) as url:
        client = build_reward("remote", url=url, timeout=0.2, retries=1, backoff=0.0)
        with pytest.raises(RewardError, match=r"reward 'remote' raised RuntimeError: .*/score failed 2 times; last error: TimeoutError"):
            client.score(images(1), PROMPTS[:1], tagged("slow", 1, delay=1.0))
    with pytest.raises(RewardError, match="failed 2 times; last error: URLError"):
        build_reward("remote", url=url, retries=1, backoff=0.0).score(images(1), PROMPTS[:1])


def test_bad_requests_get_clear_4xx_errors(deployed):
    png = encode_image(images(1)[0])
    small_png = encode_image(images(1)[0][:16])
    with serve_http(deployed["verifier"], ServerSettings(port=0, max_request_bytes=2_000, max_inflight_bytes=4_000)) as url:

        def status_and_error(body, content_type=MSGPACK):
            status, answer = post(url, body, content_type)
            return status, json.loads(answer)["error"]

        b64 = base64.b64encode(png).decode()
        cases = [
            (packed(images=[png] * 40, prompts=["a"] * 40), 413, "this server accepts at most 2000"),
            (b"hello", 415, "Content-Type must be application/msgpack or application/json, got text/plain"),
            (b"\xc1", 400, "malformed application/msgpack body"),
            (packed(prompts=["a"]), 400, 'the body needs "images" and "prompts" lists'),
            (packed(images=[png, png], prompts=["a"]), 400, "2 images, 1 prompts and 2 metadata entries"),
            (packed(images=[png], prompts=["a"], metadata="x"), 400, '"metadata" must be a list of maps, got str'),
            (packed(images=[png], prompts=["a"], metadata=[7]), 400, "prompts must be strings and metadata entries maps"),
            (packed(images=[b"not an image"], prompts=["a"]), 400, "image 0: not a PNG or JPEG image"),
            (packed(images=[png[:60]], prompts=["a"]), 400, "image 0: not a PNG or JPEG image"),  # a valid header, no pixels
            (packed(images=[png, small_png], prompts=["a", "b"]), 400, "all images of a request must have one size"),
            (packed(images=[], prompts=[]), 400, "no images"),
            (packed(images=["a string"], prompts=["a"]), 400, "image 0: msgpack images must be bytes"),
            (json.dumps({"images": [png.hex()[:8] + "é"], "prompts": ["a"]}).encode(), 400, "image 0: invalid base64"),
            (json.dumps({"images": [b64[:-4] + "²²²²"], "prompts": ["a"]}).encode("utf-8"), 400, "image 0: invalid base64"),
            (json.dumps([1, 2]).encode(), 400, "the body must be a map/object"),
        ]
        for body, status, message in cases:
            content_type = JSON if body[:1] in (b"{", b"[") else (MSGPACK if status != 415 else "text/plain")
            assert status_and_error(body, content_type)[0] == status, (body[:60], status, message)
            assert message in status_and_error(body, content_type)[1]
        head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: {MSGPACK}\r\n"
        assert raw(url, (head + "Content-Length: ²\r\n\r\n").encode()) == 400
        assert raw(url, (head + "\r\n").encode()) == 411
        assert raw(url, (head + "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode()) in (400, 411)
        with pytest.raises(urllib.error.HTTPError) as not_found:
            urllib.request.urlopen(f"{url}/nowhere", timeout=10)
        assert not_found.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as wrong_method:
            urllib.request.urlopen(f"{url}/score", timeout=10)
        assert wrong_method.value.code == 405
        # the client does not retry a 4xx: it fails at once with the server's reason (retrying would take 10 + 20 + ... s)
        client = build_reward("remote", url=url, retries=5, backoff=10.0)
        with pytest.raises(RewardError, match=r"refused the request: HTTP 413: the body is \d+ bytes"):
            client.score(images(40), ["a"] * 40)


def test_a_token_guards_every_request_and_the_client_sends_it(deployed, monkeypatch):
    with serve_http(deployed["verifier"], ServerSettings(port=0, token="s3cret")) as url:
        body = packed(images=[encode_image(images(1)[0])], prompts=[PROMPTS[0]])
        assert post(url, body, MSGPACK)[0] == 401
        assert post(url, body, MSGPACK, {"Authorization": "Bearer wrong"})[0] == 401
        assert post(url, body, MSGPACK, {"Authorization": "Bearer s3cret"})[0] == 200
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"{url}/health", timeout=10)
        assert health.value.code == 401
        monkeypatch.delenv("SOLRAY_REWARD_TOKEN", raising=False)
        with pytest.raises(RewardError, match="HTTP 401"):
            build_reward("remote", url=url).score(images(1), PROMPTS[:1])
        monkeypatch.setenv("SOLRAY_REWARD_TOKEN", "s3cret")
        np.testing.assert_array_equal(build_reward("remote", url=url).score(images(1), PROMPTS[:1]), [1.0])


def test_half_sent_requests_time_out_and_do_not_block_others(deployed):
    settings = ServerSettings(port=0, header_timeout_s=0.5, read_timeout_s=0.5)
    with serve_http(deployed["verifier"], settings) as url:
        host, port = url.removeprefix("http://").split(":")
        stalled = [socket.create_connection((host, int(port)), timeout=30) for _ in range(60)]
        for i, connection in enumerate(stalled):  # half a request line, or whole headers and half a body
            connection.sendall(
                b"POST /sco" if i % 2 else f"POST /score HTTP/1.1\r\nContent-Type: {MSGPACK}\r\nContent-Length: 100\r\n\r\nab".encode()
            )
        scores = build_reward("remote", url=url).score(images(), PROMPTS)
        answers = []
        for connection in stalled:
            answers.append(int(connection.recv(4096).split()[1]))  # the server answers and closes; no timing asserted
            connection.close()
    np.testing.assert_array_equal(scores, build_reward("tiny_verifier").score(images(), PROMPTS))
    assert answers == [408] * 60


def test_an_oversized_request_head_gets_431_and_the_server_still_scores(deployed):
    with serve_http(deployed["verifier"], ServerSettings(port=0)) as url:
        # past the 64 KiB bound, the head finished or not (a header line still open, or ended with no blank line
        # after it; and a URL): the front answers without waiting for the rest
        padding = b"a" * (65 << 10)
        start = b"POST /score HTTP/1.1\r\nX-Padding: " + padding
        for head in (start, start + b"\r\n", start + b"\r\nContent-Length: 0\r\n\r\n"):  # open, unterminated, complete
            assert raw(url, head) == 431
        assert raw(url, b"POST /score?" + padding) == 431
        scores = build_reward("remote", url=url).score(images(), PROMPTS)
    np.testing.assert_array_equal(scores, build_reward("tiny_verifier").score(images(), PROMPTS))


def test_fuzzed_requests_get_4xx_limits_hold_and_valid_requests_still_score_exactly(deployed):
    """A few hundred malformed requests, the 4 x 4096^2 PNG request, then valid ones (bench/reward_server_fuzz.py: the long run)."""
    rng = random.Random(17)
    png = encode_image(images(1)[0])
    valid = packed(images=[png], prompts=[PROMPTS[0]])
    white = encode_image(np.full((4096, 4096, 3), 255, dtype=np.uint8))
    mutations = [
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))),
        lambda: valid[: rng.randrange(len(valid))],
        lambda: packed(images=[png], prompts=[rng.choice([1, None, b"x", ["a"]])]),
        lambda: packed(images=[png[: rng.randrange(len(png) - 20)]], prompts=["a"]),  # 20: the pixels are cut
        lambda: packed(images=[png], prompts=["a"], metadata=rng.choice(["m", 3, [[1]], {"a": 1}, [None]])),
        lambda: packed(images=rng.choice([{}, "x", [[png]], [None]]), prompts=["a"]),
        lambda: packed(images=[bytes(png[:16]) + bytes(rng.randrange(256) for _ in range(64))], prompts=["a"]),
    ]
    statuses = {}
    with serve_http(deployed["verifier"], ServerSettings(port=0)) as url:
        for _ in range(300):
            status, _ = post(url, rng.choice(mutations)(), MSGPACK)
            statuses[status] = statuses.get(status, 0) + 1
        bombs = packed(images=[white] * 4, prompts=["a"] * 4)
        growth = peak_rss_growth(lambda: statuses.setdefault("bombs", post(url, bombs, MSGPACK)[0]))
        scores = build_reward("remote", url=url).score(images(), PROMPTS)
    assert set(statuses) - {"bombs"} <= {400, 413} and sum(v for k, v in statuses.items() if k != "bombs") == 300
    assert len(bombs) < 1 << 20 and statuses["bombs"] == 413  # 64 Mpx in a body under 1 MiB
    assert growth < 64 << 20, f"the front's peak memory rose {growth / 2**20:.0f} MiB on a refused request"
    np.testing.assert_array_equal(scores, build_reward("tiny_verifier").score(images(), PROMPTS))


def test_nonsense_settings_are_refused_at_start_up(capsys):
    for settings, message in [
        (ServerSettings(max_batch=0), "max_batch must be >= 1, got 0"),
        (ServerSettings(max_request_bytes=-1), "max_request_bytes must be >= 1, got -1"),
        (ServerSettings(header_timeout_s=float("nan")), "header_timeout_s must be a finite number"),
        (ServerSettings(host="0.0.0.0"), "'0.0.0.0' is reachable beyond this machine: set a token"),
        (ServerSettings(token=" "), "the token is empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            settings.check()
    assert ServerSettings(host="0.0.0.0", insecure=True).check() and ServerSettings(host="0.0.0.0", token="t").check()
    for argv, message in [
        (["--max-batch", "0"], "argument --max-batch: '0' is not >= 1"),
        (["--max-request-mb", "-1"], "argument --max-request-mb: '-1' is not > 0"),
        (["--host", "0.0.0.0"], "'0.0.0.0' is reachable beyond this machine"),
    ]:
        with pytest.raises(SystemExit) as exit_code:
            main(["reward-server", "brightness", *argv])
        assert exit_code.value.code == 2 and message in capsys.readouterr().err


def test_reward_server_command_line():
    args = build_parser().parse_args(
        ["reward-server", "pickscore", "--arg", "model=/ckpt/pick", "--arg", "batch_size=16", "--port", "0", "--max-batch", "32"]
    )
    assert args.reward == "pickscore" and dict(args.arg) == {"model": "/ckpt/pick", "batch_size": 16}
    assert (args.port, args.max_batch, args.host, args.replicas) == (0, 32, "127.0.0.1", 1)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reward-server", "pickscore", "--arg", "no-equals-sign"])
