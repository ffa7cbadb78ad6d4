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
                 ["encode", str(tmp_path / "x.png"), "--batch-size", "0"]):
        r = run(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
