"""PickScore, HPSv2, CLIPScore, aesthetic and ImageReward on tiny random models saved to disk.

Each reward loads through its real loader (`build_reward(name, model=<dir>, ...)` -> from_pretrained,
or the checkpoint converters) and is checked against the score computed directly from the tiny
transformers model: the formula, the weight conversion and the preprocessing all have to agree.
"""

import numpy as np
import pytest
import torch
from transformers import (
    BlipConfig,
    BlipImageProcessor,
    BlipProcessor,
    BlipTextModel,
    BlipVisionModel,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
)

from rewards import RewardError, build_reward
from rewards.clip_models import clip_state_from_open_clip
from rewards.image_reward import ImageReward
from rollout.char_tokenizers import blip_tokenizer, clip_tokenizer

PROMPTS = ["a red circle", "two blue squares", "a cat", "a green cross left of a circle"]


def images(count=4, size=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel + CLIPProcessor (shortest edge 32, centre crop 32) in transformers' layout."""
    tokenizer = clip_tokenizer(max_length=40)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=40,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu",
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu"
        ),
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tokenizer
    ).save_pretrained(path)
    return str(path)


def clip_oracle(path, batch, prompts):
    """(logit_scale, cosine) from CLIPModel.forward on the processor's inputs."""
    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=list(batch), padding=True, return_tensors="pt"))
    scale = model.logit_scale.exp().item()
    return scale, (out.logits_per_image.diagonal() / scale).double().numpy()


def check_scores(reward, expected, batch=None, prompts=PROMPTS):
    """Shape [B], float64, equal to the oracle, deterministic, and independent of the batch size."""
    batch = images() if batch is None else batch
    scores = reward.score(batch, prompts)
    assert scores.shape == (len(batch),) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert np.array_equal(scores, reward.score(batch, prompts))
    reward.batch_size = 3  # 3 + 1: another split into forward passes
    np.testing.assert_allclose(reward.score(batch, prompts), scores, rtol=1e-5, atol=1e-6)


def test_pickscore_is_logit_scaled_cosine(clip_dir):
    scale, cosine = clip_oracle(clip_dir, images(), PROMPTS)
    reward = build_reward("pickscore", model=clip_dir, processor=None, device="cpu")
    assert reward.resources["num_gpus"] > 0
    check_scores(reward, scale * cosine)


def test_clipscore_is_hessel_rescaled_cosine(clip_dir):
    _, cosine = clip_oracle(clip_dir, images(), PROMPTS)
    assert (cosine < 0).any() and (cosine > 0).any()  # both sides of the clamp are exercised
    check_scores(build_reward("clipscore", model=clip_dir, device="cpu"), 2.5 * np.maximum(cosine, 0))


def open_clip_state(model: CLIPModel) -> dict[str, torch.Tensor]:
    """The tiny CLIPModel's weights written in open_clip's layout (fused qkv, x @ proj projections)."""
    hf = model.state_dict()
    state = {
        "logit_scale": hf["logit_scale"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.proj": hf["visual_projection.weight"].T,
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "text_projection": hf["text_projection.weight"].T,
        "attn_mask": torch.full((40, 40), float("-inf")).triu(1),
    }
    for part in ("weight", "bias"):
        state[f"visual.ln_pre.{part}"] = hf[f"vision_model.pre_layrnorm.{part}"]
        state[f"visual.ln_post.{part}"] = hf[f"vision_model.post_layernorm.{part}"]
        state[f"ln_final.{part}"] = hf[f"text_model.final_layer_norm.{part}"]
    for tower, hf_tower in (("visual.", "vision_model"), ("", "text_model")):
        for layer in range(2):
            src, dst = f"{hf_tower}.encoder.layers.{layer}.", f"{tower}transformer.resblocks.{layer}."
            for part in ("weight", "bias"):
                state[f"{dst}attn.in_proj_{part}"] = torch.cat([hf[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv"])
                for ours, theirs in (
                    ("attn.out_proj", "self_attn.out_proj"),
                    ("ln_1", "layer_norm1"),
                    ("ln_2", "layer_norm2"),
                    ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"),
                ):
                    state[f"{dst}{ours}.{part}"] = hf[f"{src}{theirs}.{part}"]
    return state


def test_hpsv2_loads_an_open_clip_checkpoint_into_the_clip_architecture(clip_dir, tmp_path):
    # HPSv2 = fine-tuned weights: perturb the base so that loading the base's own weights would fail the check
    tuned = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    tuned.save_pretrained(tmp_path / "tuned")
    CLIPProcessor.from_pretrained(clip_dir).save_pretrained(tmp_path / "tuned")
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": open_clip_state(tuned)}, checkpoint)
    _, cosine = clip_oracle(tmp_path / "tuned", images(), PROMPTS)
    check_scores(build_reward("hpsv2", model=clip_dir, checkpoint=str(checkpoint), device="cpu"), cosine)


def test_open_clip_conversion_rejects_unknown_parameters(clip_dir):
    state = open_clip_state(CLIPModel.from_pretrained(clip_dir))
    assert set(clip_state_from_open_clip(state)) == set(CLIPModel.from_pretrained(clip_dir).state_dict())
    with pytest.raises(ValueError, match="unknown open_clip parameter 'visual.attn_pool.weight'"):
        clip_state_from_open_clip(state | {"visual.attn_pool.weight": torch.zeros(1)})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_is_an_mlp_on_the_normalised_image_embedding(clip_dir, tmp_path, suffix):
    generator = torch.Generator().manual_seed(3)
    sizes = [(16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    head = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), sizes):
        head[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
        head[f"layers.{index}.bias"] = torch.randn(fan_out, generator=generator)
    path = tmp_path / f"head{suffix}"
    if suffix == ".pth":
        torch.save(head, path)
    else:
        from safetensors.torch import save_file

        save_file(head, path)
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        x = model.get_image_features(**processor(images=list(images()), return_tensors="pt"))
        x = getattr(x, "pooler_output", x)  # transformers 5 returns an output object
        x = x / x.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):  # the published MLP has no activations
            x = x @ head[f"layers.{index}.weight"].T + head[f"layers.{index}.bias"]
    check_scores(build_reward("aesthetic", head=str(path), model=clip_dir, device="cpu"), x[:, 0].double().numpy())


# --- ImageReward ---------------------------------------------------------------------------------

BLIP_IMAGE_SIZE = 32  # the checkpoint's; the base config says 64, and the loader must follow the checkpoint


def blip_config(image_size):
    return BlipConfig(
        text_config=dict(
            vocab_size=len(blip_tokenizer()),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=48,
        ),
        vision_config=dict(
            hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=image_size, patch_size=8
        ),
    )


def blip_original_names(vision_state):
    """transformers BlipVisionModel names -> BLIP visual_encoder names (the inverse of the loader's renames)."""
    renames = [
        ("embeddings.patch_embedding.", "patch_embed.proj."),
        ("embeddings.class_embedding", "cls_token"),
        ("embeddings.position_embedding", "pos_embed"),
        ("encoder.layers.", "blocks."),
        ("layer_norm1", "norm1"),
        ("layer_norm2", "norm2"),
        ("self_attn.qkv", "attn.qkv"),
        ("self_attn.projection", "attn.proj"),
        ("post_layernorm", "norm"),
    ]
    original = {}
    for name, value in vision_state.items():
        for ours, theirs in renames:
            name = name.replace(ours, theirs)
        original[name] = value
    return original


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    """(base directory, ImageReward.pt in the release's layout, the modules the weights came from)."""
    path = tmp_path_factory.mktemp("imagereward")
    tokenizer = blip_tokenizer()
    blip_config(image_size=2 * BLIP_IMAGE_SIZE).save_pretrained(path / "base")
    image_processor = BlipImageProcessor(size={"height": 2 * BLIP_IMAGE_SIZE, "width": 2 * BLIP_IMAGE_SIZE})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path / "base")
    torch.manual_seed(1)
    config = blip_config(image_size=BLIP_IMAGE_SIZE)
    config.vision_config.layer_norm_eps = 1e-6
    vision, text = BlipVisionModel(config.vision_config).eval(), BlipTextModel(config.text_config, add_pooling_layer=False).eval()
    mlp = torch.nn.Sequential(*(torch.nn.Linear(i, o) for i, o in [(32, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]))
    state = {f"blip.visual_encoder.{k}": v for k, v in blip_original_names(vision.state_dict()).items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    state |= {f"mlp.layers.{i}.{p}": getattr(mlp[j], p) for j, i in enumerate((0, 2, 4, 6, 7)) for p in ("weight", "bias")}
    state["blip.vision_proj.weight"] = torch.zeros(4, 48)  # other BLIP parts in the release are ignored
    torch.save(state, path / "ImageReward.pt")
    return str(path / "base"), str(path / "ImageReward.pt"), (vision, text, mlp, tokenizer)


def test_imagereward_converts_the_release_checkpoint_and_scores(imagereward_files):
    base, checkpoint, (vision, text, mlp, tokenizer) = imagereward_files
    batch = images(seed=5)
    processor = BlipImageProcessor(size={"height": BLIP_IMAGE_SIZE, "width": BLIP_IMAGE_SIZE})
    with torch.no_grad():
        tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        image_embeds = vision(pixel_values=processor(list(batch), return_tensors="pt").pixel_values).last_hidden_state
        hidden = text(tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image_embeds).last_hidden_state
        expected = (mlp(hidden[:, 0])[:, 0] - ImageReward.mean) / ImageReward.std
    reward = build_reward("imagereward", checkpoint=checkpoint, base=base, device="cpu")
    assert reward.vision.config.image_size == BLIP_IMAGE_SIZE and reward.vision.config.layer_norm_eps == 1e-6
    check_scores(reward, expected.double().numpy(), batch)


def test_loaders_name_bad_inputs(imagereward_files, clip_dir, tmp_path):
    base, checkpoint, _ = imagereward_files
    torch.save({"visual.proj": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an ImageReward state dict"):
        build_reward("imagereward", checkpoint=str(tmp_path / "other.pt"), base=base, device="cpu")
    with pytest.raises(FileNotFoundError, match="neither a local file nor a hub file"):
        build_reward("aesthetic", head="missing.pth", model=clip_dir, device="cpu")
    torch.save({"layers.0.weight": torch.zeros(1024, 16)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"do not fit ScoreHead: missing \['layers.0.bias'"):
        build_reward("aesthetic", head=str(tmp_path / "partial.pth"), model=clip_dir, device="cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        build_reward("clipscore", model=clip_dir, precision="int8")
    reward = build_reward("clipscore", model=clip_dir, device="cpu")
    with pytest.raises(RewardError, match="reward 'clipscore': 4 images but 3 prompts"):
        reward.score(images(), PROMPTS[:3])


@pytest.mark.real
@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "clipscore", "imagereward"])
def test_real_reward_prefers_the_prompt_that_describes_the_image(name):
    """Published weights through the same loaders (default hub ids): each image scores higher with its own prompt."""
    canvas = np.full((2, 256, 256, 3), 255, dtype=np.uint8)
    canvas[0, 64:192, 64:192] = (220, 20, 20)  # a red square
    yy, xx = np.mgrid[:256, :256]
    canvas[1][(yy - 128) ** 2 + (xx - 128) ** 2 < 64**2] = (20, 40, 220)  # a blue circle
    prompts = ["a red square on a white background", "a blue circle on a white background"]
    reward = build_reward(name)
    own = reward.score(canvas, prompts)
    swapped = reward.score(canvas, prompts[::-1])
    print(f"{name}: own prompt {own}, swapped {swapped}")
    assert (own > swapped).all()
