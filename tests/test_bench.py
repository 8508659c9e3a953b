"""The benchmark commands run end to end and print their figures (the figures themselves are never asserted)."""

from conftest import run_cli

from distgan.bench import write_photos


def test_compare_runs_both_loops_on_the_same_images_and_prints_the_ratio(tmp_path):
    write_photos(tmp_path / "images", 160)
    args = ["compare", "--images", str(tmp_path / "images"), "--steps", "10", "--precisions", "bf16", "--workers", "1"]
    result = run_cli("distgan.bench", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {
        line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith(("example", "distgan"))
    }
    assert set(lines) == {"example_fp32", "distgan_bf16"}
    assert lines["example_fp32"][-1] == "1.00x" and float(lines["distgan_bf16"][1]) > 0
