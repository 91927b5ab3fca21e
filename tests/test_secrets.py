import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from solray.cli import main

PLUGIN = """
import numpy as np
from rewards import Reward

class KeyedReward(Reward):
    name = "keyed"
    received = []  # the api_key of every instance built: the test's proof that the secret reached the reward

    def __init__(self, api_key, label):
        self.received.append(api_key)

    def __call__(self, images, prompts, metadata):
        return np.zeros(len(images))
"""


def keyed_run(output_dir, plugin: str, secret: str, marker: str, reward_workers: int, wandb: str) -> list[str]:
    """Overrides of a 1-step baseline run whose second reward, `plugin`:KeyedReward (weight 0), gets the secret as api_key."""
    return [
        "run.steps=1", f"run.output_dir={output_dir}", "sol.enabled=false", "algorithm.prompts_per_step=2", "algorithm.group_size=4",
        "cluster.rollout_workers=0", f"cluster.reward_workers={reward_workers}", "cluster.remote_learners=false", "eval.enabled=false",
        f"logging.wandb={wandb}", "logging.grid_every=0", "logging.progress=false",
        f"rewards.models=[{{name: tiny_alignment}}, {{name: '{plugin}:KeyedReward', weight: 0, kwargs: {{api_key: {secret}, label: {marker}}}}}]",
    ]  # fmt: skip


def _files_holding(root, text: str) -> list[str]:
    """Every file under root whose bytes contain text (binary files too: W&B's .wandb log is protobuf)."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and text.encode() in path.read_bytes())


@pytest.mark.slow
def test_a_reward_api_key_in_the_recipe_reaches_the_reward_but_no_file_wandb_or_log(tmp_path, monkeypatch, capsys, caplog):
    secret, marker = f"sk-planted-{uuid.uuid4().hex}", f"visible-{uuid.uuid4().hex}"
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "secret_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(plugins))
    wandb_dir = tmp_path / "wandb_dir"
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(wandb_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    caplog.set_level(logging.DEBUG)
    output_dir = tmp_path / "run"
    overrides = keyed_run(output_dir, "secret_plugin", secret, marker, reward_workers=0, wandb="offline")
    try:
        main(["train", "recipes/tiny_solrl.yaml", *overrides])
        received = sys.modules["secret_plugin"].KeyedReward.received
    finally:
        sys.modules.pop("secret_plugin", None)

    assert received == [secret]  # the reward was built with the key
    # The non-secret kwarg next to the key is kept in the recipe dumps, so the search does reach them: the checkpoint,
    # W&B's debug log and its run record (the offline .wandb file, which `wandb sync` uploads).
    written = _files_holding(output_dir, marker)
    assert {"checkpoints/step_000001/state.json", "wandb/debug.log"} <= set(written) and any(p.endswith(".wandb") for p in written)
    assert _files_holding(output_dir, secret) == [] and _files_holding(wandb_dir, secret) == []
    out = capsys.readouterr()
    assert secret not in out.out + out.err + caplog.text
    # A resume compares the recipe with the redacted dump: the key does not count as a change.
    assert "1 steps done" in out.out
    main(["train", "recipes/tiny_solrl.yaml", *[o.replace("run.steps=1", "run.steps=2") for o in overrides]])
    assert "2 steps done" in capsys.readouterr().out


REMOTE_PLUGIN = """
import hashlib
import numpy as np
from rewards import Reward

class KeyedReward(Reward):
    name = "keyed"

    def __init__(self, api_key, label):
        # to the Ray worker's log: the key's digest (proof that it arrived) and the label (proof the search reads those logs)
        print("received", hashlib.sha256(api_key.encode()).hexdigest(), label, flush=True)

    def __call__(self, images, prompts, metadata):
        return np.zeros(len(images))
"""


@pytest.mark.slow
def test_a_reward_api_key_reaches_a_remote_reward_worker_but_no_ray_log(tmp_path):
    secret, marker = f"sk-planted-{uuid.uuid4().hex}", f"visible-{uuid.uuid4().hex}"
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "remote_secret_plugin.py").write_text(REMOTE_PLUGIN)
    ray_root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    output_dir = tmp_path / "run"
    overrides = keyed_run(output_dir, "remote_secret_plugin", secret, marker, reward_workers=1, wandb="disabled")
    # A fresh process starts its own Ray under RAY_TMPDIR, whose session logs (raylet, GCS, every worker's output) are then searched.
    env = os.environ | {"PYTHONPATH": str(plugins), "RAY_TMPDIR": str(ray_root), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "solray.cli", "train", "recipes/tiny_solrl.yaml", *overrides],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        logs = [path for path in ray_root.rglob("*") if path.is_file() and "/logs/" in str(path)]
        digest = hashlib.sha256(secret.encode()).hexdigest()
        assert any(f"received {digest} {marker}".encode() in path.read_bytes() for path in logs)
        assert _files_holding(ray_root, secret) == [] and _files_holding(output_dir, secret) == []
        assert secret not in done.stdout + done.stderr
    finally:
        shutil.rmtree(ray_root, ignore_errors=True)
