"""The fault probe of docs/faults.md: every case run for real, its exit code, its last stderr line and what it left.

    python tests/fault_probe.py [--only SUBSTRING]      (as root: the disk cases mount small tmpfs; about 15 min)

Prints a Markdown table. Not part of the test suite (tests/test_hardening.py asserts the same cases); this is the
wider sweep a reader can rerun.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distgan import checkpoint  # noqa: E402
from distgan.config import iter_fields  # noqa: E402

TINY = ["--model.ngf=8", "--model.ndf=8", "--model.nz=16", "--train.batch_size=16", "--log.progress=false"]
TINY += ["--log.report=false", "--eval.every=0", "--log.every=2", "--log.wandb=disabled"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
ENV["PATH"] = f"{Path(sys.executable).parent}:{ENV['PATH']}"
ROWS: list[tuple[str, str, str, str]] = []


def files(folder: Path) -> str:
    if not folder.exists():
        return "nothing"
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return shown or "an empty folder"


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:160].replace("|", "/") if lines else ""


def record(case: str, rc: int | None, err: str, left: str) -> None:
    ROWS.append((case, str(rc), last_line(err), left))
    print(f"{case}: {rc}", file=sys.stderr)


def python(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=ENV, capture_output=True, text=True)


def train(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return python("distgan.train", *TINY, f"--run.dir={run_dir}", *args, cwd=run_dir.parent)


def background(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run ended or stalled: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def tmpfs(target: Path, options: str):
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def two_writers(work: Path) -> None:
    for label, extra in (("the same config", []), ("another config", ["--optim.lr_g=1e-3", "--train.batch_size=32"])):
        run_dir = work / label.replace(" ", "_")
        first = background([sys.executable, "-m", "distgan.train", *TINY, f"--run.dir={run_dir}",
                            "--train.steps=100000"], work)  # fmt: skip
        metrics = run_dir / "metrics.jsonl"
        wait_until(lambda m=metrics: m.exists() and m.stat().st_size, first)
        second = train(run_dir, "--train.steps=5", *extra)
        record(
            f"a second run on a live run.dir, {label}", second.returncode, second.stderr, "the first run's files only"
        )
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
        record("... the first run then stopped by SIGTERM", first.returncode, out, files(run_dir))


def unreadable(work: Path) -> None:
    run_dir = work / "run"
    train(run_dir, "--train.steps=6", "--checkpoint.every=2")
    for path in checkpoint.list_checkpoints(run_dir):
        path.write_bytes(os.urandom(4096))
    result = train(run_dir, "--train.steps=8")
    record("every checkpoint random bytes", result.returncode, result.stderr, files(run_dir))
    result = train(run_dir, "--train.steps=8")
    record("... the same command again", result.returncode, result.stderr, files(run_dir / "checkpoints"))
    result = train(run_dir, "--train.steps=8", "--checkpoint.start_over=true")
    record("... with --checkpoint.start_over=true", result.returncode, result.stderr, files(run_dir / "set_aside"))
    run_dir = work / "alien"
    train(run_dir, "--train.steps=4", "--checkpoint.every=2")
    torch.save({"a": 1}, checkpoint.path_for(run_dir, 99))
    result = train(run_dir, "--train.steps=6")
    record("newest file torch.save({'a': 1}) as step_00000099.pt", result.returncode, result.stderr,
           files(run_dir / "checkpoints"))  # fmt: skip
    run_dir = work / "pickled"
    train(run_dir, "--train.steps=4", "--checkpoint.every=2")
    torch.save({"config": {}, "G": torch.nn.Linear(2, 2)}, checkpoint.path_for(run_dir, 99))
    result = train(run_dir, "--train.steps=6")
    record("newest file a pickled nn.Module", result.returncode, result.stderr, files(run_dir / "checkpoints"))


def floats(work: Path) -> None:
    bad = {"optim.lr_g": "0", "optim.lr_d": "-1e-4", "optim.beta1": "1.5", "optim.beta2": "1.0",
           "model.mlp_dropout": "1.0", "train.ema_halflife_images": "-1", "train.ema_rampup": "-0.1",
           "dist.timeout_s": "0.5", "train.topk": "0", "train.topk_halflife_images": "0", "optim.decay_start": "1.0",
           "reg.r1_gamma": "-1", "reg.r2_gamma": "-0.5", "reg.lecam_weight": "-1", "reg.lecam_decay": "1.0",
           "augment.p": "1.5", "augment.ada_target": "-0.1", "augment.ada_images": "0"}  # fmt: skip
    for key, f in iter_fields():
        if f.type != "float":
            continue
        for value in ("nan", "inf", "-inf", bad[key]):
            result = train(work / "run", f"--{key}={value}")
            record(f"--{key}={value}", result.returncode, result.stderr, files(work / "run"))


def disks(work: Path) -> None:
    with tmpfs(work / "ro", "size=1m,ro") as ro:
        result = train(ro / "run")
        record("run.dir on a read-only file system", result.returncode, result.stderr, "nothing")
    run_dir = work / "ro_checkpoints"
    with tmpfs(run_dir / "checkpoints", "size=1m,ro"):
        result = train(run_dir)
        record("run.dir/checkpoints read-only", result.returncode, result.stderr, files(run_dir))
    with tmpfs(work / "small", "size=96k") as small:
        result = train(small / "run")
        record("a disk without room for one checkpoint", result.returncode, result.stderr, files(small))
    with tmpfs(work / "full", "size=16m") as disk:
        run_dir = disk / "run"
        proc = background([sys.executable, "-m", "distgan.train", *TINY, f"--run.dir={run_dir}",
                           "--train.steps=100000", "--checkpoint.every=10", "--checkpoint.keep=1"], work)  # fmt: skip
        wait_until(lambda: checkpoint.list_checkpoints(run_dir), proc)
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as filler:
            while True:
                filler.write(b"\0" * (1 << 16))
                filler.flush()
        _, err = proc.communicate(timeout=120)
        record("the disk fills up mid-run", proc.returncode, err, files(run_dir / "checkpoints"))


def signals(work: Path) -> None:
    args = [*TINY, "--run.device=cpu", "--train.steps=100000", "--checkpoint.every=20"]
    cases = [("SIGTERM to launch/torchrun.sh", signal.SIGTERM, "launcher")]
    cases += [(f"{signal.Signals(sig).name} to rank {rank}", sig, rank) for sig in (signal.SIGTERM, signal.SIGKILL)
              for rank in (0, 1)]  # fmt: skip
    for name, sig, target in cases:
        run_dir = work / name.replace(" ", "_").replace("/", "_")
        cmd = [str(ROOT / "launch" / "torchrun.sh"), *args, f"--run.dir={run_dir}"]
        proc = subprocess.Popen(cmd, cwd=work, env={**ENV, "NPROC": "2"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        wait_until(lambda d=run_dir: checkpoint.list_checkpoints(d), proc)
        if target == "launcher":
            proc.send_signal(sig)
        else:
            os.kill(worker(proc.pid, target), sig)
        _, err = proc.communicate(timeout=180)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        newest = checkpoint.list_checkpoints(run_dir)[-1]
        record(name, proc.returncode, err, f"checkpoints up to {newest.name}")
        again = subprocess.run([*cmd[:-1], f"--run.dir={run_dir}", "--train.steps=" + str(int(newest.stem[5:]) + 4)],
                               cwd=work, env={**ENV, "NPROC": "2"}, capture_output=True, text=True)  # fmt: skip
        record(
            "... the same command again", again.returncode, again.stdout, "resumed" * ("resumed from" in again.stdout)
        )


def worker(root: int, rank: int) -> int:
    """The pid of the torchrun worker of the given rank among the descendants of `root`."""
    todo, seen = [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    for pid in seen:
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env):
                return pid
    raise RuntimeError(f"no worker of rank {rank} under {root}")


def data(work: Path) -> None:
    from distgan.bench import write_photos

    write_photos(work / "images", 32)
    python("distgan.data.prepare", str(work / "images"), str(work / "shards"), "--size=32", "--shard_size=8",
           cwd=work)  # fmt: skip
    shard = sorted((work / "shards").glob("*.tar"))[0]
    original = shard.read_bytes()
    data_args = ["--data.source=shards", f"--data.path={work / 'shards'}", "--model.channels=3", "--data.workers=0"]
    edited = bytearray(original)
    edited[len(edited) // 2] ^= 0xFF
    for label, content in (("a shard deleted", None), ("a shard one byte longer", original + b"\0"),
                           ("a shard edited, same size", bytes(edited))):  # fmt: skip
        shard.unlink() if content is None else shard.write_bytes(content)
        result = train(work / "run", *data_args)
        record(label, result.returncode, result.stderr, files(work / "run"))
    shard.write_bytes(original)
    result = train(work / "run", *data_args, "--model.image_size=64")
    record("shards of 32x32 images, model.image_size 64", result.returncode, result.stderr, files(work / "run"))
    (work / "empty").mkdir()
    (work / "junk.txt").write_text("junk")
    for label, path in (("missing", "/nonexistent"), ("an empty folder", "empty"), ("a text file", "junk.txt")):
        for source in ("shards", "folder"):
            result = train(work / "run", f"--data.source={source}", f"--data.path={path}", "--model.channels=3")
            record(f"data.source {source}, data.path {label}", result.returncode, result.stderr, files(work / "run"))


def clis(work: Path) -> None:
    run_dir = work / "run"
    train(run_dir, "--train.steps=2")
    newest = str(checkpoint.list_checkpoints(run_dir)[-1])
    cases = [
        ("distgan.sample", newest, "--out", str(work / "s.png"), "--bogus", "1"),
        ("distgan.sample", newest, "--out", str(work / "s.png"), "--num", "abc"),
        ("distgan.sample", newest, "--out", str(work / "missing" / "s.png")),
        ("distgan.sample", "--generator", newest, "--out", str(work / "s.png")),
        ("distgan.export", "--checkpoint", newest, "--out", str(work / "G.pt")),
        ("distgan.eval", "--checkpoint", newest, "--metrics=fgsm", "--nmu=3"),
        ("distgan.report", str(run_dir), "--bogus=1"),
        ("distgan.data.prepare", str(work / "nothing"), str(work / "out"), "--size=8"),
        ("distgan.data.prepare", str(run_dir), str(work / "out"), "--sizee=8"),
        ("distgan.bench", "train", "--stepz=3"),
    ]
    for module, *args in cases:
        before = files(work)
        result = python(module, *args, cwd=work)
        left = "nothing new" if files(work) == before else "new files: see the command"
        record(f"{module} {' '.join(a.replace(str(work), '…') for a in args)}", result.returncode, result.stderr, left)


def bomb_lines() -> str:
    """The 9-line YAML alias bomb: 9^9 values once its aliases are expanded."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    return "\n".join(lines) + "\n"


def flags(work: Path) -> None:
    """Flags parsed as their types, strict config files, int ranges (the second round of docs/faults.md)."""
    from distgan.bench import write_photos

    write_photos(work / "images", 8, 40, 40)
    (work / "out").mkdir()
    (work / "out" / "precious.txt").write_text("kept")
    result = python("distgan.data.prepare", "images", "out", "--size=8", "--overwrite=false", cwd=work)
    record("prepare into a non-empty --out, --overwrite=false", result.returncode, result.stderr, files(work / "out"))
    result = train(work / "pc", "--train.steps=2", "--print_config=false")
    record("train --print_config=false", result.returncode, result.stdout, files(work / "pc"))
    result = train(work / "bare", "--run.dir")
    record("train --run.dir (no value)", result.returncode, result.stderr, files(work / "bare"))
    configs = {
        "a section written twice": "train:\n  steps: 5\nmodel:\n  ngf: 8\ntrain:\n  batch_size: 16\n",
        "a key written twice": "train:\n  steps: 5\n  steps: 6\n",
        "a dotted key (train.steps: 5)": "train.steps: 5\n",
        "a 9-line YAML alias bomb": bomb_lines(),
    }
    for label, text in configs.items():
        (work / "c.yaml").write_text(text)
        result = train(work / "cfg", "--config=c.yaml", "--print_config")
        record(f"--config: {label}", result.returncode, result.stderr, files(work / "cfg"))
    (work / "u16.yaml").write_bytes("train:\n  steps: 5\n".encode("utf-16"))
    run_dir = work / "ckpt"
    train(run_dir, "--train.steps=2")
    newest = str(checkpoint.list_checkpoints(run_dir)[-1])
    for label, path in (("a UTF-16 file", "u16.yaml"), ("a checkpoint", newest), ("a folder", str(work))):
        result = train(work / "cfg", f"--config={path}")
        record(f"--config: {label}", result.returncode, result.stderr, files(work / "cfg"))
    for value in ("-1", "99999999999999999999999"):
        result = train(work / "seed", f"--run.seed={value}")
        record(f"--run.seed={value}", result.returncode, result.stderr, files(work / "seed"))
    result = train(work / "cond", "--model.conditional=true", "--eval.num_samples=2", "--eval.every=2")
    record("a conditional run, eval.num_samples=2", result.returncode, result.stderr, files(work / "cond"))
    for args in (["--num_samples=abc"], ["--num_samples=100.7"], ["--out", "missing/e.json"]):
        result = python("distgan.eval", "--checkpoint", newest, "--metrics=digits", *args, cwd=work)
        record(f"distgan.eval {' '.join(args)}", result.returncode, result.stderr, "nothing new" * (
            not (work / "missing").exists()))  # fmt: skip


def resumes(work: Path) -> None:
    """What a resume notices: another run.seed, shards prepared again."""
    from distgan.bench import write_photos

    run_dir = work / "run"
    train(run_dir, "--train.steps=2")
    result = train(run_dir, "--train.steps=4", "--run.seed=1")
    lines = [line for line in result.stdout.splitlines() if "changed since" in line] or [result.stdout]
    record("resume with another --run.seed", result.returncode, lines[-1], files(run_dir / "checkpoints"))
    write_photos(work / "images", 48, 40, 40)

    def prepare(seed: int) -> None:
        python("distgan.data.prepare", "images", "shards", "--size=32", "--shard_size=16", f"--seed={seed}",
               "--overwrite=true", cwd=work)  # fmt: skip

    prepare(0)
    args = ["--data.source=shards", "--data.path=shards", "--model.channels=3", "--data.workers=0"]
    run_dir = work / "shard_run"
    train(run_dir, *args, "--train.steps=2")
    prepare(1)
    result = train(run_dir, *args, "--train.steps=4")
    record("resume on shards prepared again (another order)", result.returncode, result.stderr,
           files(run_dir / "checkpoints"))  # fmt: skip
    result = train(run_dir, *args, "--train.steps=4", "--data.accept_new_shards=true")
    lines = [line for line in result.stdout.splitlines() if "shard set" in line] or [result.stdout]
    record("... with --data.accept_new_shards=true", result.returncode, lines[-1], files(run_dir / "checkpoints"))


def generators(work: Path) -> None:
    """Exported generator files edited by hand, and what sample may be asked for."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    run_dir = work / "run"
    train(run_dir, "--train.steps=2")
    newest = str(checkpoint.list_checkpoints(run_dir)[-1])
    python("distgan.export", "--checkpoint", newest, "--out", "G.safetensors", cwd=work)
    with safe_open(work / "G.safetensors", framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    wide = {**json.loads(metadata["model"]), "ngf": 300_000}
    edits = {
        "int8": ({k: v.to(torch.int8) if v.is_floating_point() else v for k, v in tensors.items()}, metadata),
        "fp16": ({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, metadata),
        "fp64": ({k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}, metadata),
        "a NaN weight": ({k: v * float("nan") if k.endswith("weight") else v for k, v in tensors.items()}, metadata),
        "metadata model.ngf 300000": (tensors, {**metadata, "model": json.dumps(wide)}),
    }
    for label, (edited, meta) in edits.items():
        save_file(edited, work / "edited.safetensors", metadata=meta)
        result = python("distgan.sample", "--generator", "edited.safetensors", "--out", "s.png", cwd=work)
        record(f"sample --generator, a file with {label}", result.returncode, result.stderr,
               "s.png" if (work / "s.png").exists() else "nothing")  # fmt: skip
    for args in (["--num", "1000000", "--out", "s.npz"], ["--num", "8", "--out", "s.PNG"]):
        result = python("distgan.sample", "--generator", "G.safetensors", *args, cwd=work)
        record(f"sample {' '.join(args)}", result.returncode, result.stderr or result.stdout,
               ", ".join(p.name for p in sorted(work.glob("s.*"))) or "nothing")  # fmt: skip
    full = subprocess.run([sys.executable, "-m", "distgan.sample", "--generator", "G.safetensors", "--num", "64",
                           "--out", "big.npz"], cwd=work, env=ENV, capture_output=True, text=True,
                          preexec_fn=file_size_limit(4096))  # fmt: skip
    record("sample --out on a full disk (a 4 KiB file size limit)", full.returncode, full.stderr,
           "big.npz" if (work / "big.npz").exists() else "nothing")  # fmt: skip


def file_size_limit(size: int):
    """A preexec_fn: files of the child above size bytes fail with EFBIG, as on a full disk (SIGXFSZ ignored)."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def runs(work: Path) -> None:
    """Two prepares into one --out, a metrics.jsonl deleted mid-run, a config error under torchrun, a folder with
    unreadable files."""
    from distgan.bench import write_photos

    write_photos(work / "images", 600, 64, 64)
    first = background([sys.executable, "-m", "distgan.data.prepare", "images", "out", "--size=32"], work)
    wait_until(lambda: any(work.glob(".out*")), first)
    os.killpg(first.pid, signal.SIGSTOP)  # the first holds --out
    second = python("distgan.data.prepare", "images", "out", "--size=32", cwd=work)
    record("a second prepare into a live --out", second.returncode, second.stderr, "the first's files only")
    os.killpg(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    record("... the first then continued", first.returncode, err, files(work / "out"))
    run_dir = work / "mrun"
    proc = background([sys.executable, "-m", "distgan.train", *TINY, f"--run.dir={run_dir}", "--train.steps=400",
                       "--log.every=20"], work)  # fmt: skip
    wait_until(lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size, proc)
    (run_dir / "metrics.jsonl").unlink()
    _, err = proc.communicate(timeout=300)
    rows = len((run_dir / "metrics.jsonl").read_text().splitlines()) if (run_dir / "metrics.jsonl").exists() else 0
    warned = "\n".join(line for line in err.splitlines() if "warning" in line)
    record(
        "metrics.jsonl deleted while the run writes it", proc.returncode, warned, f"a new metrics.jsonl, {rows} rows"
    )
    result = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), "--run.device=cpu", "--train.steps=abc",
                             f"--run.dir={work / 'trun'}"], cwd=work, env={**ENV, "NPROC": "2"}, capture_output=True,
                            text=True)  # fmt: skip
    record("a config error under NPROC=2 launch/torchrun.sh", result.returncode, result.stderr, files(work / "trun"))
    folder = work / "folder"
    for i in range(40):
        (folder / f"{i:02d}.png").parent.mkdir(exist_ok=True)
        (folder / f"{i:02d}.png").write_bytes(b"not a png" if i in (3, 17, 29) else (work / "images" / "photos" /
                                              f"{i:06d}.jpg").read_bytes())  # fmt: skip
    result = train(work / "frun", "--data.source=folder", "--data.path=folder", "--model.channels=3",
                   "--data.workers=0", "--train.steps=20")  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if "unreadable" in line]
    record(f"data.source folder, 3 unreadable files of 40, 20 steps ({len(lines)} lines about them)",
           result.returncode, lines[-1] if lines else result.stderr, files(work / "frun"))  # fmt: skip


PROBES = [two_writers, unreadable, floats, disks, signals, data, clis, flags, resumes, generators, runs]

if __name__ == "__main__":
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    for probe in PROBES:
        if only in probe.__name__:
            with tempfile.TemporaryDirectory(prefix=f"probe-{probe.__name__}-") as work:
                try:
                    probe(Path(work))
                except Exception as e:  # a probe that could not run is a row too
                    record(f"{probe.__name__}: the probe itself failed", None, str(e), "")
    print("| case | exit | last line on stderr (stdout for a resume) | left on disk |\n|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")
