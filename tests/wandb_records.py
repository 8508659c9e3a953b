"""Read back an offline W&B run (its run-<id>.wandb file) without network or a W&B server.

The file is a LevelDB-log framed stream of wandb_internal_pb2.Record messages: a 7-byte header (":W&B",
0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header (CRC32C, length, type); a message
is one FULL chunk or FIRST, MIDDLE..., LAST. A block's tail shorter than a chunk header is zero padding.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def messages(path: Path):
    """The raw Record messages of a .wandb file, in order."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0:  # zero fill: the writer stopped here
            break
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    run_id: str = ""
    project: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one dict per history row, "_step" included
    summary: dict = field(default_factory=dict)
    preempting: bool = False  # marked as preempted (run.mark_preempting)
    exit_code: int | None = None  # None: the run file ends without an exit record (killed)


def read_run(path: Path) -> OfflineRun:
    """Run id, config, history rows and summary of one offline run file."""
    from wandb.proto import wandb_internal_pb2

    run = OfflineRun()
    for raw in messages(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project = record.run.run_id, record.run.project
            run.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "preempting":
            run.preempting = True
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(run_dir: Path) -> list[Path]:
    """The .wandb files of a run directory's offline runs, oldest first."""
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
