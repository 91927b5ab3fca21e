"""The reward server under fuzzing and load: status counts, memory and latency tails, as JSON.

The long version of tests/test_remote_rewards.py's fuzz test. One Ray Serve deployment of the tiny
verifier behind the HTTP front with its default limits (rewards.server.ServerSettings), in this process:
  malformed   random malformed /score bodies -> counts per status (all must be 4xx)
  bombs       4 white 4096x4096 PNGs in one request (64 Mpx) and 40 in one (the findings) -> status, peak RSS rise
  stalled     60 connections sending half a request, then a valid request -> its answer, what the 60 got
  load        200 and 500 concurrent clients, each a new connection per request -> p50 / p99 latency, statuses
  exact       valid requests after all that score exactly as the reward in-process

    python bench/reward_server_fuzz.py [--malformed 2000] [--clients 200 500] [--requests-per-client 4]

Wall-clock figures hold only on an otherwise idle machine; the JSON records the load average around the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import time
from pathlib import Path

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards import build_reward  # noqa: E402
from rewards.remote import MSGPACK, encode_image  # noqa: E402
from rewards.server import ServerSettings  # noqa: E402
from rollout.tiny import render  # noqa: E402
from solray.reward_server import deploy_reward, serve_http  # noqa: E402

PROMPTS = ["a red circle", "two squares", "a photo of a cat"]
RESULTS = Path(__file__).resolve().parent / "results" / "reward_server_fuzz.json"


def packed(**payload) -> bytes:
    return msgpack.packb(payload, use_bin_type=True)


def request_bytes(body: bytes, content_type: str = MSGPACK) -> bytes:
    head = (
        f"POST /score HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def send(host: str, port: int, data: bytes, timeout: float = 120.0) -> tuple[int, float]:
    """(status, seconds) of one request on a new connection; status 0: no answer (reset, closed or timed out)."""
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)
        writer.close()
        status = int(answer.split()[1]) if answer.startswith(b"HTTP/1.1") else 0
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        status = 0
    return status, time.perf_counter() - start


def counts(statuses) -> dict[str, int]:
    found: dict[str, int] = {}
    for status in statuses:
        found[str(status)] = found.get(str(status), 0) + 1
    return dict(sorted(found.items()))


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("VmHWM"))


def reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return peak_rss()


def malformed_bodies(rng: random.Random, count: int) -> list[bytes]:
    png = encode_image(render(PROMPTS[0], 0))
    valid = packed(images=[png], prompts=[PROMPTS[0]])
    makers = [
        lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))),
        lambda: valid[: rng.randrange(len(valid))],
        lambda: packed(images=[png], prompts=[rng.choice([1, None, b"x", ["a"]])]),
        lambda: packed(images=[png[: rng.randrange(len(png) - 20)]], prompts=["a"]),
        lambda: packed(images=[png], prompts=["a"], metadata=rng.choice(["m", 3, [[1]], {"a": 1}, [None]])),
        lambda: packed(images=rng.choice([{}, "x", [[png]], [None]]), prompts=["a"]),
        lambda: json.dumps({"images": ["ab²="], "prompts": ["a"]}).encode(),
    ]
    return [rng.choice(makers)() for _ in range(count)]


async def run(url: str, args: argparse.Namespace) -> dict:
    host, port = url.removeprefix("http://").split(":")
    port = int(port)
    rng = random.Random(17)
    report: dict = {}

    bodies = malformed_bodies(rng, args.malformed)
    statuses = []
    for body in bodies:
        content_type = "application/json" if body[:1] == b"{" else MSGPACK
        statuses.append((await send(host, port, request_bytes(body, content_type)))[0])
    raw_heads = [b"POST /score HTTP/1.1\r\nContent-Type: application/msgpack\r\nContent-Length: \xc2\xb2\r\n\r\n"] * 50
    statuses += [(await send(host, port, head))[0] for head in raw_heads]
    report["malformed"] = {"requests": len(statuses), "statuses": counts(statuses)}

    white = encode_image(np.full((4096, 4096, 3), 255, dtype=np.uint8))
    for name, count in (("4_white_4096_pngs", 4), ("40_white_4096_pngs", 40)):
        body = packed(images=[white] * count, prompts=["a"] * count)
        before = reset_peak()
        status, seconds = await send(host, port, request_bytes(body))
        report[name] = {
            "body_mb": round(len(body) / 2**20, 3),
            "status": status,
            "peak_rss_rise_mb": round((peak_rss() - before) / 2**20, 1),
        }

    stalled = []
    for i in range(60):
        connection = socket.create_connection((host, port))
        connection.sendall(
            b"POST /sco" if i % 2 else b"POST /score HTTP/1.1\r\nContent-Type: application/msgpack\r\nContent-Length: 100\r\n\r\nab"
        )
        stalled.append(connection)
    valid = packed(images=[encode_image(render(PROMPTS[0], 0))], prompts=[PROMPTS[0]])
    status, seconds = await send(host, port, request_bytes(valid))
    answers = []
    for connection in stalled:
        connection.settimeout(60)
        data = connection.recv(4096)
        answers.append(int(data.split()[1]) if data.startswith(b"HTTP/1.1") else 0)
        connection.close()
    report["stalled"] = {
        "connections": 60,
        "valid_request_status": status,
        "valid_request_s": round(seconds, 3),
        "stalled_got": counts(answers),
    }

    for clients in args.clients:
        before = reset_peak()
        start = time.perf_counter()

        async def client(i: int) -> list[tuple[int, float]]:
            return [await send(host, port, request_bytes(valid)) for _ in range(args.requests_per_client)]

        results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - start
        latencies = np.array([seconds for status, seconds in results if status == 200])
        report[f"load_{clients}_clients"] = {
            "requests": len(results),
            "statuses": counts(status for status, _ in results),
            "p50_s": round(float(np.percentile(latencies, 50)), 3) if len(latencies) else None,
            "p99_s": round(float(np.percentile(latencies, 99)), 3) if len(latencies) else None,
            "max_s": round(float(latencies.max()), 3) if len(latencies) else None,
            "requests_per_s": round(len(results) / wall, 1),
            "peak_rss_rise_mb": round((peak_rss() - before) / 2**20, 1),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--malformed", type=int, default=2000)
    parser.add_argument("--clients", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--requests-per-client", type=int, default=4)
    args = parser.parse_args()
    import ray

    load_before = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    settings = ServerSettings(port=0, max_connections=1024)
    batch = np.stack([render(PROMPTS[i % 2], i) for i in range(3)])
    with deploy_reward("tiny_verifier", {}, settings, app_name="bench-verifier") as handle, serve_http(handle, settings) as url:
        rss_start = peak_rss()
        report = asyncio.run(run(url, args))
        remote = build_reward("remote", url=url).score(batch, PROMPTS)
    local = build_reward("tiny_verifier").score(batch, PROMPTS)
    report["exact_after"] = bool(np.array_equal(remote, local, equal_nan=True))
    report["front_rss_mb_at_start"] = round(rss_start / 2**20, 1)
    report["settings"] = {
        "max_connections": settings.max_connections,
        "backlog": settings.backlog,
        "max_request_pixels": settings.max_request_pixels,
    }
    report["machine"] = {
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": "shared machine: other jobs ran during this run, and the load clients share this process (and its GIL) with the HTTP front, so the latencies are upper bounds, not figures to compare",
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
