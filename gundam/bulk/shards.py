"""The output folder of `encode_dataset`: its lock, run.json (the settings), and the shards, written atomically and
read back.

    run.json                              the settings the embeddings were made with (a rerun must match them)
    embeddings/shard-00000.safetensors    "embeddings" [the shard's tokens, n_embed] in the encoder's dtype and
                                          "offsets" [images + 1], as `gundam encode --out` writes them
    manifest/shard-00000.parquet          one row per page or image: id, index (input order), source, page,
                                          width, height, grid, tokens, shard, start, end (rows of the shard's
                                          embeddings), error (null, or why it failed)

Each file is written under a temporary name and renamed into place, the manifest last: a shard whose manifest
exists is finished.
"""
from __future__ import annotations

import contextlib
import json
import os
import re

import torch

from gundam.bulk.planning import Settings

try:
    import fcntl
except ImportError:     # Windows: no flock; keeping to one run per output folder is up to the user there
    fcntl = None

MANIFEST_COLUMNS = ("id", "index", "source", "page", "width", "height", "grid", "tokens", "shard", "start", "end",
                    "error")


def shard_name(number: int) -> str:
    """The name of shard `number`'s files, without extension: shard-00000, shard-00001, ..."""
    return f"shard-{number:05d}"


def shard_number(filename: str) -> int | None:
    """The number of a shard file (shard-00012.parquet -> 12); None for any other name (temporary files)."""
    m = re.fullmatch(r"shard-(\d+)\.(parquet|safetensors)", os.path.basename(filename))
    return int(m[1]) if m else None


def _atomic(write, path: str):
    """write(tmp) then rename: a reader never sees a partial file, a crash leaves only a hidden temp file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # as an ordinary new file (safetensors makes its files private)
    os.replace(tmp, path)


def write_shard(out_dir: str, number: int, rows: list[dict], embeddings: list[torch.Tensor], settings: Settings):
    """One shard: its embeddings file, then its manifest (the mark that the shard is finished). Returns the
    manifest's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    name = shard_name(number)
    n_embed = settings.config.projector.n_embed
    emb = torch.cat(embeddings) if embeddings else torch.zeros(0, n_embed, dtype=settings.dtype)
    done = [r for r in rows if r["error"] is None]
    offsets = torch.tensor([0] + [r["tokens"] for r in done], dtype=torch.int64).cumsum(0)
    if offsets[-1] != emb.shape[0]:
        raise RuntimeError(f"{name}: {emb.shape[0]} embedding rows for {int(offsets[-1])} tokens")
    start = iter(offsets.tolist())
    for r in rows:
        ok = r["error"] is None
        r["shard"] = f"{name}.safetensors" if ok else None
        r["start"] = next(start) if ok else None
        r["end"] = r["start"] + r["tokens"] if ok else None
    metadata = {"ids": "\n".join(r["id"] for r in done)}   # one key: safetensors orders several at random
    _atomic(lambda tmp: save_file({"embeddings": emb.contiguous(), "offsets": offsets}, tmp, metadata=metadata),
            os.path.join(out_dir, "embeddings", f"{name}.safetensors"))
    schema = pa.schema([("id", pa.string()), ("index", pa.int64()), ("source", pa.string()), ("page", pa.int32()),
                        ("width", pa.int32()), ("height", pa.int32()), ("grid", pa.list_(pa.int32(), 2)),
                        ("tokens", pa.int32()), ("shard", pa.string()), ("start", pa.int64()), ("end", pa.int64()),
                        ("error", pa.string())],
                       metadata={"gundam": json.dumps(settings.record())})
    table = pa.Table.from_pylist([{k: r[k] for k in MANIFEST_COLUMNS} for r in rows], schema=schema)
    path = os.path.join(out_dir, "manifest", f"{name}.parquet")
    _atomic(lambda tmp: pq.write_table(table, tmp), path)
    return path


def manifest_files(out_dir: str) -> list[str]:
    """The manifests of the finished shards, in shard order."""
    folder = os.path.join(out_dir, "manifest")
    if not os.path.isdir(folder):
        return []
    names = [f for f in os.listdir(folder) if f.endswith(".parquet") and shard_number(f) is not None]
    return [os.path.join(folder, f) for f in sorted(names, key=shard_number)]


def read_manifest(out_dir) -> list[dict]:
    """One row per id of the finished shards (failures too), in input order. An id encoded again after failing
    (`retry_failed`) has a row per attempt in the shards; the latest is the one returned."""
    import pyarrow.parquet as pq
    out_dir = os.fspath(out_dir)
    files = manifest_files(out_dir)
    if not files:
        raise ValueError(f"{out_dir!r}: no manifest/shard-*.parquet: expected the --out folder of "
                         f"`gundam encode-dataset`")
    # files in shard order: an id's latest row wins; equal indices (runs over other inputs) keep shard order
    latest = {r["id"]: r for f in files for r in pq.read_table(f).to_pylist()}
    return sorted(latest.values(), key=lambda r: r["index"])


def read_embeddings(out_dir):
    """Yield (id, embeddings [tokens, n_embed] tensor, metadata dict) for every encoded page and image of an
    `encode-dataset` folder, in input order (failed items are in `read_manifest`, not here). Shards are read
    lazily, one image at a time."""
    from safetensors import safe_open
    out_dir = os.fspath(out_dir)
    shard = f = None
    for row in read_manifest(out_dir):
        if row["error"] is not None:
            continue
        if row["shard"] != shard:   # one shard open at a time (rows come shard by shard)
            shard = row["shard"]
            f = safe_open(os.path.join(out_dir, "embeddings", shard), framework="pt")
        embeddings = f.get_slice("embeddings")[row["start"]:row["end"]]
        meta = {k: v for k, v in row.items() if k != "id"}
        yield row["id"], embeddings, meta


@contextlib.contextmanager
def locked(out_dir: str):
    """Create the output folder and hold its lock while the block runs: two runs writing one folder would
    number their shards alike. The OS drops the lock when the process dies."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r}: is a file, expected a folder (new or of an earlier run)")
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"--out {out_dir!r}: not writable")
    with open(os.path.join(out_dir, ".lock"), "a") as lock:
        try:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {out_dir!r}: another run is writing it, expected one run per folder at a "
                             "time") from None
        yield


def open_output(out_dir: str, settings: Settings, retry_failed: bool) -> tuple[set[str], int]:
    """Reopen the output folder (or set up a new one): (ids done in finished shards, failed ones only if not
    `retry_failed`; number of the next shard). A folder written with other settings is refused (its embeddings
    would not be comparable with new ones)."""
    import pyarrow.parquet as pq
    for sub in ("embeddings", "manifest"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    record, run = settings.record(), os.path.join(out_dir, "run.json")
    if os.path.exists(run):
        with open(run, encoding="utf-8") as f:
            before = json.load(f)
        changed = [k for k in record if before.get(k) != record[k]]
        if changed:
            k = changed[0]
            raise ValueError(f"--out {out_dir!r} holds embeddings made with {k}={before.get(k)!r}, this run has "
                             f"{k}={record[k]!r}: expected the same settings to resume (or another --out)")
    else:
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
        _atomic(write, run)
    files = manifest_files(out_dir)
    done = {r["id"] for f in files for r in pq.read_table(f, columns=["id", "error"]).to_pylist()
            if r["error"] is None or not retry_failed}
    next_number = 1 + max((shard_number(f) for f in files), default=-1)
    return done, next_number

