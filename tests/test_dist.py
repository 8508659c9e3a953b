"""Two gloo processes on CPU: DDP + synced batch norm compute what one process computes on the whole batch."""

import pytest
import torch
from conftest import in_float64, run_ranks
from torch import nn

from distgan.config import ConfigError, load_config
from distgan.dist import Runtime
from distgan.models import build_models
from distgan.precision import Precision
from distgan.step import train_step
from distgan.syncbn import SyncBatchNorm

BATCH, NZ = 8, 16
SMALL = {"model.ngf": 8, "model.ndf": 8, "model.nz": NZ, "train.batch_size": BATCH, "run.device": "cpu"}


def step_inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(BATCH, 1, 32, 32, generator=gen) * 2 - 1, torch.randn(BATCH, NZ, generator=gen)


def snapshot(G: nn.Module, D: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters, their gradients and buffers (batch-norm running statistics) of both nets."""
    out = {}
    for prefix, net in (("G", G), ("D", D)):
        for name, p in net.named_parameters():
            out[f"{prefix}.{name}"] = p.detach().clone()
            out[f"{prefix}.{name}.grad"] = p.grad.detach().clone()
        for name, b in net.named_buffers():
            out[f"{prefix}.{name}"] = b.detach().clone()
    return out


def one_step(G, D, real, z):
    # SGD: its update is proportional to the gradient, so equal gradients give equal weights.
    # (Adam's first step divides each gradient by its own magnitude, amplifying float noise in near-zero ones.)
    plain = lambda module: getattr(module, "module", module)  # noqa: E731 (the module inside a DDP wrapper)
    opt_g = torch.optim.SGD(plain(G).parameters(), lr=0.1)
    opt_d = torch.optim.SGD(plain(D).parameters(), lr=0.1)
    return train_step(G, D, opt_g, opt_d, real, z, "nonsaturating", Precision("fp32", real.device))


@in_float64()
def ddp_step(rank: int, world_size: int, sync_bn: bool) -> dict:
    cfg = load_config(None, {**SMALL, "dist.sync_bn": sync_bn})
    runtime = Runtime(cfg, batch_size=cfg.train.batch_size)
    torch.manual_seed(0)
    G, D = runtime.wrap(*build_models(cfg.model), sync_bn=cfg.dist.sync_bn)
    assert isinstance(D, nn.parallel.DistributedDataParallel) and not D.broadcast_buffers
    assert any(isinstance(m, SyncBatchNorm) for m in D.modules()) == sync_bn
    real, z = step_inputs()
    rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    one_step(G, D, real[rows], z[rows])
    return snapshot(G.module, D.module)


@in_float64()
def reference_step() -> dict:
    torch.manual_seed(0)
    G, D = build_models(load_config(None, SMALL).model)
    real, z = step_inputs()
    one_step(G, D, real, z)
    return snapshot(G, D)


def test_two_ranks_with_half_batches_equal_one_rank_with_the_whole(tmp_path):
    want = reference_step()
    ranks = run_ranks(ddp_step, tmp_path, sync_bn=True)
    assert not any(isinstance(r, str) for r in ranks), ranks
    for got in ranks:
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=name)  # float64's tolerance: 1e-7


def test_without_sync_bn_the_two_computations_differ(tmp_path):
    want = reference_step()
    (got, _) = run_ranks(ddp_step, tmp_path, sync_bn=False)
    worst = max((got[k].float() - want[k].float()).abs().max().item() for k in want)
    assert worst > 1e-3  # so the equivalence test above can fail


def syncbn_ranks(rank: int, world_size: int) -> dict:
    torch.distributed.init_process_group("gloo")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 5, 5, generator=gen) * 3 + 2
    r = torch.randn(8, 4, 5, 5, generator=gen)
    rows = slice(rank * 4, rank * 4 + 4)
    bn = SyncBatchNorm(4)
    nn.init.normal_(bn.weight, 1.0, 0.3, generator=torch.Generator().manual_seed(4))
    nn.init.normal_(bn.bias, 0.0, 0.3, generator=torch.Generator().manual_seed(5))
    mine = x[rows].clone().requires_grad_(True)
    y = bn(mine)
    (y * r[rows]).sum().backward()
    return {"y": y.detach(), "dx": mine.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "mean": bn.running_mean, "var": bn.running_var}  # fmt: skip


def test_cpu_synced_batch_norm_equals_batch_norm_on_the_whole_batch(tmp_path):
    ranks = run_ranks(syncbn_ranks, tmp_path)
    assert not any(isinstance(r, str) for r in ranks), ranks
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 5, 5, generator=gen) * 3 + 2
    r = torch.randn(8, 4, 5, 5, generator=gen)
    bn = nn.BatchNorm2d(4)
    nn.init.normal_(bn.weight, 1.0, 0.3, generator=torch.Generator().manual_seed(4))
    nn.init.normal_(bn.bias, 0.0, 0.3, generator=torch.Generator().manual_seed(5))
    x.requires_grad_(True)
    y = bn(x)
    (y * r).sum().backward()
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    close(torch.cat([k["y"] for k in ranks]), y.detach())
    close(torch.cat([k["dx"] for k in ranks]), x.grad)
    close(ranks[0]["dw"] + ranks[1]["dw"], bn.weight.grad)  # local sums; DDP averages them over ranks
    close(ranks[0]["db"] + ranks[1]["db"], bn.bias.grad)
    for k in ranks:
        close(k["mean"], bn.running_mean)
        close(k["var"], bn.running_var)


def nan_on_rank_1(rank: int, world_size: int) -> dict:
    cfg = load_config(None, SMALL)
    runtime = Runtime(cfg, batch_size=cfg.train.batch_size)
    torch.manual_seed(0)
    G, D = runtime.wrap(*build_models(cfg.model), sync_bn=cfg.dist.sync_bn)
    real, z = step_inputs()
    real = real[rank * 4 : rank * 4 + 4]
    if rank == 1:
        real[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in D.module.state_dict().items()}
    stats = one_step(G, D, real, z[rank * 4 : rank * 4 + 4])
    d_unchanged = all(torch.equal(before[k], v) for k, v in D.module.named_parameters())
    return {"grad_norm/D": stats["grad_norm/D"].item(), "D unchanged": d_unchanged}


def test_a_nan_on_one_rank_is_skipped_on_every_rank(tmp_path):
    ranks = run_ranks(nan_on_rank_1, tmp_path)
    assert not any(isinstance(r, str) for r in ranks), ranks
    for r in ranks:
        assert r["D unchanged"] and not torch.isfinite(torch.tensor(r["grad_norm/D"]))


def diverged_replicas(rank: int, world_size: int) -> str:
    cfg = load_config(None, SMALL)
    runtime = Runtime(cfg, batch_size=cfg.train.batch_size)
    G, D = runtime.wrap(*build_models(cfg.model), sync_bn=cfg.dist.sync_bn)
    runtime.check_replicas({"G": G, "D": D})  # identical after wrapping (DDP broadcast rank 0's)
    if rank == 1:
        with torch.no_grad():
            D.module.net[2].weight[0, 0, 0, 0] += 1e-6
    runtime.check_replicas({"G": G, "D": D})
    return "no error"


def test_replica_check_names_the_first_differing_tensor(tmp_path):
    ranks = run_ranks(diverged_replicas, tmp_path)
    for r in ranks:
        assert r == "error: ReplicaMismatch: rank 1 holds a different D.module.net.2.weight than rank 0; " + (
            "the replicas have diverged"
        )


@pytest.mark.gpu
def test_gpu_mixed_precision_runs(tmp_path):
    from conftest import tiny_config

    from distgan import checkpoint
    from distgan.train import train

    for precision in ("bf16", "fp16"):
        for conditional in (False, True):
            run_dir = tmp_path / f"{precision}_{conditional}"
            train(tiny_config(run_dir, **{"train.precision": precision, "model.conditional": conditional}))
            state = checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])
            assert (state["scalers"] != {}) == (precision == "fp16")


def setup_with_batch(rank: int, world_size: int, batch_size: int) -> str:
    Runtime(load_config(None, SMALL), batch_size=batch_size)
    return "ok"


def test_a_global_batch_that_does_not_divide_is_refused(tmp_path):
    ranks = run_ranks(setup_with_batch, tmp_path, batch_size=15)
    assert ranks == ["error: ConfigError: train.batch_size 15 is not divisible by the 2 processes"] * 2


def rank_0_write_fails(rank: int, world_size: int) -> str:
    runtime = Runtime(load_config(None, SMALL))

    def write() -> None:
        if rank == 0:
            raise OSError(28, "No space left on device")

    runtime.guard(write)
    return "went on"


def rank_0_refuses(rank: int, world_size: int) -> str:
    runtime = Runtime(load_config(None, SMALL))

    def claim() -> None:
        if rank == 0:
            raise ConfigError("run.dir runs/x is in use by another run")

    runtime.guard(claim)
    return "went on"


def test_a_write_failing_on_rank_0_stops_every_rank(tmp_path):
    assert run_ranks(rank_0_write_fails, tmp_path, timeout=60) == [
        "error: OSError: [Errno 28] No space left on device",
        "error: RuntimeError: rank 0 failed to write the run's files: [Errno 28] No space left on device",
    ]
    assert run_ranks(rank_0_refuses, tmp_path, timeout=60) == [  # a refusal is one everywhere: exit 2 on each rank
        "error: ConfigError: run.dir runs/x is in use by another run",
        "error: ConfigError: rank 0 refused the run: run.dir runs/x is in use by another run",
    ]
