"""A dense prompt-alignment score for the tiny world: the verifier's checks made continuous.

The strict verifier (rollout.tiny.verifier) is the eval metric, as GenEval is for real models; it is
discrete, so many seeds of a prompt tie. This score plays the role PickScore or ImageReward play for
real models: a continuous signal that ranks almost every pair of images and rises as an image gets
closer to passing.

Notation
  c                a candidate object: a connected component (4-connectivity, >= MIN_PIXELS) of the
                   pixels whose nearest palette colour is one colour (as the verifier detects objects)
  iou(c, s)        IoU of c with shape s's template at c's bounding box
  shape(c, s)      iou(c, s) * (iou(c, s) / max_s' iou(c, s'))^4: a square also overlaps a circle's
                   template (IoU ~0.8), so the best-fitting other shape takes most of the credit away
  hue(c, k)        mean over c's pixels of exp(-||pixel - COLORS[k]||^2 / (2 COLOR_SIGMA^2)): 1 for exact
                   palette colour, falling smoothly as the colour drifts
  size(c)          min(1, area / FULL_AREA): fragments score less than a drawn object
  match(c, spec)   shape(c, spec.shape) * size(c) * (hue(c, spec.color) if the prompt names one, else 1)
  relation(a, b)   sigmoid((d_axis - |d_other|) / RELATION_SCALE) of the centroids' offsets along
                   the relation's axis and across it (the verifier checks d_axis > |d_other|)
  exclusive        pixels of the assigned objects / all non-background pixels (0 on an empty image)

score = mean(checks) * exclusive, in [0, 1], where the checks are each requested object's match (for
"two circles": the mean over its 2 best distinct circles) and, for position prompts, the relation;
objects are assigned to the prompt's objects, one each, to maximise mean(checks).

Measured on the shipped base (24 eval prompts x 32 seeds, 10 Euler steps): 1.6% of same-prompt seed
pairs tie (the verifier: most), Spearman 0.72 with the verifier's partial credit, and it ranks a
strict pass above a failure 95% of the time (AUC 0.946). Ground-truth renders score 0.85-1.0 (0.97
on average), the render of another prompt of the same task type 0.24 on average.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import ndimage

from rollout.tiny.verifier import _PALETTE
from rollout.tiny.world import COLORS, SHAPES, ParsedPrompt, parse_prompt, shape_mask

MIN_PIXELS = 4
FULL_AREA = 50  # a 9-px object of the world covers 63 (cross) to 81 (square) pixels
COLOR_SIGMA = 40.0
RELATION_SCALE = 3.0
SHAPE_SHARPNESS = 4
_COLOR_VALUES = {name: np.array(rgb, dtype=np.float32) for name, rgb in COLORS.items()}
_RELATION_AXES = {"left of": (1, 1), "right of": (1, -1), "above": (0, 1), "below": (0, -1)}  # (axis of B - A, sign)


class Candidate:
    """One connected component and what the score needs of it."""

    def __init__(self, pixels: np.ndarray, mask: np.ndarray, offset: tuple[int, int]) -> None:
        height, width = mask.shape
        self.area = int(mask.sum())
        self.iou = {shape: _iou(mask, shape_mask(shape, height, width)) for shape in SHAPES}
        self.hue = {
            name: float(np.exp(-((pixels - rgb) ** 2).sum(-1) / (2 * COLOR_SIGMA**2)).mean()) for name, rgb in _COLOR_VALUES.items()
        }
        ys, xs = np.nonzero(mask)
        self.centre = (offset[0] + float(ys.mean()), offset[1] + float(xs.mean()))
        self.size = min(1.0, self.area / FULL_AREA)

    def match(self, shape: str, color: str | None) -> float:
        fit = self.iou[shape] * (self.iou[shape] / max(max(self.iou.values()), 1e-9)) ** SHAPE_SHARPNESS
        return fit * self.size * (1.0 if color is None else self.hue[color])


def candidates(image: np.ndarray) -> tuple[list[Candidate], int]:
    """The candidate objects of a uint8 [H, W, 3] image, and its count of non-background pixels."""
    pixels = image.astype(np.float32)
    labels = ((pixels[:, :, None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)
    found = []
    for color_index in range(1, len(_PALETTE)):
        components, _ = ndimage.label(labels == color_index)
        for index, slc in enumerate(ndimage.find_objects(components), start=1):
            mask = components[slc] == index
            if mask.sum() >= MIN_PIXELS:
                found.append(Candidate(pixels[slc][mask], mask, (slc[0].start, slc[1].start)))
    return found, int((labels != 0).sum())


def alignment(image: np.ndarray, prompt: str) -> float:
    """The dense score in [0, 1] of a uint8 [H, W, 3] image against a tiny-world prompt (module docstring)."""
    parsed = parse_prompt(prompt)
    objects, foreground = candidates(image)
    slots = [(spec.shape, spec.color) for spec in parsed.objects for _ in range(spec.count)]
    if not objects or foreground == 0:
        return 0.0
    if len(parsed.objects) == 1:  # one spec (n copies of it): its n best candidates
        order = sorted(range(len(objects)), key=lambda i: -objects[i].match(*slots[0]))
        assignments = [tuple(order[: len(slots)])]
    else:  # two specs: every assignment of distinct candidates (or none, -1) to the two objects
        assignments = [pair for pair in itertools.product(range(-1, len(objects)), repeat=2) if pair[0] != pair[1] or pair[0] == -1]
    best, best_used = max((_checks(parsed, slots, [objects[i] if i >= 0 else None for i in chosen]), chosen) for chosen in assignments)
    exclusive = sum(objects[i].area for i in best_used if i >= 0) / foreground
    return float(best * exclusive)


def _checks(parsed: ParsedPrompt, slots: list[tuple[str, str | None]], assigned: list[Candidate | None]) -> float:
    """mean(checks) for one assignment: per object spec its slots' mean match (missing objects 0), plus the relation."""
    assigned = assigned + [None] * (len(slots) - len(assigned))
    matches = [0.0 if candidate is None else candidate.match(*slot) for slot, candidate in zip(slots, assigned)]
    checks, start = [], 0
    for spec in parsed.objects:
        checks.append(float(np.mean(matches[start : start + spec.count])))
        start += spec.count
    if parsed.relation is not None:
        checks.append(0.0 if None in assigned else _relation(parsed.relation, assigned[0], assigned[1]))
    return float(np.mean(checks))


def _relation(relation: str, a: Candidate, b: Candidate) -> float:
    axis, sign = _RELATION_AXES[relation]
    offset = (b.centre[0] - a.centre[0], b.centre[1] - a.centre[1])
    margin = sign * offset[axis] - abs(offset[1 - axis])
    return 1.0 / (1.0 + math.exp(-margin / RELATION_SCALE))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))
