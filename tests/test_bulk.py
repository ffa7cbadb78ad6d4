"""Bulk encoding (gundam.bulk, `gundam encode-dataset`): a small corpus of images, a three-page PDF, a corrupt
file, a missing file and a JSONL manifest, encoded by a tiny encoder."""
import filecmp
import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import pypdfium2 as pdfium
import torch
from safetensors.torch import load_file, save_file
from testutils import OCR2_TINY, TINY, TINY_MODE, assert_close, page, randomize

import gundam
from gundam.bulk import encode_dataset, read_manifest
from gundam.bulk.engines import Group, RayEncoder, encode_group
from gundam.bulk.planning import Settings
from gundam.bulk.shards import locked, shard_name, shard_number
from gundam.bulk.sources import expand_inputs
from gundam.cli import main
from gundam.layout import image_layout
from gundam.weights import default_dtype, resolve_device

# sizes not powers of two; several above 640 px, so they are cropped (grids 3x2, 1x2, 2x1 in TINY_MODE)
IMAGES = {"a/p0.png": (1000, 700), "a/p1.jpg": (500, 300), "a/sub/p2.png": (800, 1500), "b/p3.png": (1300, 900)}
PDF_PAGES = [(350, 450), (600, 250), (150, 150)]   # points: 144 dpi doubles them
# float32: the embeddings are compared with the encoder's in float32 ("auto" is bf16 on some CPUs)
SETTINGS = dict(mode=TINY_MODE, config=TINY, dtype=torch.float32, batch_size=11, shard_size=3, verbose=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i, (name, (w, h)) in enumerate(IMAGES.items()):
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        page(w, h, seed=i).save(root / name)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    pages = [page(w, h, seed=10 + i) for i, (w, h) in enumerate(PDF_PAGES)]
    pages[0].save(root / "doc.pdf", save_all=True, append_images=pages[1:], resolution=72)   # 1 px = 1 pt
    (root / "list.jsonl").write_text(json.dumps({"id": "first", "image": "b/p3.png"}) + "\n\n"
                                     + json.dumps({"image": "doc.pdf"}) + "\n")
    enc = randomize(gundam.GundamEncoder(TINY), seed=3).eval()
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, root / "weights.safetensors")
    inputs = [str(root / "doc.pdf"), str(root / "a"), str(root / "b" / "*.png"), str(root / "missing.png")]
    return root, inputs, enc


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    """The uninterrupted run of the local engine, with worker processes."""
    root, inputs, _ = corpus
    out = tmp_path_factory.mktemp("full")
    summary = encode_dataset(inputs, out, weights=root / "weights.safetensors", workers=2, **SETTINGS)
    return out, summary


def assert_same_shards(a, b):
    """The shard files of two output folders are the same, byte for byte (hidden temporary files aside)."""
    for sub in ("embeddings", "manifest"):
        names = sorted(f for f in os.listdir(a / sub) if not f.startswith("."))
        assert names == sorted(f for f in os.listdir(b / sub) if not f.startswith("."))
        match, mismatch, errors = filecmp.cmpfiles(a / sub, b / sub, names, shallow=False)
        assert not mismatch and not errors, (sub, mismatch, errors)


def expected_ids(root):
    pdf = os.path.normpath(root / "doc.pdf")
    return ([f"{pdf}#{i}" for i in range(3)]
            + [os.path.normpath(root / p) for p in ("a/broken.png", "a/p0.png", "a/p1.jpg", "a/sub/p2.png",
                                                     "b/p3.png", "missing.png")])


def test_expand_inputs(corpus, tmp_path, monkeypatch):
    root, inputs, _ = corpus
    items = expand_inputs(inputs + [str(root / "a" / "p0.png"), str(root / "nothing*.png")])
    assert [it.id for it in items] == expected_ids(root) + [str(root / "nothing*.png")]   # duplicate p0 dropped
    assert [it.page for it in items[:3]] == [0, 1, 2] and items[3].page is None
    assert [it.size for it in items[:3]] == [(2 * w, 2 * h) for w, h in PDF_PAGES]
    assert "no such file" in items[-2].error and "no file matches" in items[-1].error
    assert all(it.error is None for it in items[:-2])   # a corrupt image fails when it is decoded, not listed

    monkeypatch.chdir(root)   # ids as given, sources absolute (what workers elsewhere read)
    assert [(it.id, it.source) for it in expand_inputs(["b", "./a/p1.jpg"])] == [
        ("b/p3.png", str(root / "b/p3.png")), ("a/p1.jpg", str(root / "a/p1.jpg"))]

    listed = expand_inputs(root / "list.jsonl")
    assert [(it.id, it.source, it.page) for it in listed] == [
        ("first", str(root / "b/p3.png"), None), *((f"{root / 'doc.pdf'}#{i}", str(root / "doc.pdf"), i) for i in range(3))]
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4 truncated")
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\nnot json\n')
    bad = expand_inputs([tmp_path / "bad.pdf", tmp_path / "bad.jsonl"])
    assert "cannot open" in bad[0].error and "expected an object" in bad[1].error and "not JSON" in bad[2].error


def test_local_engine_and_reader(corpus, full_run):
    root, inputs, enc = corpus
    out, s = full_run
    ids = expected_ids(root)
    assert (s.items, s.skipped, s.encoded, s.remaining) == (9, 0, 9, 0) and len(s.shards) == 3
    assert [i for i, _ in s.failed] == [ids[3], ids[8]]
    rows = read_manifest(out)
    assert [r["id"] for r in rows] == ids and [r["index"] for r in rows] == list(range(9))
    assert "not an image file" in rows[3]["error"] and "no such file" in rows[8]["error"]
    assert all(r["error"] is None for i, r in enumerate(rows) if i not in (3, 8))

    # each embedding equals the encoder on that image alone (PDF pages rendered here, independently)
    pdf = pdfium.PdfDocument(root / "doc.pdf")
    sources = [pdf[i].render(scale=2).to_pil() for i in range(3)] + [None] + [str(root / p) for p in IMAGES] + [None]
    read = list(gundam.read_embeddings(out))
    assert [r[0] for r in read] == [ids[i] for i in (0, 1, 2, 4, 5, 6, 7)]
    with torch.inference_mode():
        for (item_id, emb, meta), src in zip(read, [s for s in sources if s is not None]):
            w, h = meta["width"], meta["height"]
            lay = image_layout(w, h, TINY_MODE)
            assert (w, h) == (src.size if hasattr(src, "size") else IMAGES[os.path.relpath(src, root)])
            assert meta["grid"] == list(lay.grid) and meta["tokens"] == lay.tokens == emb.shape[0]
            assert meta["page"] == (int(item_id[-1]) if "#" in item_id else None)
            want = enc(gundam.preprocess(src, TINY_MODE)).embeddings
            assert_close(emb, want, atol=1e-4, rtol=1e-4, what=item_id)
    assert {r["grid"][0] * r["grid"][1] for r in rows if r["grid"]} >= {2, 6}   # crops, not just global views

    # a shard file is also what `gundam encode --out` writes: embeddings + offsets of the images it holds
    shard = load_file(out / "embeddings" / "shard-00001.safetensors")
    held = [r for r in rows if r["shard"] == "shard-00001.safetensors"]
    assert shard["offsets"].tolist() == [0] + torch.tensor([r["tokens"] for r in held]).cumsum(0).tolist()


def test_interrupted_run_resumed_equals_uninterrupted(corpus, full_run, tmp_path):
    root, inputs, _ = corpus
    out, _ = full_run
    first = encode_dataset(inputs, tmp_path, weights=root / "weights.safetensors", workers=0, max_shards=1,
                           **SETTINGS)
    assert (first.encoded, first.remaining, len(first.shards)) == (3, 6, 1)
    # what a crash while writing the second shard leaves: a temp file and an embeddings file without manifest
    (tmp_path / "manifest" / ".shard-00001.parquet.tmp").write_bytes(b"partial")
    (tmp_path / "embeddings" / "shard-00001.safetensors").write_bytes(b"partial")
    rest = encode_dataset(inputs, tmp_path, weights=root / "weights.safetensors", workers=0, **SETTINGS)
    assert (rest.skipped, rest.encoded, rest.remaining, len(rest.shards)) == (3, 6, 0, 2)
    assert_same_shards(out, tmp_path)
    again = encode_dataset(inputs, tmp_path, weights=root / "weights.safetensors", workers=0, **SETTINGS)
    assert (again.skipped, again.encoded, again.shards) == (9, 0, [])

    with pytest.raises(ValueError, match="dtype"):   # other settings would mix incomparable embeddings
        encode_dataset(inputs, tmp_path, weights=root / "weights.safetensors", **{**SETTINGS, "dtype": "float16"})



def hold_lock(folder):
    """Another process holding the folder's lock as a run does (a POSIX lock on .lock); stop it with .kill()."""
    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.lockf(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder / ".lock")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_one_run_per_folder(corpus, tmp_path):
    root, inputs, _ = corpus
    run = dict(weights=root / "weights.safetensors", workers=0, **SETTINGS)
    # a run in another process keeps a second one out, with one line; once it is gone the folder is free
    other = hold_lock(tmp_path)
    try:
        with pytest.raises(ValueError, match=r"another run is writing it, expected one run per folder") as e:
            encode_dataset(inputs, tmp_path, **run)
        assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    finally:
        other.kill()
        other.wait()
    assert not (tmp_path / "run.json").exists()          # the refused run wrote nothing
    # a run in this process too (POSIX locks do not conflict within one process: the held set does)
    with locked(str(tmp_path)):
        with pytest.raises(ValueError, match="another run is writing it"):
            encode_dataset(inputs, tmp_path, **run)
        with pytest.raises(ValueError, match="another run is writing it"):
            with locked(str(tmp_path / "." )):             # the same folder by another name
                pass
    # a process forked while the lock is held does not keep it once its parent lets go (the loader's workers)
    with locked(str(tmp_path)):
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        child.start()
    try:
        free = hold_lock(tmp_path)                       # would block while the child held it
        free.kill()
        free.wait()
    finally:
        child.kill()
        child.join()
    assert (encode_dataset(inputs, tmp_path, **run).encoded) == 9


def test_retry_failed(corpus, tmp_path):
    # an image that failed is encoded again only with retry_failed (once fixed); the manifest keeps its latest row
    root, _, enc = corpus
    page(700, 500, seed=1).save(tmp_path / "good.png")
    (tmp_path / "fixed.png").write_bytes(b"not an image")
    run = dict(weights=root / "weights.safetensors", workers=0, **SETTINGS)
    out = tmp_path / "out"
    first = encode_dataset([tmp_path / "good.png", tmp_path / "fixed.png"], out, **run)
    assert [i for i, _ in first.failed] == [str(tmp_path / "fixed.png")]
    fixed = page(900, 400, seed=2)
    fixed.save(tmp_path / "fixed.png")
    again = encode_dataset([tmp_path / "good.png", tmp_path / "fixed.png"], out, **run)
    assert (again.skipped, again.encoded) == (2, 0) and read_manifest(out)[1]["error"] is not None
    retried = encode_dataset([tmp_path / "good.png", tmp_path / "fixed.png"], out, retry_failed=True, **run)
    assert (retried.skipped, retried.encoded, retried.failed) == (1, 1, [])
    rows = read_manifest(out)
    assert [(r["id"], r["error"], r["shard"]) for r in rows] == [
        (str(tmp_path / "good.png"), None, "shard-00000.safetensors"),
        (str(tmp_path / "fixed.png"), None, "shard-00001.safetensors")]
    (_, emb, _), (_, emb_fixed, _) = gundam.read_embeddings(out)
    with torch.inference_mode():
        want = enc(gundam.preprocess(fixed, TINY_MODE)).embeddings
    assert_close(emb_fixed, want, atol=1e-4, rtol=1e-4, what="retried image")


def test_encoder_failure_fails_its_batch_only(tmp_path):
    class Broken:
        def __call__(self, batch):
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
    batch = gundam.preprocess(page(300, 200, 0), TINY_MODE)
    rows = [{"id": "x", "tokens": 21, "error": None}, {"id": "y", "tokens": None, "error": "bad"}]
    rows, emb = encode_group(Broken(), Group(rows, batch))
    assert emb is None and rows[0]["error"] == "'x': encoder failed (CUDA out of memory.)"


def test_cli(corpus, tmp_path, monkeypatch, capsys):
    root, _, _ = corpus
    monkeypatch.setattr(gundam.EncoderConfig, "deepseek_ocr", staticmethod(lambda: TINY))   # tiny random weights
    args = ["encode-dataset", str(root / "a" / "p1.jpg"), str(root / "a" / "broken.png"), "--out", str(tmp_path / "o"),
            "--mode", "tiny", "--workers", "0"]
    assert main(args) == 2   # a bad input: recorded, reported, exit status 2; the good one is encoded
    out, err = capsys.readouterr()
    assert "1 of 2 pages and images encoded (73 tokens), 1 failed, 1 new shards" in out
    assert "error: image" in err and "broken.png" in err and "error: 1 of 2 pages and images failed" in err
    # --dtype auto (the default) is gundam.weights' choice for this machine: recorded, and what was written
    auto = default_dtype(resolve_device(None))
    assert json.loads((tmp_path / "o" / "run.json").read_text())["dtype"] == str(auto).removeprefix("torch.")
    assert [(m["tokens"], emb.dtype) for _, emb, m in gundam.read_embeddings(tmp_path / "o")] == [(73, auto)]

    (tmp_path / "file").write_text("")
    for bad, why in ((["--mode", "gundam", "--batch-size", "6"], "batch_size=6 views: an image can have 7 in this "),
                     (["--out", str(tmp_path / "file")], "is a file"),
                     (["--engine", "local", "--workers", "-1"], "workers=-1"), (["--dpi", "0"], "dpi=0.0")):
        assert main(args + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


BF16_AUTO = default_dtype(resolve_device(None)) == torch.bfloat16


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float32"), pytest.param(
    torch.bfloat16, id="bfloat16", marks=pytest.mark.skipif(not BF16_AUTO, reason="no native bf16 on this CPU: "
                                                             "dtype auto never encodes in bf16 here"))])
def test_ray_engine_matches_local(corpus, full_run, ray_session, tmp_path, dtype):
    # byte for byte: the same batches, the same torch threads (the bf16 bits depend on them on AMX), the same writer
    root, inputs, _ = corpus
    run = dict(weights=root / "weights.safetensors", **{**SETTINGS, "dtype": dtype})
    out, local = full_run
    if dtype != torch.float32:
        out = tmp_path / "local"
        local = encode_dataset(inputs, out, workers=2, **run)
    s = encode_dataset(inputs, tmp_path / "ray", engine="ray", **run)
    assert (s.encoded, s.failed, s.tokens) == (local.encoded, local.failed, local.tokens)
    assert_same_shards(out, tmp_path / "ray")


def test_ocr2_weights_set_the_family(tmp_path):
    # DeepSeek-OCR 2 weights: the mode follows them (no mode given), run.json records the family, every image's
    # tokens are the OCR-2 layout's and equal the encoder's own output; a DeepSeek-OCR mode is refused up front
    enc = randomize(gundam.GundamEncoder(OCR2_TINY), seed=5).eval()
    weights = tmp_path / "ocr2.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in enc.state_dict().items()}, weights)
    sizes = [(900, 500), (300, 200)]          # 2x1 crops (over 768 px), none
    for i, (w, h) in enumerate(sizes):
        page(w, h, seed=20 + i).save(tmp_path / f"p{i}.png")
    inputs = [str(tmp_path / f"p{i}.png") for i in range(len(sizes))]
    with pytest.raises(ValueError, match="does not fit the weights .*: views of a deepseek-ocr mode"):
        encode_dataset(inputs, tmp_path / "refused", weights=weights, mode="gundam", verbose=False)
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "out"
    encode_dataset(inputs, out, weights=weights, config=OCR2_TINY, dtype=torch.float32, workers=0, verbose=False)
    assert json.loads((out / "run.json").read_text())["mode"]["family"] == "deepseek-ocr2"
    read = list(gundam.read_embeddings(out))
    assert [meta["tokens"] for _, _, meta in read] == [16 + 2 * 9 + 1, 16 + 1]
    with torch.inference_mode():
        for (_, emb, _), path in zip(read, inputs):
            assert_close(emb, enc(enc.preprocess(path)).embeddings, atol=1e-5, rtol=1e-5, what=path)


def test_ray_actor_takes_the_driver_threads():
    # Ray starts an actor with one torch thread per CPU it reserved; the settings bring the driver's count
    threads = torch.get_num_threads()
    assert Settings(TINY_MODE, 144.0, None, TINY, torch.float32).threads == threads
    try:
        RayEncoder(Settings(TINY_MODE, 144.0, None, TINY, torch.float32, threads=threads + 1))
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)


def test_shard_names():
    assert shard_name(7) == "shard-00007" and shard_number("out/manifest/shard-00007.parquet") == 7
    assert shard_number(shard_name(123456) + ".safetensors") == 123456   # past five digits too
    assert shard_number(".shard-00001.parquet.tmp") is None and shard_number("notes.parquet") is None
