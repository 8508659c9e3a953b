"""The benchmark commands run end to end and print their figures (the figures themselves are never asserted)."""

from pathlib import Path

import pytest
import torch
from conftest import run_cli

from distgan.bench import write_photos


def test_compare_runs_both_loops_on_the_same_images_and_prints_the_ratio(tmp_path):
    # fp32: bf16 DCGAN-64 convolutions on a CPU without AVX-512 BF16 ran past 300 s for these 10 steps in CI
    # (bf16 is covered by the `train` test below, on the small digits model)
    write_photos(tmp_path / "images", 160)
    args = ["compare", "--images", str(tmp_path / "images"), "--steps", "10", "--precisions", "fp32", "--workers", "1"]
    result = run_cli("distgan.bench", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {
        line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith(("example", "distgan"))
    }
    assert set(lines) == {"example_fp32", "distgan_fp32"}
    assert lines["example_fp32"][-1] == "1.00x" and float(lines["distgan_fp32"][1]) > 0


def test_train_reports_rate_data_wait_and_peak_memory_per_setting(tmp_path):
    config = Path(__file__).parents[1] / "configs" / "digits32.yaml"
    args = ["train", "--config", str(config), "--steps", "9", "--window", "3", "--precisions", "fp32,bf16"]
    result = run_cli("distgan.bench", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["1"]]
    assert [row[1] for row in rows] == ["fp32", "bf16"]
    for row in rows:  # processes, precision, images/s, data wait, peak memory
        assert float(row[2]) > 0 and 0 <= float(row[3].rstrip("%")) < 100 and float(row[4]) > 0.1
        assert row[5:] == ["GB", "host", "RSS"]
    bad = run_cli("distgan.bench", "train", "--steps", "5", cwd=tmp_path)
    assert bad.returncode == 2 and "--steps must be >= 3 * --window (15)" in bad.stderr


def test_collectives_counts_each_networks_gradient_bytes_once_per_step(tmp_path):
    from distgan.config import load_config
    from distgan.models import build_models

    config = Path(__file__).parents[1] / "configs" / "digits32.yaml"
    result = run_cli("distgan.bench", "collectives", "--config", str(config), "--batch_size", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    G, D = build_models(load_config(str(config), {}).model)
    for name, net in (("D", D), ("G", G)):  # all-reduced in fp32, in the D step and the G step respectively
        mib = sum(p.numel() for p in net.parameters()) * 4 / 2**20
        assert f"{name} gradients: {mib:.2f} MiB in " in result.stdout
    bn_layers = sum(isinstance(m, torch.nn.BatchNorm2d) for m in (*G.modules(), *D.modules()))
    other = result.stdout.split("DDP bookkeeping): ")[1]
    assert int(other.split(" all_gather")[0].split()[-1]) >= bn_layers  # each synced BN layer gathers its stats


def test_metrics_benchmark_prints_both_formulas_of_one_class(tmp_path):
    import re

    result = run_cli("distgan.bench", "metrics", "--real", "60", "--fake", "50", "--features", "32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fid_kid within 10 classes" in result.stdout
    by_cov, by_rows = re.search(
        r"distance: ([\d.]+) \(covariances\), ([\d.]+) \(cross-product\)", result.stdout
    ).groups()
    assert float(by_cov) == pytest.approx(float(by_rows), rel=1e-3)  # the two formulas of one distance
