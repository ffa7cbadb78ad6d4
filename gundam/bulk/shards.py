"""The output folder of `encode_dataset`: its lock, run.json (the settings), and the shards, written atomically and
read back.

    run.json                              the settings the embeddings were made with (a rerun must match them)
    embeddings/shard-00000.safetensors    "embeddings" [the shard's tokens, n_embed] in the encoder's dtype and
                                          "offsets" [images + 1], as `gundam encode --out` writes them
    manifest/shard-00000.parquet          one row per page or image: id, index (input order), source, page,
                                          width, height, grid, tokens, shard, start, end (rows of the shard's
                                          embeddings), error (null, or why it failed)

Each file is written under a temporary name and renamed into place, the manifest last: a shard whose manifest
exists is finished. run.json is written as the first shard is: settings are only held against a rerun where
there are finished shards, so a run that fails or is killed before it has finished one leaves nothing that the
next run (with any settings) has to match. What is read back is checked: a file
that is corrupt, or of another tool, is a one-line ValueError naming it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import threading

import torch

from gundam.bulk.planning import Settings
from gundam.bulk.sources import one_line, text

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


def manifest_schema(metadata: dict | None = None):
    """The Parquet schema of a shard manifest (pyarrow), with the run's settings as metadata when given."""
    import pyarrow as pa
    return pa.schema([("id", pa.string()), ("index", pa.int64()), ("source", pa.string()), ("page", pa.int32()),
                      ("width", pa.int32()), ("height", pa.int32()), ("grid", pa.list_(pa.int32(), 2)),
                      ("tokens", pa.int32()), ("shard", pa.string()), ("start", pa.int64()), ("end", pa.int64()),
                      ("error", pa.string())], metadata=metadata)


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
        for key in ("id", "source", "error"):   # Parquet strings are UTF-8 (a file name need not be)
            if r[key] is not None:
                r[key] = text(r[key])
    metadata = {"ids": json.dumps([r["id"] for r in done])}   # one key: safetensors orders several at random
    _atomic(lambda tmp: save_file({"embeddings": emb.contiguous(), "offsets": offsets}, tmp, metadata=metadata),
            os.path.join(out_dir, "embeddings", f"{name}.safetensors"))
    schema = manifest_schema({"gundam": json.dumps(settings.record())})
    table = pa.Table.from_pylist([{k: r[k] for k in MANIFEST_COLUMNS} for r in rows], schema=schema)
    path = os.path.join(out_dir, "manifest", f"{name}.parquet")
    _atomic(lambda tmp: pq.write_table(table, tmp), path)
    return path


def manifest_files(out_dir: str) -> list[str]:
    """The manifests of the finished shards, in shard order."""
    folder = os.path.join(out_dir, "manifest")
    if not os.path.isdir(folder):
        return []
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise ValueError(f"{folder!r}: cannot be listed ({e.strerror or e})") from None
    names = [f for f in names if f.endswith(".parquet") and shard_number(f) is not None
             and os.path.isfile(os.path.join(folder, f))]
    return [os.path.join(folder, f) for f in sorted(names, key=shard_number)]


def read_manifest_file(path: str, columns=MANIFEST_COLUMNS) -> list[dict]:
    """The rows of one shard manifest (those columns), checked to be what write_shard writes: a file that is not
    Parquet, or lacks a column or has it of another type (a folder written by another tool), is a one-line
    ValueError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    what = "expected a shard manifest of `gundam encode-dataset`"
    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"manifest {path!r}: not a readable Parquet file ({one_line(e)}): {what}") from None
    want = manifest_schema()
    for name in columns:
        if schema.get_field_index(name) < 0:
            raise ValueError(f"manifest {path!r}: no column {name!r}: {what} (columns {', '.join(MANIFEST_COLUMNS)})")
        if not schema.field(name).type.equals(want.field(name).type):
            raise ValueError(f"manifest {path!r}: column {name!r} is {schema.field(name).type}, {what} (where it is "
                             f"{want.field(name).type})")
    try:
        table = pq.read_table(path, columns=list(columns))
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"manifest {path!r}: cannot read ({one_line(e)}): {what}") from None
    for name in ("id", "index"):
        if name in columns and table.column(name).null_count:
            raise ValueError(f"manifest {path!r}: null values in column {name!r}: {what}")
    return table.to_pylist()


def _check_out_type(out_dir):
    if not isinstance(out_dir, (str, os.PathLike)) or not isinstance(os.fspath(out_dir), str):
        raise TypeError(f"out of type {type(out_dir).__name__}: expected a folder path (str or os.PathLike)")
    return os.fspath(out_dir)


def read_manifest(out_dir) -> list[dict]:
    """One row per id of the finished shards (failures too), in input order. An id encoded again after failing
    (`retry_failed`) has a row per attempt in the shards; the latest is the one returned."""
    out_dir = _check_out_type(out_dir)
    files = manifest_files(out_dir)
    if not files:
        raise ValueError(f"{out_dir!r}: no manifest/shard-*.parquet: expected the --out folder of "
                         f"`gundam encode-dataset`")
    # files in shard order: an id's latest row wins; equal indices (runs over other inputs) keep shard order
    latest = {r["id"]: r for f in files for r in read_manifest_file(f)}
    return sorted(latest.values(), key=lambda r: r["index"])


def read_embeddings(out_dir):
    """Yield (id, embeddings [tokens, n_embed] tensor, metadata dict) for every encoded page and image of an
    `encode-dataset` folder, in input order (failed items are in `read_manifest`, not here). Shards are read
    lazily, one image at a time; a shard file that is missing, corrupt or shorter than its manifest says is a
    one-line ValueError naming it."""
    out_dir = _check_out_type(out_dir)
    shard = path = embeddings = None
    n_rows = 0
    for row in read_manifest(out_dir):
        if row["error"] is not None:
            continue
        if row["shard"] != shard:   # one shard open at a time (rows come shard by shard)
            shard = row["shard"]
            # handle: the open file, kept while its slices are read
            path, (handle, embeddings), n_rows = _open_embeddings(out_dir, shard, row["id"])
        start, end, tokens = row["start"], row["end"], row["tokens"]
        if start is None or end is None or tokens is None or not 0 <= start <= end <= n_rows or end - start != tokens:
            raise ValueError(f"embeddings {path!r}: the manifest gives {row['id']!r} rows {start}:{end} "
                             f"({tokens} tokens) of its {n_rows}: expected the shard its manifest was written with")
        meta = {k: v for k, v in row.items() if k != "id"}
        yield row["id"], embeddings[start:end], meta


def _open_embeddings(out_dir: str, shard, item_id: str):
    """(path, (the open file, a lazy slice of its "embeddings"), its rows) of the shard a manifest row names."""
    from safetensors import SafetensorError, safe_open
    if not isinstance(shard, str) or os.path.basename(shard) != shard or shard_number(shard) is None \
            or not shard.endswith(".safetensors"):
        raise ValueError(f"manifest of {out_dir!r}: {item_id!r} is in shard {shard!r}: expected a file name "
                         f"shard-NNNNN.safetensors")
    path = os.path.join(out_dir, "embeddings", shard)
    try:
        f = safe_open(path, framework="pt")
    except (OSError, SafetensorError) as e:
        raise ValueError(f"embeddings {path!r}: cannot read as safetensors ({one_line(e)})") from None
    if "embeddings" not in f.keys():
        raise ValueError(f"embeddings {path!r}: no \"embeddings\" tensor (it has {sorted(f.keys())[:5]}): expected "
                         f"a shard of `gundam encode-dataset`")
    embeddings = f.get_slice("embeddings")
    shape = embeddings.get_shape()
    if len(shape) != 2:
        raise ValueError(f"embeddings {path!r}: \"embeddings\" has shape {list(shape)}, expected [tokens, n_embed]")
    return path, (f, embeddings), shape[0]


# ------------------------------------------------------------------------------------------ the folder


def check_out_dir(out_dir) -> str:
    """`out_dir` as a path string if a run can write it (an existing folder, or one that can be made), else a
    one-line ValueError; checked before any work, and nothing is created."""
    out_dir = _check_out_type(out_dir)
    if not out_dir:
        raise ValueError("--out '': expected a folder path")
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ValueError(f"--out {out_dir!r}: is a file, expected a folder (new or of an earlier run)")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out_dir!r}: not writable")
        return out_dir
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out_dir!r}: cannot be made ({parent!r} is not a writable folder)")
    return out_dir


_held: set[str] = set()                 # folders locked by runs of this process
_held_guard = threading.Lock()


@contextlib.contextmanager
def locked(out_dir: str):
    """Create the output folder and hold its lock while the block runs: two runs writing one folder would
    number their shards alike.

    The lock is a POSIX record lock (fcntl.lockf) on DIR/.lock. It belongs to this process only: processes
    forked from it (the loader's workers) do not hold it, as they would hold an flock, whose open file they
    share, so it goes when this process ends, however (SIGKILL too), even while its workers wind down. POSIX
    locks do not conflict within one process, so runs in this one are kept apart by the set of folders it
    holds."""
    out_dir = check_out_dir(out_dir)
    busy = ValueError(f"--out {out_dir!r}: another run is writing it, expected one run per folder at a time")
    os.makedirs(out_dir, exist_ok=True)
    key = os.path.realpath(out_dir)
    with _held_guard:
        if key in _held:
            raise busy
        _held.add(key)
    try:
        try:
            fd = os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise ValueError(f"--out {out_dir!r}: cannot open its lock file .lock ({e.strerror or e})") from None
        try:
            if fcntl is not None:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EACCES, errno.EAGAIN):
                        raise busy from None
                    raise ValueError(f"--out {out_dir!r}: cannot lock .lock ({e.strerror or e})") from None
            yield
        finally:
            os.close(fd)   # releases the lock
    finally:
        with _held_guard:
            _held.discard(key)


def _recorded(out_dir: str) -> tuple[dict, str]:
    """The settings the runs that wrote the folder's shards recorded, and where: run.json, or (a folder whose
    run.json is gone) its first finished manifest."""
    run = os.path.join(out_dir, "run.json")
    what = "expected the settings file of `gundam encode-dataset` (use another --out)"
    if os.path.lexists(run):
        try:
            with open(run, encoding="utf-8") as f:
                before = json.load(f)
        except (OSError, ValueError) as e:   # ValueError: not UTF-8, not JSON
            raise ValueError(f"{run!r}: cannot read the run's settings ({one_line(e)}): {what}") from None
        if not isinstance(before, dict):
            raise ValueError(f"{run!r}: holds a JSON {type(before).__name__}, {what}")
        return before, run
    files = manifest_files(out_dir)
    import pyarrow.parquet as pq
    read_manifest_file(files[0], ("id",))   # a manifest at all
    meta = pq.read_schema(files[0]).metadata or {}
    try:
        return json.loads(meta[b"gundam"]), files[0]
    except (KeyError, ValueError):
        raise ValueError(f"manifest {files[0]!r}: no settings in its metadata: expected a shard manifest of "
                         f"`gundam encode-dataset`") from None


def open_output(out_dir: str, settings: Settings, retry_failed: bool) -> tuple[set[str], int]:
    """Reopen the output folder, or check that a new one is empty of shards: (ids done in finished shards, failed
    ones only if not `retry_failed`; number of the next shard). A folder holding shards made with other settings
    is refused (their embeddings would not be comparable with new ones); one without a finished shard holds no
    embeddings, whatever an earlier run recorded before it was stopped. Writes nothing: see `claim`."""
    for sub in ("embeddings", "manifest"):
        if os.path.lexists(os.path.join(out_dir, sub)) and not os.path.isdir(os.path.join(out_dir, sub)):
            raise ValueError(f"--out {out_dir!r}: {sub!r} in it is not a folder: expected the --out folder of "
                             f"`gundam encode-dataset` (or a new one)")
    files = manifest_files(out_dir)
    if files:
        record = settings.record()
        before, where = _recorded(out_dir)
        changed = [k for k in record if before.get(k) != record[k]]
        if changed:
            k = changed[0]
            raise ValueError(f"--out {out_dir!r} holds embeddings made with {k}={before.get(k)!r} ({where}), this "
                             f"run has {k}={record[k]!r}: expected the same settings to resume (or another --out)")
    done = {r["id"] for f in files for r in read_manifest_file(f, ("id", "error"))
            if r["error"] is None or not retry_failed}
    next_number = 1 + max((shard_number(f) for f in files), default=-1)
    return done, next_number


def claim(out_dir: str, settings: Settings):
    """Make the shard folders and record the settings in run.json: done when a run is about to write its first
    shard, so a run stopped before that has claimed nothing that the next one must match. (With finished shards
    in the folder, run.json holds these settings already, or is gone and is written again.)"""
    for sub in ("embeddings", "manifest"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(settings.record(), f, indent=1)
    _atomic(write, os.path.join(out_dir, "run.json"))
