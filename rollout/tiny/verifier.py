"""Programmatic verifier of the tiny world: detect objects, then check them against the prompt.

Detection: each pixel takes the nearest of {background, palette colours}; the connected components
of each colour (4-connectivity, at least MIN_AREA pixels) are the objects; an object's shape is the
template (`shape_mask` at the component's bounding box) with the highest IoU, or None below MIN_IOU.

Scoring: a list of checks, each in [0, 1], whose mean is scaled by a clutter factor:
  every object spec:  the shape is present; its colour matches (when the prompt names one);
                      counting only: 1 - |found - n| / n, floored at 0
  position:           some (A, B) pair satisfies the relation on its dominant axis
  clutter factor:     min(asked, found) / max(asked, found) over all objects (0 for an empty image)
The reward is mean(checks) x clutter factor (partial credit in [0, 1]); without the factor, noise
full of coloured blobs would collect the "present" checks. A strict pass means every check is 1 and
the object count is exact (reward == 1.0): the eval metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rollout.tiny.world import BACKGROUND, COLORS, SHAPES, ParsedPrompt, parse_prompt, shape_mask

MIN_AREA = 12
MIN_IOU = 0.5
_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)
_COLOR_NAMES = list(COLORS)


@dataclass(frozen=True)
class DetectedObject:
    shape: str | None
    color: str
    cy: float
    cx: float
    area: int


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """Objects in a uint8 [H, W, 3] image, in scan order."""
    # imported here: `import rollout` (loading any model) must not need scipy, which only the verifier uses
    from scipy import ndimage

    distances = ((image[:, :, None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)
    labels = distances.argmin(-1)
    objects = []
    for color_index, color in enumerate(_COLOR_NAMES, start=1):
        components, count = ndimage.label(labels == color_index)
        for slc in ndimage.find_objects(components):
            component = components[slc] > 0
            area = int(component.sum())
            if area < MIN_AREA:
                continue
            height, width = component.shape
            ious = [_iou(component, shape_mask(shape, height, width)) for shape in SHAPES]
            best = int(np.argmax(ious))
            ys, xs = np.nonzero(component)
            objects.append(
                DetectedObject(
                    shape=SHAPES[best] if ious[best] >= MIN_IOU else None,
                    color=color,
                    cy=float(slc[0].start + ys.mean()),
                    cx=float(slc[1].start + xs.mean()),
                    area=area,
                )
            )
    return objects


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _relation_holds(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    dy, dx = b.cy - a.cy, b.cx - a.cx
    return {
        "left of": dx > abs(dy),
        "right of": -dx > abs(dy),
        "above": dy > abs(dx),
        "below": -dy > abs(dx),
    }[relation]


def prompt_checks(parsed: ParsedPrompt, objects: list[DetectedObject]) -> list[float]:
    checks: list[float] = []
    for spec in parsed.objects:
        of_shape = [o for o in objects if o.shape == spec.shape]
        checks.append(float(bool(of_shape)))
        if spec.color is not None:
            checks.append(float(any(o.color == spec.color for o in of_shape)))
        if parsed.task == "counting":
            checks.append(max(0.0, 1.0 - abs(len(of_shape) - spec.count) / spec.count))
    if parsed.relation is not None:
        first, second = ([o for o in objects if o.shape == spec.shape] for spec in parsed.objects)
        checks.append(float(any(_relation_holds(a, b, parsed.relation) for a in first for b in second)))
    return checks


def clutter_factor(parsed: ParsedPrompt, objects: list[DetectedObject]) -> float:
    asked = sum(spec.count for spec in parsed.objects)
    return min(asked, len(objects)) / max(asked, len(objects))


def verify(image: np.ndarray, prompt: str) -> float:
    """Partial-credit score in [0, 1] of a uint8 [H, W, 3] image against a tiny-world prompt."""
    parsed, objects = parse_prompt(prompt), detect_objects(image)
    return float(np.mean(prompt_checks(parsed, objects)) * clutter_factor(parsed, objects))


def strict_pass(image: np.ndarray, prompt: str) -> bool:
    return verify(image, prompt) == 1.0
