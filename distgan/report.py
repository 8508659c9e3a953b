"""Plots of a run from its run directory alone (metrics.jsonl and samples/), no W&B needed.

python -m distgan.report RUN_DIR    writes RUN_DIR/report/:
  losses.png         loss/D and loss/G over steps
  discriminator.png  D(x) and D(G(z)) before and after the D step, with 0.5, where they should drift, marked
  samples.png        the fixed-noise samples over training: one row of 8 per sample grid, oldest at the top
                     (image models; a 2-D point model's scatter plots are in samples/ and samples_ema/)
  eval_*.png         evaluation metrics logged every eval.every steps (digits score, modes, FID, precision and
                     recall, memorisation), when any; Inception metrics titled with what they were computed on
  nearest.png        the last evaluation's samples nearest to a training image above those images (eval pr)
Training writes it at the end (log.report).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from distgan.config import ConfigError, run_command
from distgan.files import atomic_write
from distgan.toy import MIXTURES

PLOT_SIZE = (800, 450)  # pixels
STRIP_ROWS = 8  # sample grids shown, evenly spaced over training
STRIP_COLUMNS = 8  # samples per grid shown (the first row of its 8x8 grid)
LABEL_WIDTH = 100  # pixels of the "step N" column
MIN_CELL = 64  # small samples are enlarged to at least this many pixels
GRID_PADDING = 2  # torchvision's make_grid default, used by tracking.Tracker.images
EVAL_PLOTS = (  # (metric keys and labels, title, file) of report/eval*.png, drawn when the run logged them
    ({"digits/fd": "Fréchet distance, digits classifier features"}, "Digits score of G_ema (lower is better)",
     "eval_digits.png"),
    ({"modes/covered": "modes covered"}, "Modes covered by G_ema", "eval_modes.png"),
    ({"eval/fid": "FID"}, "FID of G_ema", "eval_fid.png"),
    ({"eval/precision": "precision", "eval/recall": "recall"}, "Precision and recall of G_ema (k = 3)",
     "eval_precision_recall.png"),
    ({"eval/memorisation": "nearest-training distance / real-to-real distance (medians)",
      "eval/copies": "share of samples nearer than 99% of real pairs"}, "Memorisation by G_ema (1: none; 0: copies)",
     "eval_memorisation.png"),
)  # fmt: skip
FEATURE_PLOTS = ("eval_fid.png", "eval_precision_recall.png", "eval_memorisation.png")  # titled with provenance


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics rows in step order; a line cut short by a crash is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no metrics.jsonl: not a run directory, or no metrics row written yet")
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            rows[row["step"]] = row
        except (ValueError, KeyError, TypeError):
            continue
    if not rows:
        raise ConfigError(f"{path} holds no readable metrics row")
    return [rows[step] for step in sorted(rows)]


def plot(rows: list[dict], lines: dict[str, str], title: str, ylabel: str, path: Path, reference=None) -> None:
    """A PLOT_SIZE line plot of metrics over steps; reference = (y, label) draws a dashed horizontal line."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(PLOT_SIZE[0] / 100, PLOT_SIZE[1] / 100), dpi=100)
    ax = fig.add_subplot()
    for key, label in lines.items():
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), float | int)]
        points = [(x, y) for x, y in points if math.isfinite(y)]
        if points:
            ax.plot(*zip(*points), label=label, linewidth=1.2)
    if reference is not None:
        ax.axhline(reference[0], color="gray", linestyle="--", linewidth=1, label=reference[1])
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))


def sample_strip(grid_paths: list[Path], path: Path) -> None:
    """One row per grid: its first STRIP_COLUMNS samples, labelled with the grid's step.

    A grid that does not open (cut short by a crash) or differs in size from the first is left out with a warning.
    """
    from PIL import Image, ImageDraw

    picks = sorted({round(i * (len(grid_paths) - 1) / max(STRIP_ROWS - 1, 1)) for i in range(STRIP_ROWS)})
    rows, size = [], None
    for index in picks:
        grid_path = grid_paths[index]
        try:
            with Image.open(grid_path) as opened:
                grid = opened.convert("RGB")
        except OSError as e:
            print(f"distgan: warning: report leaves out {grid_path}: {e}", file=sys.stderr)
            continue
        if size is not None and grid.size != size:
            print(f"distgan: warning: report leaves out {grid_path}: {grid.size} pixels, not {size}", file=sys.stderr)
            continue
        size = grid.size
        cell = (grid.width - GRID_PADDING) // 8  # the grid is 8 samples wide, each sample square
        rows.append(
            (
                int(grid_path.stem.split("_")[-1]),
                grid.crop((0, 0, STRIP_COLUMNS * cell + GRID_PADDING, cell + GRID_PADDING)),
            )
        )
    if not rows:
        return
    scale = max(1, math.ceil(MIN_CELL / (cell - GRID_PADDING)))
    row_w, row_h = rows[0][1].width * scale, rows[0][1].height * scale
    strip = Image.new("RGB", (LABEL_WIDTH + row_w, row_h * len(rows)), "white")
    draw = ImageDraw.Draw(strip)
    for i, (step, row) in enumerate(rows):
        strip.paste(row.resize((row_w, row_h), Image.Resampling.NEAREST), (LABEL_WIDTH, i * row_h))
        draw.text((6, i * row_h + row_h // 2 - 6), f"step {step}", fill="black")
    atomic_write(path, lambda f: strip.save(f, format="PNG"))


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report/*.png and return the report folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    rows = read_metrics(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    plot(rows, {"loss/D": "D", "loss/G": "G"}, "Losses", "loss", out / "losses.png")
    plot(
        rows,
        {"D/real": "D(x)", "D/fake_before": "D(G(z)) before the D step", "D/fake_after": "D(G(z)) after the D step"},
        "Discriminator outputs (mean probability of 'real')",
        "D",
        out / "discriminator.png",
        reference=(0.5, "0.5: D cannot tell real from fake"),
    )
    for keys, title, name in EVAL_PLOTS:
        if any(key in row for row in rows for key in keys):
            plot(rows, keys, title + (provenance(rows) if name in FEATURE_PLOTS else ""), "", out / name)
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    if grids and not _generates_points(run_dir):
        sample_strip(grids, out / "samples.png")
    nearest = sorted((run_dir / "nearest").glob("step_*.png"))
    if nearest:  # the last evaluation's samples nearest to a training image (top row) above those images
        atomic_write(out / "nearest.png", nearest[-1].read_bytes())
    return out


def provenance(rows: list[dict]) -> str:
    """What the Inception metrics of the run were computed on (the last evaluation's), as a title's second line."""
    last = next((row for row in reversed(rows) if "eval/num_fake" in row), None)
    if last is None:
        return ""
    network = str(last.get("eval/network", "?")).removeprefix("inception sha256 ")[:12]
    return (f"\n{last['eval/num_fake']:,} samples vs {last.get('eval/num_real', 0):,} real images "
            f"(reference {last.get('eval/reference', '?')}, network {network})")  # fmt: skip


def _generates_points(run_dir: Path) -> bool:
    """Whether the run's saved config is a 2-D point model (its sample "grids" are scatter plots)."""
    import yaml

    try:
        source = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["source"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return False
    return source in MIXTURES


def main(run_dir: str) -> None:
    out = write_report(run_dir)
    for path in sorted(out.glob("*.png")):
        print(path)


USAGE = """usage: python -m distgan.report RUN_DIR

Writes RUN_DIR/report/: losses.png, discriminator.png (D(x), D(G(z)) and the 0.5 reference) and samples.png
(the fixed-noise samples over training), from the run's metrics.jsonl and samples/.
"""


def cli(argv: list[str] | None = None) -> None:
    run_command(main, "distgan.report", sys.argv[1:] if argv is None else argv, usage=USAGE)


if __name__ == "__main__":
    cli()
