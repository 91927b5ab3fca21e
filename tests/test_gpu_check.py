"""bench/gpu_check.py on CPU (--dry-run): the GPU check's code runs here, so that a first GPU run fails only for GPU reasons."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAST_ROWS = ["device", "family:sd3", "backends", "speed:tiny", "speed:wide"]
SOLVERS = ["euler", "dpm2", "sde", "cps"]


def gpu_check(out: Path, *options: str, timeout: int) -> tuple[subprocess.CompletedProcess, dict | None]:
    command = [sys.executable, "bench/gpu_check.py", "--out", str(out), *options]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"), check=False
    )
    path = out / "gpu_check.json"
    return result, json.loads(path.read_text()) if path.exists() else None


def test_dry_run_passes_and_reports_the_numbers(tmp_path):
    result, report = gpu_check(tmp_path, "--dry-run", "--rows", ",".join(FAST_ROWS), timeout=420)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (report["dry_run"], report["device"], report["passed"], list(report["rows"])) == (True, "cpu", True, FAST_ROWS)
    assert all(row["status"] == "pass" and row["seconds"] > 0 for row in report["rows"].values())

    picks = report["rows"]["device"]["data"]["auto_picks"]
    assert {name: (pick["precision"], pick["backend"]) for name, pick in picks.items()} == {
        "nvfp4": ("nvfp4", "emulate"), "nvfp4 + allow_fp8": ("nvfp4", "emulate"), "fp8": ("fp8", "emulate"),
    }  # fmt: skip
    assert picks["fp8"]["reason"] == "no fp8 GEMM on cpu: torch's scaled matmul kernels are CUDA's; emulation in pure torch"

    family = report["rows"]["family:sd3"]["data"]
    assert all(family[f"sample_{solver}_finite"] for solver in SOLVERS)
    assert family["alone_vs_batch_mean_abs_pixel"] <= 1.0
    # on CPU the first GRPO step recomputes exactly what was sampled: ratio 1, nothing clipped
    assert family["grpo_first_step_max_abs_log_ratio"] < 1e-6 and family["grpo/clipfrac"] == 0.0
    assert family["grpo_weights_moved"] and family["nft_weights_moved"] and family["nft_grad_norm"] > 0

    backends = report["rows"]["backends"]["data"]
    fp8 = backends["fp8/scaled_mm vs emulate"]
    assert fp8["runs"] == "reference formula"
    # FP8: one set of codes and one formula; NVFP4: the same codes, without emulate's bf16 rounding of the operands
    assert (
        fp8["max_abs_quantized_weight_difference"] == fp8["max_abs_quantized_input_difference"] == fp8["max_abs_velocity_difference"] == 0.0
    )
    nvfp4 = backends["nvfp4/scaled_mm vs emulate"]
    assert 0 < nvfp4["max_abs_quantized_weight_difference"] < 1e-3 and 0 < nvfp4["relative_velocity_difference"] < 0.1
    assert backends["skipped"] == ["nvfp4/modelopt: modelopt's dynamic NVFP4 block quantizer asserts CUDA tensors"]

    for size, width in (("tiny", 32), ("wide", 64)):
        speed = report["rows"][f"speed:{size}"]["data"]
        assert speed["width"] == width and speed["steps"] == 6
        assert set(speed["seconds_per_call"]) == {
            "bf16",
            "nvfp4/emulate (emulate)",
            "nvfp4/scaled_mm (reference formula)",
            "fp8/emulate (emulate)",
            "fp8/scaled_mm (reference formula)",
        }
        assert all(seconds > 0 for seconds in speed["seconds_per_call"].values())
    assert "PASS in" in result.stdout


def test_without_cuda_the_device_row_fails_and_says_why(tmp_path):
    result, report = gpu_check(tmp_path, "--rows", "device", timeout=300)
    assert result.returncode == 1
    assert report["rows"]["device"]["status"] == "fail" and "sees no CUDA device" in report["rows"]["device"]["detail"]
    assert "FAIL: device" in result.stdout


def test_unknown_rows_are_refused_with_the_known_ones(tmp_path):
    result, report = gpu_check(tmp_path, "--dry-run", "--rows", "device,speed:huge", timeout=300)
    assert result.returncode == 2 and report is None
    assert (
        "unknown rows ['speed:huge']; rows are: device, family:sd3, family:flux, family:sana, backends, speed:tiny, speed:wide, pytest, ray"
        in result.stderr
    )


@pytest.mark.slow
def test_full_dry_run_passes_every_row(tmp_path):
    result, report = gpu_check(tmp_path, "--dry-run", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    statuses = {name: row["status"] for name, row in report["rows"].items()}
    expected_ray = "pass" if all(importlib.util.find_spec(module) for module in ("ray", "deepspeed")) else "skipped"
    assert statuses == {"device": "pass", "family:sd3": "pass", "family:flux": "pass", "family:sana": "pass", "backends": "pass",
                        "speed:tiny": "pass", "speed:wide": "pass", "pytest": "pass", "ray": expected_ray}  # fmt: skip
    assert "skipped" in report["rows"]["pytest"]["detail"]  # without CUDA every gpu test skips
