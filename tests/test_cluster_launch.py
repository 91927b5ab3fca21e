"""The documented cluster launch, tried as a new user would: `ray start --head`, then `ray job submit ...
-- solray train ...` (README, Running on a cluster). The head is started on free loopback ports in
its own temp dir and stopped by its own process ids: `ray stop` would stop every Ray on the machine."""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from solray.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports free on loopback now."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def processes_of(temp_dir: Path) -> list[psutil.Process]:
    """The processes whose command line names the head's temp dir (gcs, raylet, dashboard, workers, ...)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def stop_head(temp_dir: Path) -> None:
    processes = processes_of(temp_dir)
    for process in processes:
        process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=30)
    for process in alive:
        process.kill()


@pytest.mark.slow
def test_ray_job_submit_runs_the_tiny_recipe_on_a_started_head(tmp_path):
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    gcs, dashboard, client, agent, runtime_env, metrics = free_ports(6)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
    }
    start = [
        *RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}", "--num-cpus=4", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    try:
        subprocess.run(start, check=True, capture_output=True, text=True, timeout=300, env=env)
        out = tmp_path / "run"
        solray = str(Path(sys.executable).with_name("solray"))  # the console script the install put beside python
        job = subprocess.run(
            [*RAY, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT), "--",
             solray, "train", "recipes/tiny_nft.yaml", "run.steps=2", "eval.enabled=false", "logging.grid_every=0", f"run.output_dir={out}"],
            capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
        )  # fmt: skip
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]
        assert [row["step"] for row in read_metrics(out / "metrics.jsonl")] == [0, 1]
        assert (out / "checkpoints" / "step_000002").is_dir()
    finally:
        stop_head(temp_dir)
    assert processes_of(temp_dir) == []
