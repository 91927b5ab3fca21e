"""`load_policy`: one entry point from a model name, path or hub id to a Policy of the right family."""

from __future__ import annotations

import importlib
import json
from importlib.metadata import entry_points
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rollout.policy import QUANTIZED_PRECISIONS, Policy, unquantized_precision

# Family -> module and Policy class, imported on first use: a family's diffusers pipeline code is
# large (and transformers warns about torchvision when it loads), and most runs use one family.
PIPELINE_POLICIES = {"sd3": "rollout.sd3:SD3Policy", "flux": "rollout.flux:FluxPolicy", "sana": "rollout.sana:SanaPolicy"}
# Plug-in families (the tiny testbed is one): entry points "family = 'pkg.module:PolicyClass'". Such a class
# implements `recognizes(path) -> bool` (which paths hold its checkpoints) and `from_pretrained(path, precision, device, **options)`.
ENTRY_POINT_GROUP = "solray.models"
# model_index.json `_class_name` of a diffusers pipeline -> family
PIPELINE_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "SanaPipeline": "sana"}


def model_families() -> dict[str, str]:
    """Family name -> "module:PolicyClass": the plug-ins' families (entry points solray.models), then the diffusers ones."""
    return {entry.name: entry.value for entry in entry_points(group=ENTRY_POINT_GROUP)} | PIPELINE_POLICIES


def _policy_class(family: str) -> type[Policy]:
    module_name, class_name = model_families()[family].split(":")
    return getattr(importlib.import_module(module_name), class_name)


class ModelConfig(BaseModel):
    """The recipe's `model` section."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str = Field("tiny", description='"tiny" for the shipped testbed model, else a local directory or hub id')
    family: str = Field("auto", description="model family (tiny, sd3, flux, sana or a plug-in's); auto reads it from the checkpoint")
    shift: float | None = Field(None, gt=0, description="timestep shift; None uses the checkpoint's scheduler config")
    # Options of the diffusers families (sd3, flux, sana); the tiny model has none.
    resolution: int | None = Field(None, gt=0, description="image height = width in pixels; None = the checkpoint's default")
    cfg_scale: float = Field(1.0, ge=1.0, description="classifier-free guidance scale; 1.0 = off (one forward per step)")
    distilled_guidance: float | None = Field(None, description="FLUX.1-dev guidance-embedding value; None = 3.5 (flux only)")
    max_sequence_length: int | None = Field(None, gt=0, description="T5 / Gemma tokens per prompt; None = the pipeline's default")
    schedule: Literal["pipeline", "linear"] = Field(
        "pipeline", description="sampling sigmas: the family pipeline's schedule, or linspace(1, 0, steps + 1) as Sol-RL samples SANA"
    )
    lora_targets: list[str] | None = Field(
        None, min_length=1, description="module-name suffixes LoRA wraps (peft target_modules); None = the family's"
    )

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str) -> str:
        if family != "auto" and family not in model_families():
            raise ValueError(f"unknown model family {family!r}; valid: auto, {', '.join(model_families())}")
        return family


PIPELINE_OPTIONS = ("resolution", "cfg_scale", "distilled_guidance", "max_sequence_length", "schedule")


def _family(path: str) -> str:
    for family in [name for name in model_families() if name not in PIPELINE_POLICIES]:  # in entry-point order
        if _policy_class(family).recognizes(path):
            return family
    class_name = _pipeline_class_name(path)
    if class_name in PIPELINE_FAMILIES:
        return PIPELINE_FAMILIES[class_name]
    plugins = [family for family in model_families() if family not in PIPELINE_POLICIES]
    found = (
        f"a diffusers {class_name}"
        if class_name
        else f"neither a checkpoint of {', '.join(plugins) or 'a plug-in family'} nor a diffusers pipeline (model_index.json)"
    )
    raise ValueError(
        f"cannot tell the model family of {path!r}: it is {found}; supported families: {', '.join(model_families())} "
        f"(pipelines {', '.join(PIPELINE_FAMILIES)}); set model.family to override"
    )


def _pipeline_class_name(path: str) -> str | None:
    """`_class_name` of the pipeline's model_index.json: read locally, or fetched alone for a hub id."""
    index = Path(path) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("_class_name")
    if Path(path).exists():
        return None
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path).get("_class_name")
    except OSError as error:  # diffusers says "check your internet connection" for a mistyped local path too
        raise ValueError(
            f"model path {path!r} is no local directory, and as a hub id it could not be loaded "
            f"(not in the local cache, or the hub is unreachable): {str(error).splitlines()[0]}"
        ) from None


def model_family(config: ModelConfig) -> str:
    """The family `config` loads as: model.family, or the one its path holds (read without loading weights)."""
    return _family(config.path) if config.family == "auto" else config.family


def load_policy(model: str | ModelConfig = "tiny", precision: str = "fp32", device: str | torch.device = "cpu") -> Policy:
    """A Policy for `model` ("tiny", a local path or hub id, or a ModelConfig) in fp32 or bf16.

    An nvfp4 / fp8 explore copy is quant.quantize_policy(load_policy(model, "bf16"), precision): quant builds on rollout.
    """
    if precision in QUANTIZED_PRECISIONS:
        raise ValueError(
            f"load_policy loads fp32 or bf16 weights; for a {precision} explore copy quantize a bf16 policy: "
            f"quant.quantize_policy(load_policy(model, 'bf16'), {precision!r})"
        )
    precision = unquantized_precision(precision)  # refuses unknown precisions
    config = ModelConfig(path=model) if isinstance(model, str) else model
    family = model_family(config)
    options = {name: getattr(config, name) for name in PIPELINE_OPTIONS if getattr(config, name) != ModelConfig.model_fields[name].default}
    if family in PIPELINE_POLICIES and "distilled_guidance" in options and family != "flux":
        raise ValueError(f"distilled_guidance applies to FLUX.1's guidance embedding only, not to family {family!r}")
    policy = _policy_class(family).from_pretrained(config.path, precision, device, **options)
    if config.shift is not None:
        policy.shift = config.shift
    if config.lora_targets is not None:
        policy.lora_target_modules = tuple(config.lora_targets)
    return policy
