"""End to end: a decoder trained through the encoder on the overfit set (examples/train_overfit.py)."""
import importlib.util
import json
import pathlib
import sys

import pytest
import torch

from gundam import GundamEncoder
from gundam.data import GundamDataset, collate
from gundam.data.overfit import make_overfit_set
from testutils import ATTENTION_KERNEL_SLOW, assert_close

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_overfit.py"
spec = importlib.util.spec_from_file_location("train_overfit", EXAMPLE)
train_overfit = sys.modules["train_overfit"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(train_overfit)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the models are tiny: a second intra-op thread buys little, and on a busy machine the threads wait on each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """The first three images of the overfit set: a 1x2 receipt, a 3x2 chart, a 2x2 scene."""
    path = tmp_path_factory.mktemp("overfit3")
    make_overfit_set(path, n=3)
    return path


def built(data_dir, argv, n):
    """The example's encoder and decoder for `argv`, and the first n images in one batch."""
    args = train_overfit.parse_args(["--data", str(data_dir), *argv])
    encoder, mode = train_overfit.build_encoder(args, torch.device("cpu"))
    ds = GundamDataset.from_jsonl(data_dir / "records.jsonl", mode, limit=n)
    return encoder, train_overfit.build_decoder(encoder, ds, torch.device("cpu")), collate([ds[i] for i in range(n)])


def run(argv, capsys) -> list[dict]:
    assert train_overfit.main(argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("family", ["ocr", "ocr2"])
def test_first_step_reaches_every_encoder_parameter(three, family):
    encoder, decoder, rb = built(three, ["--family", family], 3)
    assert encoder.family == train_overfit.FAMILIES[family]
    assert len(rb.records) == 3 and [lay.grid for lay in rb.batch.layouts] == [(1, 2), (3, 2), (2, 2)]
    train_overfit.step_loss(encoder, decoder, rb, "cpu").backward()
    bad = [name for name, p in encoder.named_parameters()
           if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().max() == 0]
    assert not bad, f"encoder parameters without a finite non-zero gradient: {bad}"


def test_checkpointing_gives_the_same_gradients(three):
    grads = {}
    for flag in ([], ["--checkpointing"]):
        encoder, decoder, rb = built(three, flag, 1)   # the receipt, cut 1x2
        loss = train_overfit.step_loss(encoder, decoder, rb, "cpu")
        loss.backward()
        grads[bool(flag)] = (loss.detach(), {n: p.grad for n, p in encoder.named_parameters()})
    assert_close(grads[True][0], grads[False][0], 1e-6, 1e-6, "loss")
    for name, g in grads[False][1].items():
        assert_close(grads[True][1][name], g, 1e-6, 1e-5, name)


@pytest.mark.parametrize("family", ["ocr", "ocr2"])
def test_overfit_three_images(three, capsys, tmp_path, family):
    """The loss falls 10x in a few dozen steps, and the decoder reads the image: answers after another image's
    vision tokens cost far more."""
    lines = run(["--data", str(three), "--family", family, "--steps", "30", "--views", "16", "--json", "--out",
                 str(tmp_path)], capsys)
    steps, result = lines[:-1], lines[-1]
    assert [s["step"] for s in steps] == [1, 10, 20, 30]
    assert result["initial_loss"] > 5, result                  # about ln 256 = 5.5 before training
    assert result["final_loss"] * 10 <= result["initial_loss"], result
    assert result["swap_loss"] >= 10 * result["final_loss"], result
    # the weights it wrote load back; the encoder through from_pretrained
    config = train_overfit.small_encoder_config(train_overfit.FAMILIES[family])
    enc = GundamEncoder.from_pretrained(tmp_path / "encoder.safetensors", config=config)
    assert enc.family == train_overfit.FAMILIES[family]
    assert set(enc.state_dict()) == set(GundamEncoder(config).state_dict())
    assert (tmp_path / "decoder.safetensors").is_file()


@ATTENTION_KERNEL_SLOW
def test_triton_backend_trains(three, capsys, attention):
    # two optimizer steps on one image with small views (--mode 128,64), fp32, in Triton's interpreter: the
    # losses are the torch backend's. Step 1's loss is the forward's; step 2's and the final loss follow from
    # the gradients through AdamW, whose first steps move a parameter by about +-lr whatever its gradient's
    # size, so fp32 rounding in a near-zero gradient could show: 1e-5 relative (measured: 1e-7).
    check_triton_losses(three, capsys, [])


@pytest.mark.slow
def test_triton_backend_trains_ocr2(three, capsys):
    # the same for DeepSeek-OCR 2's encoder: SAM, the Qwen2 kernels, the projector's
    check_triton_losses(three, capsys, ["--family", "ocr2"])


def check_triton_losses(three, capsys, extra):
    argv = ["--data", str(three), "--images", "1", "--steps", "2", "--mode", "128,64", "--json", "--log-every", "1",
            *extra]
    losses = {b: run([*argv, "--backend", b], capsys) for b in ("torch", "triton")}
    print(losses)
    assert [set(line) for line in losses["triton"]] == [set(line) for line in losses["torch"]]
    for got, want in zip(losses["triton"], losses["torch"]):
        for k in ("loss", "initial_loss", "final_loss"):
            if k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-5), (k, got, want)


def test_triton_backend_needs_the_interpreter_on_cpu(three, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert train_overfit.main(["--data", str(three), "--images", "1", "--backend", "triton", "--device", "cpu"]) == 2
    assert "error: --backend triton: backend='triton' on device 'cpu' needs Triton's interpreter" in \
        capsys.readouterr().err


def test_bad_mode(three, capsys):
    assert train_overfit.main(["--data", str(three), "--mode", "256,100"]) == 2
    assert "error: Mode.image_size=100: expected a positive multiple of 64 px" in capsys.readouterr().err
    # a mode of the other family: DeepSeek-OCR 2's encoder does not take Gundam mode's views
    assert train_overfit.main(["--data", str(three), "--family", "ocr2", "--mode", "gundam"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "deepseek-ocr" in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_overfit_all_ten_images(capsys):
    lines = run(["--steps", "120", "--views", "64", "--json", "--log-every", "40"], capsys)
    result = lines[-1]
    assert result["final_loss"] * 100 <= result["initial_loss"], result
    assert result["swap_loss"] >= 10 * result["final_loss"], result
