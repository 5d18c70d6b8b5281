"""Real multiruns of launch.py in a subprocess (tiny Llama on CPU, eager graph, a few tokens)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAST = ["model=tiny_llama", "args.device=cpu", "transforms/compile=torch-simple", "prompt.sp_kwargs.max_tokens=4",
        "prompt.batch_size=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def launch(cwd: Path, *argv: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


def summary_rows(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def results(job_dir: Path) -> dict:
    return json.loads((job_dir / "results.json").read_text())


def failure(job_dir: Path) -> dict:
    return json.loads((job_dir / "failure.json").read_text())


def assert_png(path: Path) -> None:
    """A PNG that decodes, with a real size."""
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] >= 300 and img.size[1] >= 200


def show(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"


def wandb_records(run_dir: Path) -> list:
    """The records of the one offline W&B run under ``run_dir/wandb`` (LevelDB-style log of protobufs)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run in {run_dir}, found {files}"
    data, block, pos, chunk, records = files[0].read_bytes(), 32768, 7, b"", []  # 7: the W&B file header
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST piece of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def wandb_run(run_dir: Path) -> dict:
    """What the offline run holds: its run record's name/group, its config, and its summary."""
    records = wandb_records(run_dir)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in r.config.update if item.key})
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
    logged = {item.nested_key[0] if item.nested_key else item.key
              for r in records if r.WhichOneof("record_type") == "history" for item in r.history.item}
    return {"name": run.display_name, "group": run.run_group, "job_type": run.job_type, "config": config,
            "summary": summary, "logged": logged}
