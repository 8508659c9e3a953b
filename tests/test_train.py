import dataclasses
import json
import math

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from distgan import checkpoint
from distgan.step import train_step
from distgan.train import train


def final_state(run_dir):
    return checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])


def assert_same_weights(a: dict, b: dict) -> None:
    for net in ("G", "D", "G_ema"):
        assert a[net].keys() == b[net].keys()
        for name in a[net]:
            assert torch.equal(a[net][name], b[net][name]), f"{net}.{name} differs"


def test_short_digits_run_writes_everything(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    train(cfg)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for row in rows:
        for key in ("loss/D", "loss/G", "D/real", "D/fake_before", "D/fake_after", "images_per_s"):
            assert math.isfinite(row[key]), key
        assert 0 <= row["D/real"] <= 1 and row["images_per_s"] > 0
    assert rows[-1]["images_seen"] == 6 * 16
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000003.png", "step_00000006.png"]
    with Image.open(run / "samples" / "step_00000006.png") as grid:
        assert grid.size == (8 * 32 + 9 * 2, 8 * 32 + 9 * 2)  # 8x8 grid with 2-pixel padding
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_00000004.pt", "step_00000006.pt"]
    state = final_state(run)  # weights_only load
    assert state["step"] == 6 and state["images_seen"] == 96
    assert {"G", "D", "opt_g", "opt_d", "ranks", "scalers", "config", "versions"} <= state.keys()
    assert state["ranks"][0]["data"] == {"position": 6 * 16} and "torch" in state["ranks"][0]["rng"]
    assert state["opt_g"]["state"] and state["opt_d"]["state"]  # Adam moments are saved
    assert (run / "config.yaml").read_text().startswith("run:")


def test_same_seed_gives_bitwise_identical_weights(tmp_path):
    train(tiny_config(tmp_path / "a"))
    train(tiny_config(tmp_path / "b"))
    train(tiny_config(tmp_path / "c", **{"run.seed": 1}))
    assert_same_weights(final_state(tmp_path / "a"), final_state(tmp_path / "b"))
    with pytest.raises(AssertionError):
        assert_same_weights(final_state(tmp_path / "a"), final_state(tmp_path / "c"))


def test_rerun_resumes_and_matches_a_straight_run(tmp_path):
    train(tiny_config(tmp_path / "straight"))
    train(tiny_config(tmp_path / "split", **{"train.steps": 4}))
    train(tiny_config(tmp_path / "split"))  # same run dir, more steps: resumes from step 4
    assert_same_weights(final_state(tmp_path / "straight"), final_state(tmp_path / "split"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


def test_completed_run_is_left_alone(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run")
    train(cfg)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()}
    train(cfg)
    assert "already complete" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "checkpoints").iterdir()}


@pytest.mark.parametrize(
    "overrides",
    [{"model.arch": "mlp", "model.mlp_hidden": [32, 64]},
     {"data.source": "synthetic", "model.channels": 3, "data.num_samples": 64},
     {"train.loss": "hinge"}, {"train.loss": "minimax"}, {"train.loss": "lsgan"}],
)  # fmt: skip
def test_other_models_sources_and_losses_train(tmp_path, overrides):
    train(tiny_config(tmp_path, **{"train.steps": 2, **overrides}))
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(row["loss/D"]) and math.isfinite(row["loss/G"])


def test_train_step_updates_d_then_g_without_leaking_gradients():
    from distgan.models import Discriminator, Generator

    torch.manual_seed(0)
    G, D = Generator(16, 8, 1, 32), Discriminator(8, 1, 32)
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    g0 = [p.clone() for p in G.parameters()]
    d0 = [p.clone() for p in D.parameters()]
    stats = train_step(G, D, opt_g, opt_d, torch.rand(4, 1, 32, 32) * 2 - 1, torch.randn(4, 16))
    assert all(not torch.equal(a, b) for a, b in zip(g0, G.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(d0, D.parameters()))
    # D's gradients are those of the D loss alone: the G step froze D, so it added nothing to them.
    assert all(p.requires_grad for p in D.parameters())
    assert all(p.grad is not None for p in D.parameters())
    assert set(stats) == {"loss/D", "loss/G", "D/real", "D/fake_before", "D/fake_after", "grad_norm/D", "grad_norm/G"}
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_g_step_leaves_d_gradients_untouched():
    from distgan.models import Discriminator, Generator

    torch.manual_seed(0)
    G, D = Generator(16, 8, 1, 32), Discriminator(8, 1, 32)
    real, z = torch.rand(4, 1, 32, 32) * 2 - 1, torch.randn(4, 16)
    grads = []

    class Recorder(torch.optim.Adam):
        def step(self, closure=None):
            grads.append([p.grad.clone() for p in D.parameters()])
            return super().step(closure)

    opt_d = Recorder(D.parameters())
    train_step(G, D, torch.optim.Adam(G.parameters()), opt_d, real, z)
    after = [p.grad for p in D.parameters()]
    for at_step, final in zip(grads[0], after):
        assert torch.equal(at_step, final)  # nothing accumulated into D's grads during the G step


def test_config_is_a_dataclass_snapshot(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    train(cfg)
    stored = final_state(tmp_path / "run")["config"]
    assert stored == dataclasses.asdict(cfg)
