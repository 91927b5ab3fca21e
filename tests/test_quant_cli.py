"""`solray sample --precision nvfp4` and the side-by-side precision grid."""

import numpy as np
from PIL import Image

from solray.cli import main


def test_sample_nvfp4_with_a_bf16_comparison_grid(tmp_path, capsys):
    main(["sample", "--prompt", "a red circle", "--prompt", "two squares", "--seed", "0-2", "--steps", "2", "--precision", "nvfp4",
          "--compare-precision", "bf16", "--out", str(tmp_path), "--scale", "2"])  # fmt: skip

    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    compare = np.asarray(Image.open(tmp_path / "compare.png"))
    gap = 4 * 2
    assert compare.shape == (grid.shape[0], 2 * grid.shape[1] + gap, 3)
    assert np.array_equal(compare[:, : grid.shape[1]], grid)  # left: the run's own precision
    assert (compare[:, grid.shape[1] : grid.shape[1] + gap] == 255).all()
    out = capsys.readouterr().out
    assert "left nvfp4, right bf16 (same seeds)" in out and "verifier reward: nvfp4" in out
