"""Evaluation: one module per metric family, the Evaluator that runs them, and the command line.

evaluator.py         Evaluator: runs the metrics of a run's generator (training and `python -m distgan.eval`)
cli.py               python -m distgan.eval --checkpoint FILE
reference.py         the real images a metric compares with, and their cache key
inception.py         the FID Inception network from either weights file (hash-checked, never downloaded)
features.py          features on every rank, gathered; reference features cached by content
fid.py               FID and KID (overall and within classes)
precision_recall.py  precision and recall (k-NN manifolds) and memorisation (nearest training images)
digits.py            the digits score (a small classifier of scikit-learn's digits)
fgsm.py              an FGSM probe of the discriminator
"""

from distgan.eval.cli import cli, main
from distgan.eval.evaluator import Evaluator

__all__ = ["Evaluator", "cli", "main"]
