"""Evaluate a checkpoint's generator from the command line.

    python -m distgan.eval --checkpoint FILE [--metrics=fid,kid,pr,classes,digits,modes,fgsm] [--num_samples N]
                           [--num_real N] [--ema true|false] [--inception_weights FILE] [--out FILE.json]
                           [--nearest FILE.png]

fid, kid and pr (precision, recall, memorisation) are computed on Inception features of --num_samples samples
against --num_real real images (eval.num_real); every figure is printed with that provenance: the numbers of
images, the reference set's cache key and the network's sha256. --nearest writes the samples nearest to a
training image above those images. classes (a conditional model's) fits a linear classifier on the real images'
features, held-out images aside, and reports how often the samples asked for each class are classified as it,
beside how often the held-out real images are (eval/classes.py).

Runs in one process or under torchrun / accelerate launch: every rank generates its share of the samples and
extracts their features; the results are gathered so that every rank computes the same numbers and rank 0
prints them (and writes --out). With no --metrics, the checkpoint's own eval.metrics (auto: digits for the
digits, modes for ring8/grid25). Training calls the same Evaluator every eval.every steps.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from distgan.config import EVAL_METRICS, Config, ConfigError, check_metrics, eval_metrics, first_line, flag, run_command
from distgan.dist import Runtime
from distgan.eval.evaluator import NEAREST_SHOWN, Evaluator
from distgan.files import atomic_write, output_file, write_or_exit
from distgan.state import load_models


def parse_metrics(metrics: str | list | tuple | None, cfg: Config) -> list[str]:
    """--metrics fid,kid or a list; None: the checkpoint's eval.metrics."""
    if metrics is None:
        return eval_metrics(cfg)
    names = metrics.split(",") if isinstance(metrics, str) else [str(m) for m in metrics]
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in EVAL_METRICS or n == "auto"]
    if unknown:
        raise ConfigError(f"--metrics: unknown {unknown}; choose from {', '.join(EVAL_METRICS[1:])}")
    return names


def main(
    checkpoint: str,
    metrics: str | None = None,
    num_samples: int | None = None,
    ema: bool = True,
    inception_weights: str | None = None,
    out: str | None = None,
    batch_size: int | None = None,
    num_real: int | None = None,
    nearest: str | None = None,
) -> None:
    """Evaluate a checkpoint's generator (see the module docstring)."""
    ema = flag(ema, "ema")
    outputs = {"out": (out, (".json",)), "nearest": (nearest, (".png",))}
    outputs = {name: output_file(value, name, suffixes) for name, (value, suffixes) in outputs.items() if value}
    if not Path(checkpoint).is_file():
        raise ConfigError(f"checkpoint not found: {checkpoint}")
    try:
        cfg, G, D, which = load_models(checkpoint, ema)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot load checkpoint {checkpoint}: {first_line(e)}") from None
    for key, value in (("num_samples", num_samples), ("batch_size", batch_size), ("num_real", num_real)):
        if value is not None:
            if value < 2:
                raise ConfigError(f"--{key} must be >= 2; got {value}")
            setattr(cfg.eval, key, value)
    names = parse_metrics(metrics, cfg)
    if not names:
        raise ConfigError(f"no metrics to compute for data.source '{cfg.data.source}': pass --metrics=...")
    check_metrics(names, cfg, "--metrics")
    if nearest is not None and "pr" not in names:
        raise ConfigError("--nearest shows the samples nearest to training images, which --metrics pr finds: add pr")
    if inception_weights is not None:
        cfg.eval.inception_weights = str(inception_weights)
    runtime = Runtime(cfg)  # the checkpoint's run.device and dist.timeout_s
    evaluator = Evaluator(cfg, names, runtime)
    G, D = G.to(runtime.device), D.to(runtime.device)
    real = real_labels = None
    if "fgsm" in names:
        from distgan.data import build_source, to_model_input

        cfg.train.batch_size = math.ceil(cfg.train.batch_size / runtime.world) * runtime.world
        batch = next(build_source(cfg, runtime.rank, runtime.world))
        real, real_labels = to_model_input(batch.samples, runtime.device), batch.labels.to(runtime.device)
    results = evaluator(G, D, real, real_labels if cfg.model.conditional else None)
    if runtime.is_main:
        print(f"{checkpoint} ({which}, {cfg.eval.num_samples} samples):")
        for key, value in results.items():
            print(f"  {key:<28} {value if isinstance(value, str) else format(value, '.6g')}")
        if "out" in outputs:
            record = {"checkpoint": str(checkpoint), "generator": which, "num_samples": cfg.eval.num_samples}
            with write_or_exit(outputs["out"]):
                atomic_write(outputs["out"], json.dumps({**record, "metrics": results}, indent=2) + "\n")
        if "nearest" in outputs and evaluator.nearest_grid is not None:
            from distgan.grid import make_grid, save_png

            grid = make_grid(evaluator.nearest_grid, nrow=NEAREST_SHOWN, value_range=(-1, 1))
            with write_or_exit(outputs["nearest"]):
                atomic_write(outputs["nearest"], lambda f: save_png(grid, f))
            print(f"samples (top row) and their nearest training images (bottom row): {nearest}")
    runtime.close()


def cli(argv: list[str] | None = None) -> None:
    run_command(main, "distgan.eval", sys.argv[1:] if argv is None else argv, usage=__doc__)


if __name__ == "__main__":
    cli()
