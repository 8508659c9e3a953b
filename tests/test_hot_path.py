"""The training step's hot path: NaN steps skipped without a host sync, and no sync between log steps."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from distgan.precision import Precision
from distgan.state import BadSteps
from distgan.train import train


@pytest.mark.parametrize("fused", [True, False])
def test_a_nan_gradient_changes_neither_the_weights_nor_adam_state(fused):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1, fused=fused)
    precision = Precision("fp32", torch.device("cpu"))
    x = torch.randn(8, 4)
    precision.backward_and_step("D", net(x).square().mean(), opt)  # a good step: state exists
    weights = [p.detach().clone() for p in net.parameters()]
    state = {k: v.clone() for k, v in opt.state[net.weight].items()}

    norm = precision.backward_and_step("D", net(x * float("nan")).mean(), opt)

    assert not torch.isfinite(norm)
    assert all(torch.equal(w, p) for w, p in zip(weights, net.parameters()))
    assert all(torch.equal(v, opt.state[net.weight][k]) for k, v in state.items())  # step count, moments
    precision.backward_and_step("D", net(x).square().mean(), opt)  # and the next good step updates again
    assert not torch.equal(weights[0], net.weight) and int(opt.state[net.weight]["step"]) == 2
    assert not hasattr(opt, "found_inf")


def test_bad_steps_count_runs_and_stop_at_the_limit():
    bad = BadSteps(before=5, limit=3, device=torch.device("cpu"))
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    for d, g in [(nan, one), (one, one), (one, nan), (nan, nan)]:
        bad.update(d, g)
    bad.check(4)  # the longest run so far is 2
    assert bad.total() == 5 + 3
    bad.update(nan, one)  # the run of 2 goes on across the check: 3 in a row
    with pytest.raises(FloatingPointError, match="NaN/Inf gradients in 3 steps in a row by step 5"):
        bad.check(5)


class CountHostSyncs(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (.item(), bool(), int(): aten._local_scalar_dense)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_syncs(tmp_path, steps: int, **overrides) -> int:
    cfg = tiny_config(
        tmp_path / f"run{steps}",
        **{"train.steps": steps, "log.every": 1000, "log.images_every": 1000, "checkpoint.every": 0, **overrides},
    )
    with CountHostSyncs() as counter:
        train(cfg)  # logs, draws samples and writes a checkpoint once, at the end
    return counter.count


def test_training_steps_between_log_steps_read_nothing_back_to_the_host(tmp_path):
    assert host_syncs(tmp_path, 9) == host_syncs(tmp_path, 3)
    # The counter does see them: with an unfused Adam, the NaN check reads each network's norm every step
    # (and torch's loop over the parameters reads each step counter, a CPU tensor).
    unfused = host_syncs(tmp_path / "unfused", 9, **{"optim.fused": False})
    assert unfused - host_syncs(tmp_path / "unfused", 3, **{"optim.fused": False}) >= 2 * 6


@pytest.mark.gpu
def test_on_a_gpu_steps_between_log_steps_do_not_synchronise(tmp_path):
    import warnings

    def sync_warnings(steps: int) -> int:
        torch.cuda.set_sync_debug_mode("warn")  # warns at each operation that waits for the GPU
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                host_syncs(tmp_path / "gpu", steps, **{"run.device": "auto"})
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in caught)

    assert sync_warnings(9) == sync_warnings(3)


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["digits", "folder"])
def test_batches_for_a_gpu_are_page_locked(tmp_path, source):
    from conftest import write_index_pngs

    from distgan.data import build_source

    folder = {"data.path": str(write_index_pngs(tmp_path / "images" / "a", 40).parent), "model.channels": 3}
    cfg = tiny_config(tmp_path / "run", **{"data.source": source, **(folder if source == "folder" else {})})
    assert all(t.is_pinned() for t in next(build_source(cfg, pin_memory=True, workers=1)))


def _count_two_ranks(rank: int, world_size: int, run_dir: str, steps: int) -> int:
    from pathlib import Path

    torch.set_num_threads(1)
    return host_syncs(Path(run_dir), steps, **{"dist.sync_bn": True})


def test_two_processes_read_nothing_back_between_log_steps_either(tmp_path):
    """The stop-signal vote (an asynchronous all-reduce read a step later) and synced batch norm read nothing."""
    from conftest import run_ranks

    counts = {}
    for steps in (3, 9):
        (tmp_path / str(steps)).mkdir()
        ranks = run_ranks(_count_two_ranks, tmp_path / str(steps), run_dir=str(tmp_path / f"r{steps}"), steps=steps)
        assert not any(isinstance(r, str) for r in ranks), ranks
        counts[steps] = ranks
    assert counts[9] == counts[3]
