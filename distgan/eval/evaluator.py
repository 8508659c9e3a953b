"""The Evaluator: every metric of a run's generator, computed by every rank at the same points.

FID/KID, precision/recall and memorisation on Inception features (fid.py, precision_recall.py, features.py,
inception.py) against a reference set of real images (reference.py); a conditional G's classes judged by a linear
probe of those features (classes.py); the digits score (digits.py); ring/grid mode
coverage (distgan.toy); an FGSM probe of D (fgsm.py). Training calls it every eval.every steps; `python -m
distgan.eval` (cli.py) calls it on a checkpoint.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from distgan import rng
from distgan.config import FEATURE_METRICS, Config, check_class_samples, is_points
from distgan.dist import Runtime
from distgan.eval.classes import class_accuracy
from distgan.eval.reference import FEATURES_VERSION, ReferenceSet, reference_set
from distgan.models import classes_in_turn, generate_in_batches

NEAREST_SHOWN = 8  # samples shown beside their nearest training images


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
        if k and self.metrics:  # the class count is known once the data is open (a folder's, a table's)
            check_class_samples(cfg.eval.num_samples, k, f"eval.metrics {self.metrics}")
        self.labels = classes_in_turn(cfg.eval.num_samples, k) if k else None
        self._warned_classes = False  # the warning about classes left out of intra-FID, once a run
        self._extractor, self._extractor_id = extractor, extractor_id
        self._real_features: tuple[torch.Tensor, torch.Tensor] | None = None  # (N, F) features, (N,) classes
        self._real_radii: torch.Tensor | None = None  # (N, 2) nearest and k-th neighbour distances
        self._class_probe = None  # the classes metric's linear probe (classes.ClassProbe), fitted on first use
        self._reference: ReferenceSet | None = None  # the real images, once real_features() has named them
        self._reference_key = ""  # the reference set's cache key: its identity in every metrics row
        self.nearest_grid: torch.Tensor | None = None  # the last evaluation's samples nearest to training images
        if set(FEATURE_METRICS) & set(self.metrics) and extractor is None:
            from distgan.eval.inception import inception_weights_path, load_inception

            # Found, hash-checked and built now, not at the first evaluation; the layers' initialisation (before the
            # file's weights replace it) must not draw from the training's RNG.
            with self._own_rng():
                self._extractor = load_inception(inception_weights_path(cfg.eval.inception_weights))
            self._extractor_id = self._extractor.identity

    @property
    def extractor(self) -> nn.Module | None:
        """The feature network (Inception, or the stand-in given), None when no metric needs one."""
        return self._extractor

    def _own_rng(self):
        """Evaluation draws nothing from the global RNGs that training uses (an exact resume depends on them)."""
        cuda = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=cuda)

    def local_samples(self, G: nn.Module) -> torch.Tensor:
        """This rank's share of the evaluation samples, (n, C, H, W) images or (n, 2) points, on the device."""
        from distgan.eval.features import split_for_rank

        share = split_for_rank(self.cfg.eval.num_samples, self.rank, self.world)
        labels = self.labels[share.start : share.stop] if self.labels is not None else None
        return generate_in_batches(G, self.z[share.start : share.stop], labels, self.cfg.eval.batch_size, self.device)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's rows in rank order, on the CPU of every rank (every rank must call it)."""
        return torch.cat(self.runtime.gather_objects(local.cpu()))

    def __call__(
        self, G: nn.Module, D: nn.Module | None = None, real: torch.Tensor | None = None, real_labels=None
    ) -> dict[str, float | str]:
        """The metrics of G (G_ema, usually); D and a batch of real model inputs (with their classes, for a
        conditional D) for the FGSM probe."""
        with self._own_rng():
            return self._evaluate(G, D, real, real_labels)

    def timed(
        self, G: nn.Module, D: nn.Module | None = None, real: torch.Tensor | None = None, real_labels=None
    ) -> dict[str, float | str]:
        """The metrics and `eval/seconds`, this rank's time for them (training logs rank 0's)."""
        started = time.perf_counter()
        results = self(G, D, real, real_labels)
        return {**results, "eval/seconds": time.perf_counter() - started}

    def _evaluate(
        self, G: nn.Module, D: nn.Module | None, real: torch.Tensor | None, real_labels
    ) -> dict[str, float | str]:
        local = self.local_samples(G)
        results: dict[str, float | str] = {}
        if "digits" in self.metrics or "modes" in self.metrics:
            samples = self.gather(local)
            if "digits" in self.metrics:
                from distgan.eval.digits import default_scorer

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
        if set(FEATURE_METRICS) & set(self.metrics):
            results.update(self.feature_metrics(local))
        if "fgsm" in self.metrics:
            if D is None or real is None:
                raise ValueError("the fgsm probe needs D and a batch of real inputs")
            from distgan.eval.fgsm import probe

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

    def feature_metrics(self, local: torch.Tensor) -> dict[str, float | str]:
        """FID, KID, precision/recall and memorisation of every rank's samples (this rank's: local), with their
        provenance: how many generated and real images, which reference set, which network."""
        from distgan.eval.features import extract_features
        from distgan.eval.fid import fid_kid, fid_kid_by_class
        from distgan.eval.inception import to_inception_input

        self._extractor.to(self.device)
        batches = (to_inception_input(chunk) for chunk in local.split(self.cfg.eval.batch_size))
        fake = extract_features(self._extractor, batches, self.runtime)  # every rank's, in the order of self.labels
        if self._real_features is None:
            self._real_features = self.real_features()
        real, real_labels = self._real_features
        out: dict[str, float | str] = {}
        if {"fid", "kid"} & set(self.metrics):
            scores = fid_kid(real, fake)
            if "fid" in self.metrics:
                out["eval/fid"] = float(scores["fid"])
            if "kid" in self.metrics:
                out["eval/kid"], out["eval/kid_std"] = float(scores["kid_mean"]), float(scores["kid_std"])
            if self.labels is not None:
                k = self.cfg.model.num_classes
                out.update(self._within_classes(fid_kid_by_class(real, real_labels, fake, self.labels, k)))
        if "pr" in self.metrics:
            out.update(self._precision_recall(real, fake, local))
        if "classes" in self.metrics:
            from distgan.eval.classes import ClassProbe

            if self._class_probe is None:
                self._class_probe = ClassProbe(real, real_labels, self.cfg.model.num_classes)
            out.update(self._class_probe.score(fake, self.labels))
        out.update({"eval/num_fake": len(fake), "eval/num_real": len(real), "eval/reference": self._reference_key,
                    "eval/network": self._extractor_id})  # fmt: skip
        return out

    def _precision_recall(self, real: torch.Tensor, fake: torch.Tensor, local: torch.Tensor) -> dict[str, float]:
        """Precision, recall, memorisation and copies; the samples nearest to training images in nearest_grid."""
        from distgan.eval.features import cached_tensor
        from distgan.eval.precision_recall import K, neighbour_radii, precision_recall

        if self._real_radii is None:
            self._real_radii = cached_tensor([self._reference_key, f"neighbour radii k={K}"],
                                             lambda: neighbour_radii(real), self.runtime.is_local_main)  # fmt: skip
        scores, distances, indices = precision_recall(real, fake, self._real_radii)
        closest = distances.argsort()[:NEAREST_SHOWN]  # the samples most like a training image
        self.nearest_grid = self._nearest_grid(local, closest.tolist(), indices[closest].tolist())
        return {f"eval/{name}": value for name, value in scores.items()}

    def _nearest_grid(self, local: torch.Tensor, samples: list[int], reals: list[int]) -> torch.Tensor:
        """(2n, C, H, W) in [-1, 1]: the n samples (global indices), then the real image nearest to each, on every
        rank (every rank must call it: the samples lie on the ranks that generated them)."""
        from distgan.eval.features import split_for_rank

        share = split_for_rank(self.cfg.eval.num_samples, self.rank, self.world)
        mine = {i: local[i - share.start].cpu().float() for i in samples if i in share}
        held = {i: image for part in self.runtime.gather_objects(mine) for i, image in part.items()}
        nearest_reals = self._reference.pick(reals).float().div(127.5).sub(1)  # (n, C, H, W)
        return torch.cat([torch.stack([held[i] for i in samples]), nearest_reals])

    def real_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real images' features and classes, from the cache or extracted by every rank (one writer a node)."""
        from distgan.eval.features import extract_features, reference_features, reference_path
        from distgan.eval.inception import to_inception_input

        self._reference = reference_set(self.cfg)
        key, reader = [*self._reference.key, self._extractor_id, FEATURES_VERSION], self._reference.read
        self._reference_key = reference_path(key).stem
        labels: list[torch.Tensor] = []

        def real_batches() -> Iterator[torch.Tensor]:
            for images, classes in reader(self.rank, self.world, self.cfg.eval.batch_size):
                labels.append(classes)
                yield to_inception_input(images.to(self.device).float().mul(2 / 255).sub(1))

        def extract() -> tuple[torch.Tensor, torch.Tensor]:
            features = extract_features(self._extractor, real_batches(), self.runtime)
            local = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
            return features, torch.cat(self.runtime.gather_objects(local))  # rank order, as the features

        return reference_features(key, extract, self.runtime, self.runtime.is_local_main)

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
