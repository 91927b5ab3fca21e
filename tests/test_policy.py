import numpy as np
import pytest
import torch

from rollout import ModelConfig, load_policy
from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER
from rollout.samplers import initial_noise, sample
from rollout.tiny import render
from rollout.tiny.model import TinyPolicy


def test_tiny_policy_interface(tiny_policy):
    assert tiny_policy.family == "tiny" and tiny_policy.latent_shape == (3, 32, 32)
    assert tiny_policy.dtype == torch.float32 and tiny_policy.device == torch.device("cpu")
    cond = tiny_policy.encode_prompts(["a red circle", "two squares", "a red circle"])
    assert cond.tensors["prompt_embeds"].shape == (3, 12, 64) and cond.tensors["pooled_prompt_embeds"].shape == (3, 64)
    assert torch.equal(cond.tensors["prompt_embeds"][0], cond.tensors["prompt_embeds"][2])
    x = initial_noise([0, 1, 2], tiny_policy.latent_shape)
    with torch.no_grad():
        v = tiny_policy.velocity(x, torch.tensor([1.0, 0.5, 0.1]), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_prompt_cache_returns_the_encoder_output(tiny_policy):
    fresh = tiny_policy._encode(["a blue cross"])
    cached = tiny_policy.encode_prompts(["a blue cross"])
    assert torch.equal(fresh.tensors["prompt_embeds"], cached.tensors["prompt_embeds"])
    assert "a blue cross" in tiny_policy._prompt_cache


def test_decode_inverts_encode_images(tiny_policy):
    images = np.stack([render("a red circle", 0), render("three crosses", 1)])
    assert np.array_equal(tiny_policy.decode(TinyPolicy.encode_images(images)), images)


def test_bf16_policy_samples_close_to_fp32(tiny_policy):
    bf16 = load_policy("tiny", precision="bf16")
    assert bf16.dtype == torch.bfloat16 and next(bf16.transformer.parameters()).dtype == torch.bfloat16
    prompts, seeds = ["a green square", "a circle above a cross"], [0, 1]
    full, half = sample(tiny_policy, prompts, seeds, 10), sample(bf16, prompts, seeds, 10)
    assert full.x0.dtype == half.x0.dtype == torch.float32
    assert 0 < (full.x0 - half.x0).abs().mean() < 0.05


def test_lora_adapters_policy_old_and_reference():
    policy = load_policy("tiny")
    prompts, seeds = ["a yellow triangle"], [3]
    reference = sample(policy, prompts, seeds, 4).x0
    policy.add_lora(rank=4, alpha=8)
    trainable = policy.adapter_parameters(TRAINABLE_ADAPTER)
    assert trainable and all(p.requires_grad for p in trainable.values())
    assert not any(p.requires_grad for p in policy.adapter_parameters(OLD_ADAPTER).values())
    assert all(any(t in name for t in policy.lora_target_modules) for name in trainable)
    # peft initialises lora_B to zero: every adapter starts as the base model
    assert torch.allclose(sample(policy, prompts, seeds, 4).x0, reference)
    with torch.no_grad():
        for param in trainable.values():
            param.add_(0.05)
    moved = sample(policy, prompts, seeds, 4, adapter=TRAINABLE_ADAPTER).x0
    assert (moved - reference).abs().max() > 1e-3
    assert torch.allclose(sample(policy, prompts, seeds, 4, adapter=OLD_ADAPTER).x0, reference)
    assert torch.allclose(sample(policy, prompts, seeds, 4, adapter=None).x0, reference)
    # the adapter context restores the trainable adapter and its requires_grad flags
    assert policy.transformer.active_adapters() == [TRAINABLE_ADAPTER]
    assert all(p.requires_grad for p in policy.adapter_parameters(TRAINABLE_ADAPTER).values())
    policy.copy_adapter(TRAINABLE_ADAPTER, OLD_ADAPTER)
    assert torch.allclose(sample(policy, prompts, seeds, 4, adapter=OLD_ADAPTER).x0, moved)


def test_load_policy_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        load_policy("tiny", precision="int4")
    with pytest.raises(ValueError, match="cannot tell the model family of"):
        load_policy(str(tmp_path))
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        ModelConfig(path="tiny", lora_rank=4)


def test_saved_policy_round_trips_through_from_pretrained(tiny_policy, tmp_path):
    tiny_policy.save_pretrained(tmp_path / "copy")
    copy = load_policy(str(tmp_path / "copy"))
    a = sample(tiny_policy, ["a red cross"], [9], 3)
    b = sample(copy, ["a red cross"], [9], 3)
    assert torch.equal(a.x0, b.x0)
