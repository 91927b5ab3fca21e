import logging
import sys
import uuid

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
    overrides = [
        "run.steps=1", f"run.output_dir={output_dir}", "sol.enabled=false", "algorithm.prompts_per_step=2", "algorithm.group_size=4",
        "cluster.rollout_workers=0", "cluster.reward_workers=0", "cluster.remote_learners=false", "eval.enabled=false",
        "logging.wandb=offline", "logging.grid_every=0", "logging.progress=false",
        f"rewards.models=[{{name: tiny_alignment}}, {{name: 'secret_plugin:KeyedReward', weight: 0, kwargs: {{api_key: {secret}, label: {marker}}}}}]",
    ]  # fmt: skip
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
