"""Static activation scales for NVFP4 explore copies: a fixed calibration forward loop and max calibration.

Why: with a per-tensor activation scale computed in each forward, the scale spans the whole batch,
so a seed's explore image depends on its batch-mates. Deployed NVFP4 (modelopt's NVFP4 configs,
TensorRT-LLM) instead calibrates one static amax per quantized input; the per-block E4M3 scales stay
dynamic. With a static amax every row is quantized on its own, and "seed alone == seed inside a
batch" holds for explore images.

The forward loop samples every (prompt, seed) pair of a `CalibrationSet` with the explore sampler
(deterministic ODE, the explore steps), so the transformer sees its inputs at exactly the timesteps
exploration uses. Both backends run the same loop on the high-precision (bf16) model with every
quantizer off and keep, per quantized linear, max |x| over every input seen ("max" calibration):
  emulate   NVFP4Linear in calibrating mode
  modelopt  mtq.quantize / mtq.calibrate(algorithm="max", forward_loop=...)
`quant.explore.quantize_policy` calibrates once; `requantize` recalibrates after every weight sync,
because the new weights move the activations (its reported time includes the loop).
Inputs that exceed the calibrated amax at explore time saturate at +-amax (see quant.nvfp4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rollout.policy import Policy
from rollout.samplers import sample

CALIBRATION_SOLVERS = ("euler", "dpm2")
DEFAULT_SEEDS = (0, 1)
EXPLORE_STEPS = 6  # Sol-RL's explore sampler: deterministic ODE, 6 steps
# For families without their own calibration_prompts: a few varied prompts (objects, counts, colours, positions, scenes, text).
GENERIC_PROMPTS = (
    "a photo of a red apple next to a blue cup on a wooden table",
    "three dogs playing in the snow",
    "a portrait of an old fisherman, dramatic lighting",
    "a watercolor painting of a lighthouse at sunset",
    "a green bicycle to the left of a yellow car",
    "a bowl of ramen, top-down view, studio photo",
    "a futuristic city skyline at night with neon signs",
    'a wooden sign that says "OPEN" hanging on a door',
)


@dataclass(frozen=True)
class CalibrationSet:
    """The fixed calibration forward loop: every (prompt, seed) pair, sampled with `steps` steps of `solver`."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    steps: int = EXPLORE_STEPS
    solver: str = "euler"
    batch_size: int | None = None  # splits the forward passes to bound memory; None = all pairs at once

    def __post_init__(self) -> None:
        if not self.prompts or not self.seeds:
            raise ValueError("a calibration set needs at least one prompt and one seed")
        if self.steps < 1:
            raise ValueError(f"calibration steps must be >= 1, got {self.steps}")
        if self.solver not in CALIBRATION_SOLVERS:
            raise ValueError(f"calibration solver must be a deterministic ODE solver {CALIBRATION_SOLVERS}, got {self.solver!r}")

    @property
    def num_images(self) -> int:
        return len(self.prompts) * len(self.seeds)

    def run(self, policy: Policy) -> None:
        """The forward loop: sample every pair with `policy` (its quantizers switched off by the caller)."""
        pairs = [(prompt, seed) for prompt in self.prompts for seed in self.seeds]
        sample(policy, [p for p, _ in pairs], [s for _, s in pairs], self.steps, solver=self.solver, batch_size=self.batch_size)

    def to_dict(self) -> dict:
        return {**asdict(self), "prompts": list(self.prompts), "seeds": list(self.seeds), "num_images": self.num_images}


def default_calibration_set(policy: Policy | type[Policy], steps: int = EXPLORE_STEPS, solver: str = "euler") -> CalibrationSet:
    """The default loop at the explore sampler's `steps` and `solver` (pass the recipe's): the family's
    `calibration_prompts` (the tiny testbed: two train prompts per task type), else GENERIC_PROMPTS; seeds DEFAULT_SEEDS."""
    return CalibrationSet(tuple(policy.calibration_prompts or GENERIC_PROMPTS), steps=steps, solver=solver)
