"""Crash consistency of `gundam encode-dataset`: a real run (its own process, with loader workers) is killed with
SIGKILL at several points; an immediate rerun of the same command finishes, and the folder it leaves is the one an
uninterrupted run writes, byte for byte, with every id exactly once in `read_embeddings`.

The points inside a shard's writing are hit exactly: the run goes through a small launcher that wraps the shard
writer's atomic rename and kills its own process (SIGKILL, nothing runs after it) at the point asked for. One more
run is killed from outside, at whatever moment it has reached once it has finished a shard. The loader's workers
outlive their killed parent by a few seconds (they notice it is gone when they next wait), so the rerun starts
while they still hold the lock file open: the lock must not go with them.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import gundam
from gundam.bulk.planning import Settings
from gundam.bulk.shards import open_output
from gundam.config import resolve_mode
from testutils import MICRO

# the micro encoder (random weights, seed 0) through the CLI: testutils' MICRO config, patched in by the launcher
LAUNCHER = """
import json, multiprocessing, os, signal, sys
import gundam.bulk.shards as shards, gundam.cli
from gundam.config import EncoderConfig
sys.path.insert(0, {tests!r})
from testutils import MICRO
EncoderConfig.deepseek_ocr = staticmethod(lambda: MICRO)
point, shard, pids = sys.argv[1], sys.argv[2], sys.argv[3]

def die():
    with open(pids, "w") as f:    # the loader's workers, still running
        json.dump([p.pid for p in multiprocessing.active_children()], f)
    os.kill(os.getpid(), signal.SIGKILL)

atomic = shards._atomic
def atomic_then_die(write, path):
    name = os.path.basename(path)
    mine = name.startswith(shard + ".")
    if mine and point == "before-shard" and name.endswith(".safetensors"):
        die()
    if mine and point == "manifest-written-not-renamed" and name.endswith(".parquet"):
        atomic(lambda tmp: (write(tmp), die()), path)
    atomic(write, path)
    if mine and point == "embeddings-renamed" and name.endswith(".safetensors"):
        die()
    if mine and point == "manifest-renamed" and name.endswith(".parquet"):
        die()
shards._atomic = atomic_then_die
sys.exit(gundam.cli.main(sys.argv[4:]))
"""
# (point, shard it is in): before the first shard (nothing written yet), and inside and after later ones
BAD_INDEX = 7   # p05.png, after the PDF's two pages and p00..p04
POINTS = [("before-shard", "shard-00000"), ("embeddings-renamed", "shard-00001"),
          ("manifest-written-not-renamed", "shard-00002"), ("manifest-renamed", "shard-00003")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 small images (one not an image) and a 2-page PDF: 14 items, 7 shards of 2."""
    root = tmp_path_factory.mktemp("crash")
    rng = np.random.default_rng(0)
    for i in range(12):
        size = (int(rng.integers(60, 400)), int(rng.integers(60, 400)))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"p{i:02d}.png")
    (root / "p05.png").write_bytes(b"not an image")
    pages = [Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)) for _ in range(2)]
    pages[0].save(root / "doc.pdf", save_all=True, append_images=pages[1:], resolution=72)
    return root


def command(root, out):
    return ["encode-dataset", str(root), "--out", str(out), "--mode", "tiny", "--dtype", "float32", "--workers", "2",
            "--batch-size", "1", "--shard-size", "2", "--device", "cpu"]


def launch(args, point="none", shard="-", pids=os.devnull):
    """argv of the CLI through the launcher: killed at `point` of `shard`, or (point "none") as a plain run."""
    tests = os.path.dirname(os.path.abspath(__file__))
    return [sys.executable, "-c", LAUNCHER.format(tests=tests), point, shard, str(pids), *args]


def run(args, **kill):
    """Run to its end (or its death). Output goes to files, not pipes: the workers inherit the pipes, and
    reading them to their end would wait for the workers too."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        r = subprocess.run(launch(args, **kill), stdout=out, stderr=err, text=True, timeout=120)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(r.args, r.returncode, out.read(), err.read())


def folder_files(out):
    """Every file of an output folder (hidden ones too, the lock aside) -> its bytes."""
    files = {}
    for dirpath, _, names in os.walk(out):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, out)
            if rel != ".lock":
                with open(path, "rb") as f:
                    files[rel] = f.read()
    return files


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    r = run(command(corpus, out))
    assert r.returncode == 2, r.stderr            # one bad image: recorded, exit status 2
    return out, folder_files(out)


def alive(pids):
    """The processes among `pids` that are still running (not gone, not zombies)."""
    running = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            running.append(pid)
    return running


def check_same(out, reference):
    ref_out, ref_files = reference
    files = folder_files(out)
    assert sorted(files) == sorted(ref_files)      # no temporary file left, no shard more or less
    assert not [name for name in files if files[name] != ref_files[name]]
    read = [(i, emb.contiguous().numpy().tobytes()) for i, emb, _ in gundam.read_embeddings(out)]
    ref = [(i, emb.contiguous().numpy().tobytes()) for i, emb, _ in gundam.read_embeddings(ref_out)]
    assert len({i for i, _ in read}) == len(read) == 13     # every good id once (14 items, one bad)
    assert read == ref


@pytest.mark.parametrize("point,shard", POINTS)
def test_killed_then_rerun_equals_uninterrupted(corpus, reference, tmp_path, point, shard):
    out, pids = tmp_path / "out", tmp_path / "pids.json"
    killed = run(command(corpus, out), point=point, shard=shard, pids=pids)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    workers = json.loads(pids.read_text())
    assert len(workers) == 2
    orphans = alive(workers)                       # still winding down as the rerun starts
    done = sorted(f for f in os.listdir(out / "manifest") if not f.startswith(".")) \
        if (out / "manifest").is_dir() else []
    assert len(done) == int(shard[-1]) + (point == "manifest-renamed")
    if not done:   # no finished shard: the folder holds nothing the next run, whatever its settings, must match
        other = Settings(resolve_mode("tiny"), 72.0, None, MICRO, torch.float32)
        assert open_output(str(out), other, False) == (set(), 0)
    rerun = run(command(corpus, out))
    bad_left = len(done) * 2 <= BAD_INDEX          # the bad image is encoded (and fails) in this run or before
    assert rerun.returncode == (2 if bad_left else 0) and "another run" not in rerun.stderr, rerun.stderr
    assert f"{len(done) * 2} done before" in rerun.stdout, rerun.stdout
    assert orphans, "the killed run's workers were gone before the rerun: the lock case was not exercised"
    check_same(out, reference)


def test_killed_from_outside_then_rerun_equals_uninterrupted(corpus, reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(launch(command(corpus, out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "manifest" / "shard-00001.parquet").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    rerun = run(command(corpus, out))
    assert rerun.returncode in (0, 2) and "another run" not in rerun.stderr, rerun.stderr
    check_same(out, reference)
