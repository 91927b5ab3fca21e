"""Checkpoints: what a run needs to continue as if it had never stopped, as safetensors + JSON (no pickle).

output_dir/checkpoints/step_000010/    10 iterations done: a resumed run continues at step 10
  lora/pytorch_lora_weights.safetensors  the "policy" adapter in diffusers' LoRA format (keys
  lora/adapter_config.json                "transformer.<module>.lora_A.weight", the LoraConfig in the
                                          safetensors metadata too): pipe.load_lora_weights("…/lora")
  old_lora/...                            the "old" adapter (DiffusionNFT's soft-updated sampling policy), same format
  ema_lora/...                            the EMA of the "policy" adapter (rl.ema): what evaluation samples with
  trainer.safetensors                     each learner's trainer-state tensors (AdamW moments or their ZeRO
                                          shard, balancer weights and norms, the EMA), keyed "<rank>/…"
  state.json                              step, weights version, the recipe, the base transformer's fingerprint,
                                          and the trainer states without their tensors

The data position is the step: prompts and seeds are pure functions of (run seed, step).
A checkpoint is written into a hidden temp dir, fsynced and renamed into place (an atomic rename),
so a kill mid-save leaves the earlier checkpoints intact; only then are the oldest pruned.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rl.config import Recipe, RecipeError
from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER, Policy

CHECKPOINTS = "checkpoints"
ADAPTER_DIRS = {TRAINABLE_ADAPTER: "lora", OLD_ADAPTER: "old_lora"}
EMA_LORA_DIR = "ema_lora"  # written for sampling (solray sample --lora .../ema_lora); a resume reads the EMA from trainer state
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' loaders look for
LORA_PREFIX = "transformer"  # pipelines route keys with this prefix to pipe.transformer
LORA_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the LoraConfig in the safetensors header
_STEP_DIR = re.compile(r"step_(\d+)")
_TEMP_PREFIX = ".tmp-"


# --- base weights -----------------------------------------------------------------------------------


@torch.no_grad()
def weights_fingerprint(module: torch.nn.Module, values_per_tensor: int = 4096) -> str:
    """Hex digest of every tensor's name, shape and up to `values_per_tensor` evenly strided values rounded to bf16.

    What a resume checks the base model against: reading a few thousand values per tensor costs little
    even for a 12B transformer, and re-trained weights differ nearly everywhere. The bf16 rounding
    makes fp32 and bf16 loads of the same files agree.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        values = flat[:: max(1, flat.numel() // values_per_tensor)][:values_per_tensor]
        if values.is_floating_point():
            values = values.to(torch.bfloat16).view(torch.int16)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(values.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# --- LoRA adapters ----------------------------------------------------------------------------------


def adapter_state_dict(policy: Policy, adapter: str) -> dict[str, torch.Tensor]:
    """An adapter's weights under peft's keys (the adapter name dropped: "….lora_A.weight")."""
    return {name.replace(f".{adapter}.", "."): p.detach().cpu().clone() for name, p in policy.adapter_parameters(adapter).items()}


@torch.no_grad()
def load_adapter_state_dict(policy: Policy, adapter: str, state: dict[str, torch.Tensor]) -> None:
    """Copy peft-keyed weights into an existing adapter; every key must match in name and shape."""
    params = {name.replace(f".{adapter}.", "."): p for name, p in policy.adapter_parameters(adapter).items()}
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"adapter {adapter!r} does not match the checkpoint: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, param in params.items():
        if param.shape != state[key].shape:
            raise ValueError(f"adapter {adapter!r}: {key} is {tuple(param.shape)}, the checkpoint holds {tuple(state[key].shape)}")
        param.copy_(state[key])


def lora_config(policy: Policy, adapter: str) -> dict[str, Any]:
    """The adapter's peft LoraConfig as JSON-able values (sets become sorted lists)."""
    config = policy.transformer.peft_config[adapter].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_lora(weights: dict[str, torch.Tensor], config: dict[str, Any], directory: Path) -> None:
    """Write one adapter as diffusers saves a pipeline's transformer LoRA, plus peft's adapter_config.json."""
    directory.mkdir(parents=True)
    metadata = {f"{LORA_PREFIX}.{k}": v for k, v in config.items()}
    header = {"format": "pt", LORA_METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    save_file({f"{LORA_PREFIX}.{k}": v.contiguous() for k, v in weights.items()}, directory / LORA_WEIGHTS, metadata=header)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_lora(directory: str | Path) -> dict[str, torch.Tensor]:
    """An adapter written by save_lora, under peft's keys (for load_adapter_state_dict)."""
    weights = load_file(Path(directory) / LORA_WEIGHTS)
    return {k.removeprefix(f"{LORA_PREFIX}."): v for k, v in weights.items()}


def attach_lora(policy: Policy, directory: str | Path) -> None:
    """Attach a LoRA written by save_lora (a checkpoint directory, or its lora/ or old_lora/) as the
    policy's trainable adapter (active) and its old copy."""
    directory = Path(directory)
    if (directory / ADAPTER_DIRS[TRAINABLE_ADAPTER] / LORA_WEIGHTS).is_file():
        directory = directory / ADAPTER_DIRS[TRAINABLE_ADAPTER]
    if not (directory / LORA_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{directory} holds no {LORA_WEIGHTS}: pass a checkpoint directory (checkpoints/step_N) or its lora/ folder"
        )
    config = json.loads((directory / "adapter_config.json").read_text())
    policy.add_lora(rank=config["r"], alpha=config["lora_alpha"])
    load_adapter_state_dict(policy, TRAINABLE_ADAPTER, load_lora(directory))
    policy.copy_adapter(TRAINABLE_ADAPTER, OLD_ADAPTER)


# --- nested state <-> tensors + JSON ----------------------------------------------------------------


def split_tensors(tree: Any, path: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """A nested state -> (JSON-able skeleton, flat tensors keyed by their path).

    A tensor becomes {"tensor": path}; a dict with non-string keys (torch optimizer state is keyed by
    parameter index) becomes {"items": [[key, value], ...]}; tuples become lists.
    """
    if isinstance(tree, torch.Tensor):
        return {"tensor": path}, {path: tree.detach().cpu().contiguous().clone()}
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(tree, dict):
        parts = {}
        for key, value in tree.items():
            parts[key], found = split_tensors(value, f"{path}/{key}" if path else str(key))
            tensors |= found
        if all(isinstance(key, str) for key in parts):
            if parts.keys() & {"tensor", "items"}:
                raise ValueError(f"state at {path!r} uses a reserved key ('tensor' or 'items')")
            return parts, tensors
        return {"items": [[key, value] for key, value in parts.items()]}, tensors
    if isinstance(tree, (list, tuple)):
        items = []
        for i, value in enumerate(tree):
            skeleton, found = split_tensors(value, f"{path}/{i}")
            items.append(skeleton)
            tensors |= found
        return items, tensors
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree, tensors
    raise TypeError(f"state at {path!r} is a {type(tree).__name__}: checkpoints hold tensors, dicts, lists and JSON scalars")


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of split_tensors."""
    if isinstance(skeleton, dict):
        if skeleton.keys() == {"tensor"}:
            return tensors[skeleton["tensor"]]
        if skeleton.keys() == {"items"}:
            return {key: join_tensors(value, tensors) for key, value in skeleton["items"]}
        return {key: join_tensors(value, tensors) for key, value in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(value, tensors) for value in skeleton]
    return skeleton


# --- checkpoint directories -------------------------------------------------------------------------


def checkpoint_steps(root: str | Path) -> dict[int, Path]:
    """Complete checkpoints under root by step; temp dirs of unfinished saves are not among them."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {int(match[1]): path for path in root.iterdir() if path.is_dir() and (match := _STEP_DIR.fullmatch(path.name))}


def latest_checkpoint(root: str | Path) -> Path | None:
    steps = checkpoint_steps(root)
    return steps[max(steps)] if steps else None


def save_checkpoint(root: str | Path, learners: list[dict[str, Any]], run_state: dict[str, Any], keep: int) -> Path:
    """Write step_{run_state["step"]} atomically, then keep only the newest `keep` checkpoints.

    learners: LearnerWorker.checkpoint_state() of every rank ({"adapters", "ema_lora", "lora_config", "trainer"});
    the adapters are the same on every rank, so rank 0's are written. run_state: JSON-able driver
    state with at least "step".
    """
    root = Path(root)
    final = root / f"step_{run_state['step']:06d}"
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TEMP_PREFIX}*"):
        shutil.rmtree(stale)  # left by a save that was killed
    temp = root / f"{_TEMP_PREFIX}{final.name}"
    temp.mkdir()
    for adapter, weights in learners[0]["adapters"].items():
        save_lora(weights, learners[0]["lora_config"], temp / ADAPTER_DIRS[adapter])
    save_lora(learners[0]["ema_lora"], learners[0]["lora_config"], temp / EMA_LORA_DIR)
    skeleton, tensors = split_tensors([learner["trainer"] for learner in learners])
    save_file(tensors, temp / "trainer.safetensors")
    (temp / "state.json").write_text(json.dumps(run_state | {"trainers": skeleton}, indent=1) + "\n")
    _fsync_tree(temp)
    os.rename(temp, final)
    _fsync(root)
    for _, path in sorted(checkpoint_steps(root).items())[:-keep]:
        # Renamed first, so that a kill mid-delete leaves no half-deleted step_ dir.
        trash = root / f"{_TEMP_PREFIX}old-{path.name}"
        os.rename(path, trash)
        shutil.rmtree(trash)
    return final


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names it and what is wrong."""


# what reading a truncated, missing or garbled checkpoint file raises
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, IndexError, SafetensorError)


def load_checkpoint(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(each rank's state for LearnerWorker.restore_state, run state) of a checkpoint written by save_checkpoint.

    Raises CheckpointError for a file that is missing, truncated or garbled, and for LoRA weights that are inf or NaN."""
    path = Path(path)
    try:
        run_state = json.loads((path / "state.json").read_text())
        trainers = join_tensors(run_state.pop("trainers"), load_file(path / "trainer.safetensors"))
        adapters = {adapter: load_lora(path / name) for adapter, name in ADAPTER_DIRS.items()}
        config = json.loads((path / ADAPTER_DIRS[TRAINABLE_ADAPTER] / "adapter_config.json").read_text())
    except _UNREADABLE as error:
        raise CheckpointError(f"{path} cannot be read ({type(error).__name__}: {error})") from None
    nonfinite = [
        f"{ADAPTER_DIRS[adapter]}/{key}"
        for adapter, weights in adapters.items()
        for key, value in weights.items()
        if not value.isfinite().all()
    ]
    if nonfinite:
        raise CheckpointError(f"{path}: {len(nonfinite)} LoRA tensors hold inf or NaN, e.g. {nonfinite[:2]}")
    return [{"adapters": adapters, "lora_config": config, "trainer": trainer} for trainer in trainers], run_state


def newest_valid_checkpoint(
    root: str | Path,
) -> tuple[Path | None, tuple[list[dict[str, Any]], dict[str, Any]] | None, list[tuple[Path, str]]]:
    """The newest checkpoint under root that loads whole, with finite weights and the recipe that wrote it;
    what load_checkpoint read from it (None if there is none); and each newer one skipped, with why."""
    skipped = []
    for _, path in sorted(checkpoint_steps(root).items(), reverse=True):
        try:
            learners, run_state = load_checkpoint(path)
        except CheckpointError as error:
            skipped.append((path, str(error)))
            continue
        if "recipe" not in run_state:
            skipped.append((path, f"{path}: state.json holds no recipe"))
            continue
        return path, (learners, run_state), skipped
    return None, None, skipped


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(directory)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_restorable(
    path: Path, run_state: dict[str, Any], learner_states: list[dict[str, Any]], base_fingerprint: str, recipe: Recipe
) -> None:
    """Refuse a checkpoint (read from `path`) that does not fit this run: trained on other base weights, or
    written by a learner world of another size (ZeRO optimizer shards fit only their own world)."""
    saved = run_state.get("base_fingerprint")  # None in checkpoints written before it was recorded
    if saved is not None and saved != base_fingerprint:
        raise RecipeError(
            f"{path} was trained on other base weights: model.path {recipe.model.path!r} now loads a transformer with "
            f"fingerprint {base_fingerprint}, the checkpoint's had {saved}. Its LoRA and optimizer state belong to "
            "those weights: point model.path at them again, or start a new run.output_dir"
        )
    if len(learner_states) != recipe.cluster.learners:
        raise RecipeError(
            f"{path} holds the state of {len(learner_states)} learners, this run has {recipe.cluster.learners} (cluster.learners)"
        )


def run_state(steps_done: int, version: int, exploration: dict[str, Any], recipe: Recipe, base_fingerprint: str) -> dict[str, Any]:
    """The driver's part of a checkpoint after `steps_done` iterations (state.json, beside the trainers'): the
    rollout weights' version, exploration's state (a pool explored ahead), the recipe without secrets (a resume
    compares it) and the base weights' fingerprint."""
    return {
        "step": steps_done,
        "version": version,
        "exploration": exploration,
        "recipe": recipe.public_dump(),
        "base_fingerprint": base_fingerprint,
    }
