"""One-command GPU check: does solray's CUDA code run, and how fast does each explore path sample? Writes one JSON.

Rows (each passes, fails or is skipped with its reason; the JSON holds the numbers)
  device          GPU name, compute capability, memory, CUDA / torch / package versions, and what
                  quant_backend auto picks for nvfp4, nvfp4 + allow_fp8 and fp8
  family:sd3|flux|sana
                  a tiny random-weight pipeline (rollout.random_pipelines) in bf16 on the device:
                  sampling with every solver, a seed alone against the same seed in a batch, one
                  Flow-GRPO step (reports grpo/clipfrac and the largest |log ratio| of its first step)
                  and one DiffusionNFT step; the loss finite and the LoRA weights moved
  backends        on the tiny SD3, each explore backend against emulate on the same inputs: the
                  largest difference of the quantized weights, of one layer's quantized inputs and of
                  the velocities
  speed:tiny, speed:wide
                  seconds per sample() call (6 Euler steps) of bf16 and of every explore path, on the
                  tiny FLUX and on a FLUX with 3072-wide linears (FLUX.1's width, random weights, one
                  double and one single block, 4096 image tokens): NVFP4 GEMMs on Blackwell and FP8 GEMMs
                  on Hopper show their speed-up over bf16 here
  pytest -m gpu   the tests marked gpu
  ray             the tiny Sol-RL recipe for 2 steps, actors on the GPU with fractional num_gpus
                  ("skipped: no ray" without ray, "skipped: no deepspeed" without deepspeed)

Run from a source checkout, no install and no network (about 2-4 minutes on one GPU):
  PYTHONPATH=. python bench/gpu_check.py --out OUT_DIR
  python bench/gpu_check.py --dry-run --out OUT_DIR    # the same code on CPU, small sizes (CI runs it)
Exit status 0 when no row failed. Wheels to carry to a GPU machine that has torch, transformers, peft,
safetensors and numpy: README.md, "GPU check".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# This checkout's packages first, with or without PYTHONPATH: an installed solray must not stand in for them.
sys.path.insert(0, str(REPO))
PROMPTS = ["a red circle", "two blue squares", "a green cross left of a circle"]
SEEDS = [11, 12, 13]
EXPLORE_STEPS = 6
PACKAGES = (
    "torch",
    "transformers",
    "diffusers",
    "peft",
    "safetensors",
    "numpy",
    "pydantic",
    "pytest",
    "ray",
    "deepspeed",
    "nvidia-modelopt",
)
RESULT_FILE = "gpu_check.json"


@dataclass(frozen=True)
class Sizes:
    """What a run costs: the GPU check's sizes, or the dry run's (seconds on 2 CPU cores)."""

    steps: int  # sampler steps of the family checks
    wide_heads: int  # the timing FLUX: heads x head_dim = the width of its linears
    wide_head_dim: int
    wide_rope_axes: tuple[int, int, int]  # FLUX's RoPE axes, summing to head_dim
    wide_resolution: int  # pixels: (resolution / 2 / 2)^2 image tokens (VAE factor 2, 2 x 2 packing)
    timing_batch: int  # images per timed sample() call
    timing_repeats: int  # timed calls per path, after one warm-up call
    subprocess_timeout_s: int  # pytest and the Ray recipe


GPU_SIZES = Sizes(
    steps=4,
    wide_heads=24,
    wide_head_dim=128,
    wide_rope_axes=(16, 56, 56),
    wide_resolution=256,
    timing_batch=4,
    timing_repeats=3,
    subprocess_timeout_s=240,
)
DRY_SIZES = Sizes(
    steps=2,
    wide_heads=4,
    wide_head_dim=16,
    wide_rope_axes=(4, 6, 6),
    wide_resolution=64,
    timing_batch=2,
    timing_repeats=1,
    subprocess_timeout_s=240,
)


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    out: Path
    scratch: Path  # saved tiny pipelines
    dry_run: bool


@dataclass
class Row:
    status: str  # "pass" | "fail" | "skipped"
    detail: str
    data: dict
    seconds: float = 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help=f"directory for {RESULT_FILE} (and the Ray run's outputs)")
    parser.add_argument("--dry-run", action="store_true", help="run every row on CPU at small sizes: checks the code, not the GPU")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    args = parser.parse_args(argv)
    rows = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are: {', '.join(ROWS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(torch.get_num_threads(), 2) if args.dry_run else torch.get_num_threads())
    device = torch.device("cpu" if args.dry_run else "cuda")
    results: dict[str, Row] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        context = Context(device, DRY_SIZES if args.dry_run else GPU_SIZES, out, Path(scratch), args.dry_run)
        for name in rows:
            results[name] = run_row(ROWS[name], context)
            print(f"{name:<14} {results[name].status:<8} {results[name].seconds:6.1f}s  {results[name].detail}", flush=True)
    report = {
        "dry_run": args.dry_run,
        "device": str(device),
        "total_seconds": time.perf_counter() - start,
        "passed": all(row.status != "fail" for row in results.values()),
        "rows": {name: asdict(row) for name, row in results.items()},
    }
    (out / RESULT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(results, report["total_seconds"], out / RESULT_FILE)
    return 0 if report["passed"] else 1


def run_row(check: Callable[[Context], Row], context: Context) -> Row:
    """A row's result; an exception fails the row (with its traceback in the JSON), never the check."""
    start = time.perf_counter()
    try:
        row = check(context)
    except Exception as error:  # any failure is this row's finding; the next rows still run
        row = Row("fail", f"{type(error).__name__}: {error}".splitlines()[0][:300], {"traceback": traceback.format_exc()})
    if context.device.type == "cuda":
        torch.cuda.empty_cache()
    row.seconds = time.perf_counter() - start
    return row


def print_table(results: dict[str, Row], total_s: float, path: Path) -> None:
    width = max(len(name) for name in results)
    print(f"\n{'row':<{width}}  {'result':<8} {'seconds':>7}  detail")
    for name, row in results.items():
        print(f"{name:<{width}}  {row.status.upper():<8} {row.seconds:7.1f}  {row.detail}")
    failed = [name for name, row in results.items() if row.status == "fail"]
    print(f"\n{'FAIL: ' + ', '.join(failed) if failed else 'PASS'} in {total_s:.0f} s; details in {path}")


# --- device ------------------------------------------------------------------------------------------


def device_row(context: Context) -> Row:
    from quant import resolve_explore_path

    if context.device.type == "cuda" and not torch.cuda.is_available():
        return Row(
            "fail",
            f"torch {torch.__version__} sees no CUDA device (torch.version.cuda = {torch.version.cuda}); --dry-run checks the code on CPU",
            {},
        )
    data = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": {name: package_version(name) for name in PACKAGES},
    }
    if context.device.type == "cuda":
        properties = torch.cuda.get_device_properties(context.device)
        data |= {
            "name": properties.name,
            "compute_capability": f"{properties.major}.{properties.minor}",
            "memory_gib": round(properties.total_memory / 2**30, 1),
        }
    picks = {}
    for precision, allow_fp8 in (("nvfp4", False), ("nvfp4", True), ("fp8", False)):
        picked, backend, reason = resolve_explore_path(precision, "auto", context.device, allow_fp8)
        picks[f"{precision}{' + allow_fp8' if allow_fp8 else ''}"] = {"precision": picked, "backend": backend, "reason": reason}
    data["auto_picks"] = picks
    name = f"{data['name']} ({data['compute_capability']})" if "name" in data else "cpu (dry run)"
    summary = ", ".join(f"{key} -> {value['precision']}/{value['backend']}" for key, value in picks.items())
    return Row("pass", f"{name}; auto: {summary}", data)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- families --------------------------------------------------------------------------------------


def load_family(context: Context, family: str, precision: str = "bf16", resolution: int | None = None):
    """The tiny random `family` pipeline, saved once under the scratch directory, loaded through load_policy."""
    from rollout import ModelConfig, load_policy
    from rollout.random_pipelines import PIPELINE_BUILDERS, RESOLUTION, TEXT_TOKENS

    path = context.scratch / family
    if not path.exists():
        PIPELINE_BUILDERS[family]().save_pretrained(path)
    config = ModelConfig(path=str(path), resolution=resolution or RESOLUTION, max_sequence_length=TEXT_TOKENS)
    return load_policy(config, precision, context.device)


def family_row(family: str) -> Callable[[Context], Row]:
    def check(context: Context) -> Row:
        from rollout.samplers import SOLVERS, sample

        policy = load_family(context, family)
        steps, data, problems = context.sizes.steps, {}, []
        for solver in SOLVERS:
            x0 = sample(policy, PROMPTS, SEEDS, steps, solver=solver).x0
            data[f"sample_{solver}_finite"] = bool(torch.isfinite(x0).all())
            if not data[f"sample_{solver}_finite"]:
                problems.append(f"{solver} sampled non-finite latents")
        batch = sample(policy, PROMPTS, SEEDS, steps)
        alone = sample(policy, PROMPTS[1:2], SEEDS[1:2], steps)
        data["alone_vs_batch_max_abs_latent"] = float((alone.x0[0] - batch.x0[1]).abs().max())
        data["alone_vs_batch_mean_abs_pixel"] = float(abs(alone.images[0].astype(float) - batch.images[1]).mean())
        if data["alone_vs_batch_mean_abs_pixel"] >= 2:  # the real-checkpoint test's tolerance for bf16 GPU kernels
            problems.append(f"a seed alone differs from it in a batch by {data['alone_vs_batch_mean_abs_pixel']:.2f} mean |pixel|")
        data |= training_steps(policy, steps)
        problems += [
            f"{name}: loss {data[name]} not finite" for name in ("grpo_loss", "nft_loss") if not torch.isfinite(torch.tensor(data[name]))
        ]
        problems += [f"{name} moved no LoRA weight" for name in ("grpo", "nft") if not data[f"{name}_weights_moved"]]
        detail = "; ".join(problems) or (
            f"{len(SOLVERS)} solvers, alone vs batch {data['alone_vs_batch_mean_abs_pixel']:.2f} mean |pixel|, "
            f"grpo/clipfrac {data['grpo/clipfrac']:.3f}, first-step max |log ratio| {data['grpo_first_step_max_abs_log_ratio']:.2e}, "
            f"nft loss {data['nft_loss']:.4f}"
        )
        return Row("fail" if problems else "pass", detail, data)

    return check


def training_steps(policy, steps: int) -> dict:
    """One Flow-GRPO step, then one DiffusionNFT step, on LoRA over the bf16 policy; what each did."""
    from rl.algorithm import Batch
    from rl.config import AlgorithmConfig, OptimConfig
    from rl.grpo import GRPO, GRPOConfig
    from rl.nft import NFT, NFTConfig
    from rl.trainer import Trainer
    from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER
    from rollout.samplers import sample
    from rollout.sde import step_log_prob

    policy.add_lora(rank=4, alpha=8)
    trainer = Trainer(policy, optim=OptimConfig(lr=1e-3))
    algorithm = AlgorithmConfig(nft=NFTConfig(timestep_fraction=1.0), grpo=GRPOConfig(timestep_fraction=1.0))
    flow_grpo, diffusion_nft = GRPO(algorithm), NFT(algorithm, policy.sigmas(steps))
    advantages = torch.tensor([1.0, -1.0, 0.5])
    trajectory = sample(policy, PROMPTS, SEEDS, steps, solver="sde", adapter=OLD_ADAPTER).trajectory.to(policy.device)
    first = int(flow_grpo.plan(trajectory)[0])
    x, x_next = trajectory.latents[first], trajectory.latents[first + 1]
    t, t_next = float(trajectory.timesteps[first]), float(trajectory.timesteps[first + 1])
    with torch.no_grad(), policy.adapter(TRAINABLE_ADAPTER):
        v = policy.velocity(x, torch.full((len(x),), t, device=x.device), policy.encode_prompts(PROMPTS)).float()
    log_prob = step_log_prob(trajectory.method, x, v, x_next, t, t_next, trajectory.noise_level)[0]
    log_ratio = log_prob - trajectory.log_probs[first]
    before = lora_snapshot(policy)
    grpo = flow_grpo.train_step(trainer, Batch(trajectory, PROMPTS, advantages))
    moved_by_grpo = lora_moved(policy, before)
    x0 = sample(policy, PROMPTS, SEEDS, steps).x0
    before = lora_snapshot(policy)
    nft = diffusion_nft.train_step(trainer, Batch(samples=x0, prompts=PROMPTS, advantages=advantages))
    return {
        "grpo_loss": grpo["loss/grpo"],
        "grpo/clipfrac": grpo["grpo/clipfrac"],
        "grpo/approx_kl": grpo["grpo/approx_kl"],
        "grpo_first_step_max_abs_log_ratio": float(log_ratio.abs().max()),
        "grpo_weights_moved": moved_by_grpo,
        "nft_loss": nft["loss/nft"],
        "nft_grad_norm": nft["train/grad_norm"],
        "nft_weights_moved": lora_moved(policy, before),
    }


def lora_snapshot(policy) -> dict[str, torch.Tensor]:
    from rollout.policy import TRAINABLE_ADAPTER

    return {name: p.detach().clone() for name, p in policy.adapter_parameters(TRAINABLE_ADAPTER).items()}


def lora_moved(policy, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[name], p) for name, p in lora_snapshot(policy).items())


# --- explore backends --------------------------------------------------------------------------------


def explore_paths(context: Context) -> list[tuple[str, str, str | None]]:
    """(precision, backend, why it cannot run or None) of every explore path worth running on the device."""
    from quant.explore import modelopt_unavailable

    paths = [(precision, backend, None) for precision in ("nvfp4", "fp8") for backend in ("emulate", "scaled_mm")]
    return paths + [("nvfp4", "modelopt", modelopt_unavailable(context.device))]


def small_calibration():
    from quant import CalibrationSet

    return CalibrationSet(tuple(PROMPTS[:2]), seeds=(0,), steps=2)


def backends_row(context: Context) -> Row:
    from quant import kernel_support, quantize_policy

    source = load_family(context, "sd3")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(PROMPTS), *source.latent_shape, generator=g).to(context.device)
    t = torch.tensor([0.9, 0.5, 0.2], device=context.device)
    cond = source.encode_prompts(PROMPTS)
    copies, data, skipped = {}, {}, []
    for precision, backend, unavailable in explore_paths(context):
        if unavailable:
            skipped.append(f"{precision}/{backend}: {unavailable}")
            continue
        copies[precision, backend] = quantize_policy(source, precision, backend, min_dim=16, calibration=small_calibration())
    for precision in ("nvfp4", "fp8"):
        baseline = copies[precision, "emulate"]
        layer_name = baseline.explore_state.selection.quantized[0]
        layer_input = captured_input(baseline, layer_name, x, t, cond)
        with torch.no_grad():
            v_baseline = baseline.velocity(x, t, cond).float()
        for (other_precision, backend), explore in copies.items():
            if other_precision != precision or backend == "emulate":
                continue
            with torch.no_grad():
                v = explore.velocity(x, t, cond).float()
            weights = [
                quantized_operands(explore.transformer.get_submodule(name), None)[0]
                - quantized_operands(baseline.transformer.get_submodule(name), None)[0]
                for name in baseline.explore_state.selection.quantized
            ]
            inputs = (
                quantized_operands(explore.transformer.get_submodule(layer_name), layer_input)[1]
                - quantized_operands(baseline.transformer.get_submodule(layer_name), layer_input)[1]
            )
            data[f"{precision}/{backend} vs emulate"] = {
                "runs": "kernel"
                if backend == "scaled_mm" and kernel_support(context.device, precision).available
                else ("reference formula" if backend == "scaled_mm" else backend),
                "max_abs_quantized_weight_difference": max(float(w.abs().max()) for w in weights),
                "max_abs_quantized_input_difference": float(inputs.abs().max()),
                "input_layer": layer_name,
                "max_abs_velocity_difference": float((v - v_baseline).abs().max()),
                "relative_velocity_difference": float((v - v_baseline).norm() / v_baseline.norm()),
                "finite": bool(torch.isfinite(v).all()),
            }
    data["skipped"] = skipped
    bad = [name for name, value in data.items() if isinstance(value, dict) and not value["finite"]]
    summary = ", ".join(
        f"{name}: velocity {value['relative_velocity_difference']:.1e} ({value['runs']})"
        for name, value in data.items()
        if isinstance(value, dict)
    )
    return Row("fail" if bad else "pass", f"non-finite velocities: {bad}" if bad else summary, data)


def captured_input(explore, layer_name: str, x, t, cond) -> torch.Tensor:
    """The input of one linear during a velocity call."""
    seen = []
    hook = explore.transformer.get_submodule(layer_name).register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            explore.velocity(x, t, cond)
    finally:
        hook.remove()
    return seen[0]


@torch.no_grad()
def quantized_operands(layer, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dequantized weight, dequantized input x) as the layer multiplies them, fp32: solray's layers or modelopt's."""
    from quant import QuantLinear

    if isinstance(layer, QuantLinear):
        return layer.dequantized_weight(), None if x is None else layer.dequantized_input(x, layer.input_amax)
    return layer.weight_quantizer(layer.weight).float(), None if x is None else layer.input_quantizer(x).float()


# --- speed ----------------------------------------------------------------------------------------


def speed_row(size: str) -> Callable[[Context], Row]:
    def check(context: Context) -> Row:
        from quant import kernel_support, quantize_policy

        policy = load_family(context, "flux", resolution=context.sizes.wide_resolution if size == "wide" else None)
        if size == "wide":
            policy.transformer = wide_flux_transformer(context)
        options = {"min_dim": 16} if size == "tiny" else {}  # the tiny linears are under FLUX's min_dim 1000
        # bf16 exploring is a bf16 explore copy (on CPU its linears accumulate in fp32, as the quantized ones do)
        times = {"bf16": time_sampling(quantize_policy(policy, "bf16"), context)}
        data, skipped = (
            {
                "width": linear_width(policy),
                "image_tokens": image_tokens(policy),
                "batch": context.sizes.timing_batch,
                "steps": EXPLORE_STEPS,
            },
            [],
        )
        for precision, backend, unavailable in explore_paths(context):
            if unavailable:
                skipped.append(f"{precision}/{backend}: {unavailable}")
                continue
            explore = quantize_policy(policy, precision, backend, calibration=small_calibration(), **options)
            runs = (
                "kernel"
                if backend == "scaled_mm" and kernel_support(context.device, precision).available
                else ("reference formula" if backend == "scaled_mm" else backend)
            )
            times[f"{precision}/{backend} ({runs})"] = time_sampling(explore, context)
            del explore
            if context.device.type == "cuda":
                torch.cuda.empty_cache()
        data["seconds_per_call"] = times
        data["speedup_over_bf16"] = {name: times["bf16"] / seconds for name, seconds in times.items() if name != "bf16"}
        data["skipped"] = skipped
        summary = ", ".join(f"{name} {speedup:.2f}x" for name, speedup in data["speedup_over_bf16"].items())
        return Row(
            "pass", f"width {data['width']}, {data['image_tokens']} tokens; over bf16 ({times['bf16'] * 1000:.0f} ms): {summary}", data
        )

    return check


def wide_flux_transformer(context: Context):
    """FLUX with 3072-wide linears (GPU sizes; FLUX.1's width) and random weights, one double and one single block,
    the tiny pipeline's in/out channels and text widths, in bf16 on the device."""
    from diffusers import FluxTransformer2DModel

    sizes = context.sizes
    torch.manual_seed(0)
    with torch.device(context.device):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=sizes.wide_head_dim,
            num_attention_heads=sizes.wide_heads, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=sizes.wide_rope_axes,
        )  # fmt: skip
    return transformer.to(torch.bfloat16).eval().requires_grad_(False)


def time_sampling(policy, context: Context) -> float:
    """Median seconds of one sample() call (timing_batch images, EXPLORE_STEPS Euler steps), after a warm-up call."""
    from rollout.samplers import sample

    batch = context.sizes.timing_batch
    prompts, seeds = (PROMPTS * batch)[:batch], list(range(batch))
    sample(policy, prompts, seeds, EXPLORE_STEPS)  # warm-up: compilation, cuBLAS heuristics, the prompt cache
    seconds = []
    for _ in range(context.sizes.timing_repeats):
        synchronize(context.device)
        start = time.perf_counter()
        sample(policy, prompts, seeds, EXPLORE_STEPS)
        synchronize(context.device)
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[len(seconds) // 2]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def linear_width(policy) -> int:
    return policy.transformer.config.num_attention_heads * policy.transformer.config.attention_head_dim


def image_tokens(policy) -> int:
    return (policy.latent_shape[1] // 2) * (policy.latent_shape[2] // 2)


# --- pytest and Ray ----------------------------------------------------------------------------------


def pytest_row(context: Context) -> Row:
    if importlib.util.find_spec("pytest") is None:
        return Row("skipped", "skipped: no pytest", {})
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests"]
    result = run_subprocess(command, context)
    summary = result["output_tail"].strip().splitlines()[-1] if result["output_tail"].strip() else ""
    return Row("pass" if result["returncode"] == 0 else "fail", f"pytest -m gpu: {summary}", result)


def ray_row(context: Context) -> Row:
    for module in ("ray", "deepspeed"):
        if importlib.util.find_spec(module) is None:
            return Row("skipped", f"skipped: no {module}", {})
    gpus = 0.0 if context.dry_run else 0.25
    output_dir = context.out / "ray_tiny_solrl"
    overrides = [
        "run.steps=2", f"run.output_dir={output_dir}", "run.resume=never", "algorithm.prompts_per_step=1", "algorithm.group_size=2",
        "sol.pool_size=4", "sol.explore_steps=2", "sampler.steps=2", "cluster.rollout_workers=1", "eval.enabled=false",
        "checkpoint.every=0", "logging.progress=false", "logging.grid_every=0",
        f"cluster.rollout_resources={{num_cpus: 0.5, num_gpus: {gpus}}}", f"cluster.learner_resources={{num_cpus: 0.75, num_gpus: {gpus}}}",
    ]  # fmt: skip
    result = run_subprocess([sys.executable, "-m", "solray.cli", "train", "recipes/tiny_solrl.yaml", *overrides], context)
    metrics = output_dir / "metrics.jsonl"
    steps = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    result |= {"num_gpus_per_actor": gpus, "steps_logged": steps}
    ok = result["returncode"] == 0 and steps == 2
    return Row(
        "pass" if ok else "fail", f"tiny_solrl, 2 steps, num_gpus {gpus} per rollout worker and learner: {steps} steps logged", result
    )


def run_subprocess(command: list[str], context: Context) -> dict:
    """Run from the repository root with the checkout importable; the command, exit status and last 4000 characters."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if context.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the same code on CPU, even on a machine with a GPU
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=context.sizes.subprocess_timeout_s, check=False
        )
        return {"command": command, "returncode": done.returncode, "output_tail": (done.stdout + done.stderr)[-4000:]}
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(errors="replace")
        return {
            "command": command,
            "returncode": None,
            "output_tail": output[-4000:] + f"\ntimed out after {context.sizes.subprocess_timeout_s} s",
        }


ROWS: dict[str, Callable[[Context], Row]] = {
    "device": device_row,
    **{f"family:{family}": family_row(family) for family in ("sd3", "flux", "sana")},
    "backends": backends_row,
    "speed:tiny": speed_row("tiny"),
    "speed:wide": speed_row("wide"),
    "pytest": pytest_row,
    "ray": ray_row,
}


if __name__ == "__main__":
    sys.exit(main())
