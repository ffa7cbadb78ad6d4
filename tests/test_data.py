import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gundam import preprocess
from gundam.cli import main
from gundam.data import GundamDataset, Record, ViewBudgetSampler, collate, read_records, write_records
from gundam.layout import crop_grid
from gundam.data.overfit import make_overfit_set, render
from testutils import TINY_MODE, page

# (width, height) -> crop grid in TINY_MODE (192 px crops): a mix of grids, and one image too small to crop
SIZES = {(700, 300): (2, 1), (300, 900): (1, 3), (1000, 1000): (2, 2), (500, 400): (1, 1), (1300, 620): (2, 1),
         (650, 1500): (1, 2)}


def write_set(tmp_path, sizes=SIZES):
    """Random pages of the given sizes as PNGs plus their records.jsonl; returns the records file."""
    (tmp_path / "img").mkdir()
    records = []
    for i, (w, h) in enumerate(sizes):
        page(w, h, seed=i).save(tmp_path / "img" / f"p{i}.png", compress_level=1)
        records.append(Record(f"p{i}", f"img/p{i}.png", "test", "page", "<image>\nFree OCR.", f"page {i}", w, h))
    write_records(tmp_path / "records.jsonl", records)
    return tmp_path / "records.jsonl"


def test_records_roundtrip_and_bad_lines(tmp_path):
    path = write_set(tmp_path)
    records = read_records(path)
    assert [(r.width, r.height) for r in records] == list(SIZES) and records[2].answer == "page 2"
    good = json.loads(path.read_text().splitlines()[0])
    for bad, message in (("{not json", "not JSON"), (json.dumps({"id": "x"}), "missing fields"),
                         (json.dumps({**good, "width": 12.5}), "width=12.5"),
                         (json.dumps({**good, "answer": 7}), "answer=7: expected a string")):
        (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n\n" + bad + "\n")
        with pytest.raises(ValueError, match=rf"bad.jsonl:3: .*{re.escape(message)}"):
            read_records(tmp_path / "bad.jsonl")


def test_records_not_utf8_name_the_line(tmp_path):
    # invalid UTF-8 is that line's error (file:line), not a UnicodeDecodeError; a byte order mark is skipped
    path = write_set(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(lines))
    assert read_records(tmp_path / "bom.jsonl") == read_records(path)
    for bad in (b'{"id": "caf\xe9"}\n', b"\xff\xfe\n", b'{"id": "\xc3"}\n'):
        (tmp_path / "bad.jsonl").write_bytes(lines[0] + bad)
        with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8 \(byte \d+ of the line is b'\\x..'\)") as e:
            read_records(tmp_path / "bad.jsonl")
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8"):
            GundamDataset.from_jsonl(tmp_path / "bad.jsonl", TINY_MODE)


@pytest.mark.parametrize("make,error,match", [
    (lambda: GundamDataset(None, "."), TypeError, "records of type NoneType: expected a list of Record"),
    (lambda: GundamDataset("records.jsonl", "."), TypeError, "GundamDataset.from_jsonl"),
    (lambda: GundamDataset([{"id": "x"}], "."), TypeError, r"records\[0\] of type dict: expected a Record"),
    (lambda: GundamDataset([], None), TypeError, "root of type NoneType"),
    (lambda: collate(None), TypeError, "collate: got NoneType, expected a list of Example"),
    (lambda: collate([{"x": 1}]), TypeError, "collate: got a list holding dict"),
])
def test_dataset_wrong_kinds(make, error, match):
    with pytest.raises(error, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_collate_offsets_and_crop_metadata(tmp_path, tiny_encoder):
    ds = GundamDataset.from_jsonl(write_set(tmp_path), TINY_MODE)
    assert [lay.grid for lay in ds.layouts] == list(SIZES.values())
    rb = collate([ds[i] for i in range(len(ds))])
    b = rb.batch
    n_crops = [w * h if (w, h) != (1, 1) else 0 for w, h in SIZES.values()]
    assert b.global_views.dtype == b.crops.dtype == torch.uint8
    assert b.global_views.shape == (6, 3, 256, 256) and b.crops.shape == (sum(n_crops), 3, 192, 192)
    assert rb.crop_offsets.tolist() == np.cumsum([0] + n_crops).tolist()
    # tokens: 4x(4+1) global + (3h)x(3w+1) local + 1, written out (qb = 256/64, qi = 192/64)
    tokens = [20 + (3 * h * (3 * w + 1) if (w, h) != (1, 1) else 0) + 1 for w, h in SIZES.values()]
    assert rb.offsets.tolist() == np.cumsum([0] + tokens).tolist()
    assert [r.id for r in rb.records] == [f"p{i}" for i in range(6)]
    # crops of image i: the image resized to the grid and cut row-major, computed here with PIL directly
    for i, ((w, h), (gw, gh)) in enumerate(SIZES.items()):
        img = Image.open(tmp_path / "img" / f"p{i}.png").convert("RGB").resize((192 * gw, 192 * gh))
        crops = b.crops[rb.crop_offsets[i]:rb.crop_offsets[i + 1]]
        for k, crop in enumerate(crops):
            ty, tx = divmod(k, gw)
            want = np.asarray(img.crop((tx * 192, ty * 192, (tx + 1) * 192, (ty + 1) * 192)))
            assert np.array_equal(crop.permute(1, 2, 0).numpy(), want), (i, k)
    # uint8 views normalise to exactly what preprocess gives; the encoder reads them the same way
    pre = preprocess([tmp_path / "img" / f"p{i}.png" for i in range(6)], TINY_MODE)
    assert torch.equal(b.global_views.float() / 255 * 2 - 1, pre.global_views)
    assert torch.equal(b.crops.float() / 255 * 2 - 1, pre.crops)
    with torch.no_grad():
        out = tiny_encoder(b)
        assert out.embeddings.shape[0] == rb.offsets[-1]
        for i in (1, 3):   # one image alone gives the rows the batch has at its offsets
            alone = tiny_encoder(collate([ds[i]]).batch).embeddings
            err = (out.split()[i] - alone).abs().max().item()
            assert err < 1e-4, f"image {i}: max abs err {err:.2e}"


def test_dataset_and_collate_errors(tmp_path):
    path = write_set(tmp_path)
    records = read_records(path)
    records[1] = Record(**{**records[1].__dict__, "width": 301})
    ds = GundamDataset(records, tmp_path, TINY_MODE)
    with pytest.raises(ValueError, match=r"record 'p1': width x height 301x900, but the image .* is 300x900"):
        ds[1]
    other = GundamDataset(records, tmp_path, "gundam")
    with pytest.raises(ValueError, match="collate: record 'p0' has mode"):
        collate([ds[0], other[0]])
    with pytest.raises(ValueError, match="no examples"):
        collate([])


def batches_of(loader):
    return [(tuple(r.id for r in rb.records), rb.batch.global_views, rb.batch.crops, rb.crop_offsets)
            for rb in loader]


def test_workers_give_the_same_batches(tmp_path):
    ds = GundamDataset.from_jsonl(write_set(tmp_path), TINY_MODE)
    got = {}
    for workers in (0, 2):
        sampler = ViewBudgetSampler(ds.views, budget=7, seed=3)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        got[workers] = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            got[workers].append(batches_of(loader))
    ids = {workers: [[b[0] for b in epoch] for epoch in got[workers]] for workers in got}
    assert ids[0] == ids[2] and ids[0][0] != ids[0][1]  # same batches; the next epoch reshuffles
    for epoch0, epoch2 in zip(got[0], got[2]):
        for a, b in zip(epoch0, epoch2):
            assert all(torch.equal(x, y) for x, y in zip(a[1:], b[1:])), a[0]


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")  # without an accelerator nothing is pinned
def test_pin_memory_loader(tmp_path):
    ds = GundamDataset.from_jsonl(write_set(tmp_path, list(SIZES)[:3]), TINY_MODE)
    sampler = ViewBudgetSampler(ds.views, budget=16, shuffle=False)
    plain = batches_of(DataLoader(ds, batch_sampler=sampler, collate_fn=collate))
    pinned = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate, pin_memory=True))
    for rb, want in zip(pinned, plain):
        assert torch.equal(rb.batch.global_views, want[1]) and torch.equal(rb.batch.crops, want[2])
        if torch.cuda.is_available():
            assert rb.batch.global_views.is_pinned() and rb.batch.crops.is_pinned()
            on = rb.to("cuda")
            assert on.batch.crops.device.type == "cuda" and on.batch.crops.dtype == torch.uint8


@pytest.mark.parametrize("seed", range(5))
def test_view_budget_sampler(seed):
    rng = random.Random(seed)
    views = [rng.randint(1, 10) for _ in range(rng.randint(1, 60))]
    budget = rng.randint(10, 30)
    sampler = ViewBudgetSampler(views, budget, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(views)))      # each index exactly once
    for k, b in enumerate(batches):
        assert sum(views[i] for i in b) <= budget
        if k + 1 < len(batches):  # a batch closes only when the next image would not fit
            assert sum(views[i] for i in b) + views[batches[k + 1][0]] > budget
    assert list(ViewBudgetSampler(views, budget, seed=seed)) == batches          # deterministic
    sampler.set_epoch(1)
    order = [i for b in batches for i in b]
    if len(views) > 5:
        assert [i for b in sampler for i in b] != order                          # a new shuffle per epoch
        assert [i for b in ViewBudgetSampler(views, budget, seed=seed + 100) for i in b] != order
    assert [i for b in ViewBudgetSampler(views, budget, shuffle=False) for i in b] == list(range(len(views)))


def test_view_budget_sampler_errors():
    with pytest.raises(ValueError, match="budget=4 views: item 1 alone has 7 views; expected a budget of at least 7"):
        ViewBudgetSampler([3, 7, 2], 4)
    with pytest.raises(ValueError, match=r"views\[0\]=0"):
        ViewBudgetSampler([0], 4)
    with pytest.raises(ValueError, match="budget=0"):
        ViewBudgetSampler([1], 0)


def test_view_budget_sampler_seed_range():
    # seed + epoch seeds a 64-bit generator: each is checked to 2^63 - 1 (so the sum fits), not accepted and then
    # overflowing in torch ("Overflow when unpacking long long")
    top = 2 ** 63 - 1
    sampler = ViewBudgetSampler([1, 2, 3, 1], 4, seed=top)
    sampler.set_epoch(top)
    assert sorted(i for b in sampler for i in b) == [0, 1, 2, 3]
    for make in (lambda: ViewBudgetSampler([1], 4, seed=2 ** 70), lambda: ViewBudgetSampler([1], 4, seed=top + 1),
                 lambda: ViewBudgetSampler([1], 4, seed=-1), lambda: sampler.set_epoch(2 ** 64),
                 lambda: sampler.set_epoch(top + 1), lambda: sampler.set_epoch(-1)):
        with pytest.raises(ValueError, match=r"(seed|epoch)=-?\d+: expected an integer in 0\.\.9223372036854775807"):
            make()
    assert sampler.epoch == top                                                  # a refused epoch changes nothing
    with pytest.raises(TypeError, match="views of type NoneType"):
        ViewBudgetSampler(None, 4)
    with pytest.raises(TypeError, match="shuffle='no': expected True or False"):
        ViewBudgetSampler([1], 4, shuffle="no")


GRIDS = {"gundam_receipt_000": (1, 2), "gundam_chart_000": (3, 2), "gundam_scene_000": (2, 2),
         "gundam_receipt_001": (1, 3), "gundam_chart_001": (2, 1), "gundam_scene_001": (2, 3),
         "gundam_receipt_002": (1, 4), "gundam_chart_002": (3, 1), "gundam_scene_002": (3, 2),
         "gundam_receipt_003": (1, 5)}


def test_make_overfit_set_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gundam.cli", "make-overfit-set", str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    records = read_records(tmp_path / "records.jsonl")
    assert {rec.id: crop_grid(rec.width, rec.height, "gundam") for rec in records} == GRIDS
    types = [rec.type for rec in records]
    assert (types.count("receipt_ocr"), types.count("chart_ocr"), types.count("scene_text_ocr")) == (4, 3, 3)
    assert len({rec.prompt for rec in records}) == 1 and records[0].prompt.startswith("<image>")
    assert len({rec.answer[:200] for rec in records}) == 10
    for rec in records:
        assert f"{rec.image}: {rec.width}x{rec.height}  gundam grid" in r.stdout
        with Image.open(tmp_path / rec.image) as im:
            assert im.size == (rec.width, rec.height) and max(im.size) > 2000
        if rec.type == "receipt_ocr":
            assert rec.height >= 2 * rec.width
            check_receipt_arithmetic(rec.answer)
        else:
            assert rec.answer.strip() and (rec.width > rec.height if rec.type == "chart_ocr" else True)
    # rendering image by image: the first n images do not depend on n
    assert make_overfit_set(tmp_path / "one", n=1)[0] == records[0]
    # and the dataset reads them
    ds = GundamDataset.from_jsonl(tmp_path / "records.jsonl", "gundam")
    ex = ds[0]
    assert ex.crops.shape == (2, 3, 640, 640) and ex.layout.grid == (1, 2) and ex.layout.tokens == 493


def check_receipt_arithmetic(answer: str):
    """Items add up to the subtotal; subtotal + tax = total; tendered - total = change."""
    lines = answer.splitlines()
    money = lambda line: float(line.rsplit(" ", 1)[1])  # noqa: E731
    start = next(i for i, line in enumerate(lines) if line.startswith("TRANS")) + 2
    end = lines.index(next(line for line in lines if line.startswith("SUBTOTAL"))) - 1
    items = [money(line) for line in lines[start:end] if not re.match(r"\d+ @ ", line)]
    get = {line.split(" ")[0]: money(line) for line in lines[end:] if re.search(r"\d\.\d\d$", line)}
    assert abs(sum(items) - get["SUBTOTAL"]) < 0.005 * len(items), answer
    assert abs(get["SUBTOTAL"] + get["TAX"] - get["TOTAL"]) < 0.011
    assert abs(get["CHANGE"] - (next(v for k, v in get.items() if k in ("VISA", "CASH")) - get["TOTAL"])) < 0.011


def test_render_is_deterministic():
    image, answer = render(2, seed=0)
    again, answer_again = render(2, seed=0)
    assert answer == answer_again and np.array_equal(np.asarray(image), np.asarray(again))
    assert render(2, seed=1)[1] != answer


@pytest.mark.parametrize("layout,match", [
    ({"records.jsonl": "dir"}, "records.jsonl' is a directory: expected a file"),
    ({"images": "file"}, "images' is a file: expected a directory"),
    ({"": "file"}, "is a file: expected a directory"),
])
def test_make_overfit_set_bad_folder_before_rendering(tmp_path, monkeypatch, capsys, layout, match):
    # what would fail after the seconds of rendering fails first, with one line
    import gundam.data.overfit as overfit
    monkeypatch.setattr(overfit, "render", lambda *a: pytest.fail("rendered"))
    target = tmp_path / "set"
    for name, kind in layout.items():
        path = target / name if name else target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if kind == "dir" else path.write_text("")
    assert main(["make-overfit-set", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1, err
    for bad, error in (("", ValueError), (None, TypeError)):
        with pytest.raises(error, match="out_dir"):
            make_overfit_set(bad)


def test_make_overfit_set_needs_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib now raises ImportError
    assert main(["make-overfit-set", str(tmp_path)]) == 2
    assert "error: make-overfit-set draws its charts with matplotlib: pip install 'gundam-encoder[data]'" in \
        capsys.readouterr().err
