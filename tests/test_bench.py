"""The benchmarks' own code runs (on CPU, tiny configs)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=900)


def test_encoder_bench_smoke(tmp_path):
    r = run("encoder.py", "--smoke", "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    rows = res["rows"]
    assert res["environment"]["torch"] == torch.__version__
    assert {(row["grid"], row["path"]) for row in rows} == {(g, p) for g in ("none", "2x1")
                                                             for p in ("triton", "torch", "per-image")}
    assert all(0 < row["ms_min"] <= row["ms_median"] and row["tflops"] > 0 for row in rows)
    for row in rows:
        if row["path"] == "triton":   # fp32 in the interpreter: the Triton output is the torch path's
            err = row["error_vs_torch"]
            assert err["max_abs"] <= 1e-4 * err["ref_max_abs"], err
        if row["path"] in ("triton", "torch"):
            assert set(row["stages"]) == {"sam", "clip", "layout"} and all(v["ms"] > 0 for v in row["stages"].values())


@pytest.mark.parametrize("family", ["ocr", "ocr2"])
def test_cpu_bench_smoke(tmp_path, family):
    r = run("cpu.py", "--smoke", "--family", family, "--repeat", "1", "--batches", "1,2", "--vendor", "",
            "--json", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "c.json").read_text())
    assert {"amx", "avx512_bf16", "avx2", "threads", "onednn"} <= set(res["cpu"]) and res["tokens"] > 0
    rows = {(row["method"], row["batch"]): row for row in res["rows"]}
    assert set(rows) == {("cpu", 1), ("torch", 1), ("cpu", 2)}
    assert all(row["seconds_median"] > 0 and row["peak_mb"] > 0 for row in rows.values())
    for name in ("cpu", "torch"):
        row = rows[name, 1]
        assert row["gemm_floor_seconds"] > 0 and set(row["stages"]) >= {"sam", "layout"}
        err = row["error_vs_fp32_torch"]
        assert err["max_abs"] <= (1e-5 if name == "cpu" else 0) * err["ref_max_abs"], err


def test_train_bench_smoke(tmp_path):
    # the test session sets TRITON_INTERPRET=1 (conftest.py), which the bench inherits: both paths run
    r = run("train.py", "--smoke", "--json", str(tmp_path / "t.json"))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert {(row["path"], row["checkpointing"]) for row in rows} == {(p, c) for p in ("triton", "torch")
                                                                     for c in (False, True)}
    assert all(0 < row["ms_min"] <= row["ms_median"] and row["model_activation_mb"] > 0 for row in rows)
    model = {(row["path"], row["checkpointing"]): row["model_activation_mb"] for row in rows}
    assert model["triton", True] < model["triton", False] and model["torch", True] < model["torch", False]


def test_train_bench_smoke_ocr2(tmp_path, monkeypatch):
    # without the interpreter: the torch path only (DeepSeek-OCR 2 trains through the kernels in
    # tests/test_train_triton.py; here the bench's own code runs)
    monkeypatch.delenv("TRITON_INTERPRET")
    r = run("train.py", "--smoke", "--ocr2", "--json", str(tmp_path / "t.json"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["family"] == "deepseek-ocr2"
    assert {(row["path"], row["checkpointing"]) for row in res["rows"]} == {("torch", False), ("torch", True)}
    assert all(0 < row["ms_min"] <= row["ms_median"] and row["model_activation_mb"] > 0 for row in res["rows"])


def test_pipeline_bench_smoke(tmp_path):
    r = run("pipeline.py", "--smoke", "--json", str(tmp_path / "p.json"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["pages"] == 4 and res["page_size_px"] == [800, 1000] and res["batches"] >= 2
    assert res["plain_loop"] > 0 and set(res["workers"]) == {"1"} and res["workers"]["1"] > 0


def test_gpu_bench_smoke(tmp_path):
    r = run("gpu.py", "--smoke", "--json", str(tmp_path / "g.json"), "--markdown", str(tmp_path / "g.md"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "g.json").read_text())
    assert res["environment"]["torch"] == torch.__version__
    sections = res["sections"]
    assert list(sections) == ["error", "encoder", "attention", "graphs", "train", "ocr2"]
    assert all(s["ok"] and s["seconds"] > 0 for s in sections.values()), {k: s.get("error")
                                                                          for k, s in sections.items()}
    out = {k: s["result"] for k, s in sections.items()}
    (err,) = out["error"]["rows"]     # fp32 in the interpreter: the Triton output is the torch path's
    assert err["dtype"] == "float32" and 0 < err["max_abs"] <= 1e-4 * err["ref_max_abs"], err
    timed = {k: out[k]["rows"] for k in ("encoder", "graphs", "train", "ocr2")}
    timed["attention"] = [m for case in out["attention"]["cases"] for m in case["results"]]
    for name, rows in timed.items():
        assert rows and all(0 < row["ms_min"] <= row["ms_median"] for row in rows), name
    assert {row["path"] for row in timed["encoder"]} == {"triton", "torch", "per-image"}
    assert all(row["error_vs_torch"]["max_abs"] <= 1e-4 * row["error_vs_torch"]["ref_max_abs"]
               for row in timed["encoder"] if row["path"] == "triton")
    assert {row["path"] for row in timed["graphs"]} == {"triton"}       # no CUDA graphs on a CPU: said so
    assert out["graphs"]["skipped"] == ["triton-graph: CUDA graphs need a CUDA device"]
    assert {(row["path"], row["checkpointing"]) for row in timed["train"]} == {(p, c) for p in ("triton", "torch")
                                                                              for c in (False, True)}
    assert out["ocr2"]["family"] == "deepseek-ocr2"
    assert {row["path"] for row in timed["ocr2"]} == {"triton", "torch", "per-image"}
    assert all(row["error_vs_torch"]["max_abs"] <= 1e-4 * row["error_vs_torch"]["ref_max_abs"]
               for row in timed["ocr2"] if row["path"] == "triton")
    assert set(timed["ocr2"][0]["stages"]) == {"sam", "qwen2", "layout"}
    md = (tmp_path / "g.md").read_text()
    assert sum(line.startswith("| --- |") for line in md.splitlines()) == 6 and "| triton segmented |" in md and "DeepSeek-OCR 2" in md


def test_gpu_bench_section_error_is_recorded():
    # a section that raises is one line in the JSON, and gpu.py goes on with the next
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    def boom(a, budget):
        raise RuntimeError("CUDA out of memory\nsecond line")
    a = gpu.parse_args(["--smoke"])
    out = gpu.run_section("boom", boom, a, 0.0)
    assert out["ok"] is False and out["error"] == "RuntimeError: CUDA out of memory" and out["seconds"] >= 0
    assert "failed: `RuntimeError: CUDA out of memory`" in gpu.markdown(
        {"environment": {"device": "cpu", "torch": "t", "triton": "t", "cuda": None}, "args": vars(a), "wall_s": 1.0,
         "sections": {"encoder": out}})
