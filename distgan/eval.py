"""Evaluate a generator: FID/KID, the digits score, ring/grid mode coverage and an FGSM probe of D.

    python -m distgan.eval --checkpoint FILE [--metrics=fid,kid,digits,modes,fgsm] [--num_samples N]
                           [--ema true|false] [--inception_weights FILE] [--out FILE.json]

Runs in one process or under torchrun / accelerate launch: every rank generates its share of the samples and
extracts their features; the results are gathered so that every rank computes the same numbers and rank 0
prints them (and writes --out). With no --metrics, the checkpoint's own eval.metrics (auto: digits for the
digits, modes for ring8/grid25). Training calls the same Evaluator every eval.every steps.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distgan import rng
from distgan.config import (
    EVAL_METRICS,
    Config,
    ConfigError,
    check_metrics,
    eval_metrics,
    first_line,
    flag,
    is_points,
    run_command,
)
from distgan.dist import Runtime
from distgan.files import atomic_write
from distgan.models import classes_in_turn, generate_in_batches
from distgan.state import load_models

# Part of every reference-feature cache key: change it whenever the way real images become features changes
# (reading, resizing, quantising, the extractor's input handling), so that no stale cache is reused.
FEATURES_VERSION = "reference-features-v2"  # v2: with class labels; a folder's set spread over its files


class Evaluator:
    """The metrics of one run's generator; every rank calls it at the same points and gets the same numbers.

    The latent vectors are fixed (rng.eval_noise), so evaluations at different steps differ only by the
    generator. The Inception network and the reference features are loaded once, on first use. `extractor`
    replaces Inception for FID/KID (a small stand-in network in tests); `extractor_id` then names it in the
    reference cache key.
    """

    def __init__(
        self,
        cfg: Config,
        metrics: list[str],
        runtime: Runtime | None = None,
        extractor: nn.Module | None = None,
        extractor_id: str = "",
    ):
        if extractor is not None and not extractor_id:
            raise ValueError("a stand-in feature extractor needs an extractor_id for the reference cache key")
        self.cfg, self.metrics = cfg, list(metrics)
        self.runtime = runtime or Runtime.single()
        self.rank, self.world, self.device = self.runtime.rank, self.runtime.world, self.runtime.device
        self.z = rng.eval_noise(cfg.run.seed, cfg.eval.num_samples, cfg.model.nz)  # (N, nz)
        # A conditional G is asked for the classes in turn: sample i of class i % K, every class (nearly) equally.
        k = cfg.model.num_classes if cfg.model.conditional else 0
        self.labels = classes_in_turn(cfg.eval.num_samples, k) if k else None
        self._warned_classes = False  # the warning about classes left out of intra-FID, once a run
        self._extractor, self._extractor_id = extractor, extractor_id
        self._real_features: tuple[torch.Tensor, torch.Tensor] | None = None  # (N, F) features, (N,) classes
        if {"fid", "kid"} & set(self.metrics) and extractor is None:
            from distgan.fid import INCEPTION_SHA256, inception_weights_path, load_inception

            # Found, hash-checked and built now, not at the first evaluation; the layers' initialisation (before the
            # file's weights replace it) must not draw from the training's RNG.
            with self._own_rng():
                self._extractor = load_inception(inception_weights_path(cfg.eval.inception_weights))
            self._extractor_id = f"inception {INCEPTION_SHA256}"

    def _own_rng(self):
        """Evaluation draws nothing from the global RNGs that training uses (an exact resume depends on them)."""
        cuda = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=cuda)

    def local_samples(self, G: nn.Module) -> torch.Tensor:
        """This rank's share of the evaluation samples, (n, C, H, W) images or (n, 2) points, on the device."""
        from distgan.fid import split_for_rank

        share = split_for_rank(self.cfg.eval.num_samples, self.rank, self.world)
        labels = self.labels[share.start : share.stop] if self.labels is not None else None
        return generate_in_batches(G, self.z[share.start : share.stop], labels, self.cfg.eval.batch_size, self.device)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's rows in rank order, on the CPU of every rank (every rank must call it)."""
        return torch.cat(self.runtime.gather_objects(local.cpu()))

    def __call__(
        self, G: nn.Module, D: nn.Module | None = None, real: torch.Tensor | None = None, real_labels=None
    ) -> dict[str, float]:
        """The metrics of G (G_ema, usually); D and a batch of real model inputs (with their classes, for a
        conditional D) for the FGSM probe."""
        with self._own_rng():
            return self._evaluate(G, D, real, real_labels)

    def timed(
        self, G: nn.Module, D: nn.Module | None = None, real: torch.Tensor | None = None, real_labels=None
    ) -> dict[str, float]:
        """The metrics and `eval/seconds`, this rank's time for them (training logs rank 0's)."""
        started = time.perf_counter()
        results = self(G, D, real, real_labels)
        return {**results, "eval/seconds": time.perf_counter() - started}

    def _evaluate(self, G: nn.Module, D: nn.Module | None, real: torch.Tensor | None, real_labels) -> dict[str, float]:
        local = self.local_samples(G)
        results: dict[str, float] = {}
        if "digits" in self.metrics or "modes" in self.metrics:
            samples = self.gather(local)
            if "digits" in self.metrics:
                from distgan.digits_score import default_scorer

                scorer = default_scorer()
                results.update(scorer.score(samples))
                if self.labels is not None:
                    correct = scorer.classify(samples) == self.labels
                    results.update(class_accuracy(correct, self.labels, self.cfg.model.num_classes))
                    results.update(scorer.class_scores(samples, self.labels))
            if "modes" in self.metrics:
                from distgan.toy import asked_mode_hits, mode_metrics

                modes = mode_metrics(samples, self.cfg.data.source)
                results["modes/covered"] = float(modes["modes_covered"])
                results["modes/hit"] = float(modes["modes_hit"])
                results["modes/high_quality"] = float(modes["high_quality"])
                results["modes/kl"] = float(modes["mode_kl"])
                if self.labels is not None:
                    hits = asked_mode_hits(samples, self.labels, self.cfg.data.source)
                    results.update(class_accuracy(hits, self.labels, self.cfg.model.num_classes))
        if {"fid", "kid"} & set(self.metrics):
            results.update(self.fid_kid(local))
        if "fgsm" in self.metrics:
            if D is None or real is None:
                raise ValueError("the fgsm probe needs D and a batch of real inputs")
            from distgan.adversarial import probe

            # Each rank probes its own real batch; the means over ranks are the global means (equal batch sizes).
            bounds = (-math.inf, math.inf) if is_points(self.cfg) else (-1.0, 1.0)
            if self.labels is not None:
                if real_labels is None:
                    raise ValueError("the fgsm probe of a conditional D needs the real batch's classes")
                from distgan.models import WithClasses

                D = WithClasses(D, real_labels.to(self.device))
            elif self.cfg.model.pack > 1:
                from distgan.models import Packed

                D = Packed(D, self.cfg.model.pack)
            local_probe = probe(D, [real], lo=bounds[0], hi=bounds[1])
            means = self.runtime.mean(torch.tensor(list(local_probe.values()), device=self.device, dtype=torch.float64))
            results.update(zip(local_probe, means.tolist()))
        return results

    def fid_kid(self, local: torch.Tensor) -> dict[str, float]:
        from distgan.fid import extract_features, fid_kid, fid_kid_by_class, to_inception_input

        self._extractor.to(self.device)
        batches = (to_inception_input(chunk) for chunk in local.split(self.cfg.eval.batch_size))
        fake = extract_features(self._extractor, batches, self.runtime)  # every rank's, in the order of self.labels
        if self._real_features is None:
            self._real_features = self._reference()
        real, real_labels = self._real_features
        scores = fid_kid(real, fake)
        out = {}
        if "fid" in self.metrics:
            out["eval/fid"] = float(scores["fid"])
        if "kid" in self.metrics:
            out["eval/kid"], out["eval/kid_std"] = float(scores["kid_mean"]), float(scores["kid_std"])
        if self.labels is not None:
            k = self.cfg.model.num_classes
            out.update(self._within_classes(fid_kid_by_class(real, real_labels, fake, self.labels, k)))
        return out

    def _reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real images' features and classes, from the cache or extracted by every rank (one writer a node)."""
        from distgan.fid import extract_features, reference_features, to_inception_input

        key, _, reader = reference_set(self.cfg)
        labels: list[torch.Tensor] = []

        def real_batches() -> Iterator[torch.Tensor]:
            for images, classes in reader(self.rank, self.world, self.cfg.eval.batch_size):
                labels.append(classes)
                yield to_inception_input(images.to(self.device).float().mul(2 / 255).sub(1))

        def extract() -> tuple[torch.Tensor, torch.Tensor]:
            features = extract_features(self._extractor, real_batches(), self.runtime)
            local = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
            return features, torch.cat(self.runtime.gather_objects(local))  # rank order, as the features

        return reference_features([*key, self._extractor_id, FEATURES_VERSION], extract, self.runtime,
                                  self.runtime.is_local_main)  # fmt: skip

    def _within_classes(self, by_class: tuple[dict[int, dict[str, float]], list[int]]) -> dict[str, float]:
        """Intra-FID/KID: each class's FID (KID) against the real images of that class, and their mean."""
        scores, missing = by_class
        if missing and not self._warned_classes:
            self._warned_classes = True
            warnings.warn(f"FID/KID within classes leave out classes {missing}: fewer than 2 of their images among "
                          f"the {self.cfg.eval.num_real} real images of the reference (eval.num_real) or the "
                          f"{self.cfg.eval.num_samples} samples (eval.num_samples)", stacklevel=2)  # fmt: skip
        out: dict[str, float] = {}
        for metric, name in (("fid", "fid"), ("kid", "kid_mean")):
            if metric in self.metrics and scores:
                out.update({f"eval/{metric}_class{k}": float(s[name]) for k, s in scores.items()})
                out[f"eval/{metric}_class_mean"] = sum(s[name] for s in scores.values()) / len(scores)
        return out


def class_accuracy(correct: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """A conditional G's share of samples that are what they were asked to be (correct: bool (N,) of the asked
    classes labels (N,)): overall (`cond/accuracy`), its worst class (`cond/accuracy_min`), and per class (of the
    classes asked for)."""
    asked = torch.bincount(labels, minlength=num_classes)
    right = torch.bincount(labels[correct], minlength=num_classes)
    per_class = {c: right[c].item() / asked[c].item() for c in range(num_classes) if asked[c] > 0}
    out = {"cond/accuracy": correct.double().mean().item(), "cond/accuracy_min": min(per_class.values())}
    out.update({f"cond/accuracy_class{c}": share for c, share in per_class.items()})
    return out


def reference_set(cfg: Config) -> tuple[list[str], int, callable]:
    """What defines the real images FID/KID compare against (the cache key), how many, and a per-rank reader.

    The reference is eval.num_real images of the data source in a fixed order, read without shuffling or flips:
    for shards the first ones in the manifest's shard order (`prepare` wrote them in a seeded random order); for
    the digits, a folder (sorted file names, so sorted by class) and the synthetic set, ones spread evenly over
    the whole set (all of them when there are at most eval.num_real), so that every class is in it. The reader
    gives rank r of w its contiguous share as (uint8 (B, C, S, S) images, int64 (B,) classes) batches, so the
    set is the same for every world size.
    """
    d, size, channels = cfg.data, cfg.model.image_size, cfg.model.channels
    common = [f"size {size}", f"channels {channels}"]
    if d.source == "shards":
        from distgan.data.shards import resolve, shard_identity

        shard_set = resolve(d.path, d.verify)
        count = min(cfg.eval.num_real, shard_set.num_samples)
        # The shards' content (their sha256, cached), so an edited shard never reuses stale features.
        key = ["shards", *(f"{shard_identity(s)} {s.samples}" for s in shard_set.shards), *common, f"count {count}"]
        return key, count, lambda rank, world, batch: _shard_images(shard_set, count, rank, world, batch, cfg)
    if d.source == "digits":
        from distgan.data.sources import digits_set

        images, key = digits_set(size), ["digits", "sklearn load_digits bilinear"]
    elif d.source == "synthetic":
        from distgan.data.sources import SyntheticImages

        images = SyntheticImages(d.num_samples, size, channels, cfg.run.seed)
        key = ["synthetic", f"seed {cfg.run.seed}", f"num {d.num_samples}"]
    elif d.source == "folder":
        from distgan.data.folder import FolderImages

        images = FolderImages(d.path, size, channels)
        stats = [f"{f.relative_to(d.path)} {f.stat().st_size} {f.stat().st_mtime_ns}" for f in images.files]
        key = ["folder", str(Path(d.path).resolve()), *stats]
    else:
        raise ConfigError(f"FID/KID need images; data.source '{d.source}' holds none")
    count = min(cfg.eval.num_real, len(images))
    return (
        [*key, *common, f"count {count}"],
        count,
        lambda rank, world, batch: _indexed_images(images, count, rank, world, batch),
    )


def _indexed_images(
    images, count: int, rank: int, world: int, batch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Rank's share of `count` images spread evenly over the set (index i * len // count), with their classes."""
    from distgan.fid import split_for_rank

    share = split_for_rank(count, rank, world)
    for start in range(share.start, share.stop, batch):
        chosen = torch.arange(start, min(start + batch, share.stop)) * len(images) // count
        pixels, labels, _ = images.get(chosen)
        yield pixels, labels


def _shard_images(
    shard_set, count: int, rank: int, world: int, batch: int, cfg: Config
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Rank's share of the first `count` decodable images of the shards, in shard order, in batches with their
    classes (NO_CLASS for a sample without a valid `cls`)."""
    from distgan.data.shards import tar_samples
    from distgan.fid import split_for_rank

    share = split_for_rank(count, rank, world)
    index, pending = 0, []
    for shard in shard_set.shards:
        if index >= share.stop:
            break
        if index + shard.samples <= share.start:  # a shard wholly before this rank's share: not even opened
            index += shard.samples
            continue
        for sample in tar_samples(shard.url):
            if share.start <= index < share.stop:
                pending.append(sample)
                if len(pending) == batch:
                    yield from _nonempty(_decoded(pending, cfg))
                    pending = []
            index += 1
            if index >= share.stop:
                break
    if pending:
        yield from _nonempty(_decoded(pending, cfg))


def _nonempty(batch: tuple[torch.Tensor, torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if len(batch[0]):
        yield batch


def _decoded(samples: list[dict], cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    from distgan.data.indexed import NO_CLASS
    from distgan.data.shards import decode, sample_class

    decoded = [(image, sample) for image, sample in zip(decode(samples, cfg.model.channels), samples)
               if not isinstance(image, str)]  # fmt: skip
    images = [image for image, _ in decoded]
    classes = [sample_class(sample) for _, sample in decoded]
    labels = torch.tensor([c if isinstance(c, int) else NO_CLASS for c in classes], dtype=torch.long)
    size = cfg.model.image_size
    resized = [
        image if image.shape[-2:] == (size, size) else F.interpolate(image[None].float(), (size, size), mode="area")[0]
        for image in images
    ]
    if not resized:  # every sample of the batch was unreadable
        return torch.empty(0, cfg.model.channels, size, size, dtype=torch.uint8), labels
    pixels = [image.round().clamp(0, 255).byte() if image.is_floating_point() else image for image in resized]
    return torch.stack(pixels), labels


def parse_metrics(metrics: str | list | tuple | None, cfg: Config) -> list[str]:
    """--metrics fid,kid (fire passes a tuple) or a list; None: the checkpoint's eval.metrics."""
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
) -> None:
    """Evaluate a checkpoint's generator (see the module docstring)."""
    ema = flag(ema, "ema")
    if not Path(checkpoint).is_file():
        raise ConfigError(f"checkpoint not found: {checkpoint}")
    try:
        cfg, G, D, which = load_models(checkpoint, ema)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot load checkpoint {checkpoint}: {first_line(e)}") from None
    names = parse_metrics(metrics, cfg)
    if not names:
        raise ConfigError(f"no metrics to compute for data.source '{cfg.data.source}': pass --metrics=...")
    check_metrics(names, cfg, "--metrics")
    for key, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if value is not None:
            if int(value) < 2:
                raise ConfigError(f"--{key} must be >= 2; got {value}")
            setattr(cfg.eval, key, int(value))
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
            print(f"  {key:<28} {value:.6g}")
        if out:
            record = {"checkpoint": str(checkpoint), "generator": which, "num_samples": cfg.eval.num_samples}
            atomic_write(out, json.dumps({**record, "metrics": results}, indent=2) + "\n")
    runtime.close()


def cli(argv: list[str] | None = None) -> None:
    run_command(main, "distgan.eval", sys.argv[1:] if argv is None else argv, usage=__doc__)


if __name__ == "__main__":
    cli()
