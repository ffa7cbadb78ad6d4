import subprocess
import sys

import torch
from PIL import Image
from safetensors.torch import load_file

from gundam.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "gundam.cli", *args], capture_output=True, text=True, timeout=600)


def test_tokens(capsys, tmp_path):
    Image.new("RGB", (1900, 1250)).save(tmp_path / "p.png")
    assert main(["tokens", "2000x3000", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "gundam    grid 2x3  crops 6  tokens 903" in out
    assert "gundam    grid 3x2  crops 6  tokens 893" in out
    assert "base      grid 1x1  crops 0  tokens 273" in out


def test_encode_random_weights(tmp_path):
    img = tmp_path / "small.png"
    Image.new("RGB", (300, 200), (30, 60, 90)).save(img)
    out = tmp_path / "emb.safetensors"
    r = run("encode", str(img), str(img), "--batch-size", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "RANDOM" in r.stdout and "grid 1x1  crops 0  tokens 273" in r.stdout and "batch of 2" in r.stdout
    t = load_file(out)
    assert t["embeddings"].shape == (546, 1280) and t["offsets"].tolist() == [0, 273, 546]
    assert torch.isfinite(t["embeddings"]).all()
    assert torch.allclose(t["embeddings"][:273], t["embeddings"][273:], atol=1e-5)  # same image, same tokens


def test_bad_input_is_one_line_error(tmp_path):
    (tmp_path / "x.png").write_text("hello")
    for args in (["encode", str(tmp_path / "missing.png")], ["encode", str(tmp_path / "x.png")],
                 ["tokens", "12xx4"], ["encode", str(tmp_path / "x.png"), "--max-crops", "12"],
                 ["encode", str(tmp_path / "x.png"), "--batch-size", "0"],
                 ["encode", str(tmp_path / "x.png"), "--threads", "0"]):
        r = run(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert "--threads=0: expected an integer in 1..4096" in r.stderr


def test_threads_option(tmp_path):
    before = torch.get_num_threads()
    Image.new("RGB", (64, 64)).save(tmp_path / "p.png")
    try:
        assert main(["encode", str(tmp_path / "p.png"), "--threads", "1", "--mode", "tiny"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_tokens_ocr2(capsys):
    assert main(["tokens", "1900x1250", "700x700", "769x768"]) == 0
    out = capsys.readouterr().out
    assert out.count("ocr2      grid 3x2  crops 6  tokens 1121") == 1      # 256 + 6 * 144 + 1
    assert out.count("ocr2      grid 1x1  crops 0  tokens 257") == 1       # both sides <= 768: no crops
    assert out.count("ocr2      grid 2x2  crops 4  tokens 833") == 1       # 769 px wide: cropped


def test_encode_mode_follows_ocr2_weights(tmp_path, capsys, monkeypatch):
    # the real Ocr2Config is too large here: the CLI's DeepSeek-OCR 2 config is the tiny one
    import pytest
    from safetensors.torch import save_file

    import gundam
    from testutils import OCR2_TINY, page, randomize
    monkeypatch.setattr(gundam.Ocr2Config, "deepseek_ocr2", staticmethod(lambda: OCR2_TINY))
    enc = randomize(gundam.GundamEncoder(OCR2_TINY), seed=2).eval()
    weights = tmp_path / "w.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in enc.state_dict().items()}, weights)
    page(900, 500, 0).save(tmp_path / "p.png")
    out = tmp_path / "emb.safetensors"
    assert main(["encode", str(tmp_path / "p.png"), "--weights", str(weights), "--dtype", "float32",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mode: ocr2 (base 256, crops 192" in printed and "grid 2x1  crops 2  tokens 35" in printed
    assert "qwen2" in printed
    with torch.inference_mode():
        want = enc(enc.preprocess(tmp_path / "p.png")).embeddings
    assert torch.equal(load_file(out)["embeddings"], want)
    # a mode of the other family (or other view sizes) than the weights': one line, nothing encoded
    for mode in ("gundam", "ocr2"):
        assert main(["encode", str(tmp_path / "p.png"), "--weights", str(weights), "--mode", mode]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: mode ") and "does not fit the weights" in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):   # not a mode name: argparse's usage error
        main(["encode", str(tmp_path / "p.png"), "--mode", "ocr3"])
