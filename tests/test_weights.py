import json

import pytest
import torch
from safetensors.torch import save_file

from testutils import TINY, randomize
from gundam import GundamEncoder
from gundam.weights import load_encoder_state_dict


@pytest.fixture(scope="module")
def source():
    return randomize(GundamEncoder(TINY), seed=11).eval()


def vendor_checkpoint(enc, prefix="model."):
    """Encoder tensors under vendor names plus fake language-model tensors and CLIP's unused extras."""
    sd = {prefix + k: v.clone().contiguous() for k, v in enc.state_dict().items()}
    sd[prefix + "vision_model.embeddings.patch_embedding.weight"] = torch.randn(1024, 3, 14, 14)
    sd[prefix + "vision_model.embeddings.position_ids"] = torch.arange(10)[None]
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.randn(64, 64)
    sd["lm_head.weight"] = torch.randn(100, 64)
    return sd


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_single_file_and_directory(source, tmp_path, prefix):
    save_file(vendor_checkpoint(source, prefix), tmp_path / "model.safetensors")
    for path in (tmp_path / "model.safetensors", tmp_path):
        enc = GundamEncoder.from_pretrained(path, config=TINY)
        assert_same(enc, source)
        assert enc.sam_model.pos_embed.device.type == "cpu"


def test_sharded(source, tmp_path):
    sd = vendor_checkpoint(source)
    keys = sorted(sd)
    shards = {"model-00001-of-00003.safetensors": keys[::3], "model-00002-of-00003.safetensors": keys[1::3],
              "model-00003-of-00003.safetensors": keys[2::3]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / name)
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    enc = GundamEncoder.from_pretrained(tmp_path, config=TINY, dtype=torch.bfloat16)
    assert enc.dtype == torch.bfloat16
    for k, v in source.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v.to(torch.bfloat16)), k
    # an index naming a shard that is not there
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match="shard .* is missing"):
        GundamEncoder.from_pretrained(tmp_path, config=TINY)


def test_missing_and_misshaped(source, tmp_path):
    sd = vendor_checkpoint(source)
    del sd["model.sam_model.blocks.0.attn.qkv.weight"]
    save_file(sd, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="missing encoder tensors sam_model.blocks.0.attn.qkv.weight"):
        GundamEncoder.from_pretrained(tmp_path / "a.safetensors", config=TINY)
    sd = vendor_checkpoint(source)
    sd["model.projector.layers.bias"] = torch.zeros(7)
    save_file(sd, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"projector.layers.bias \(7,\) \(expected \(1280,\)\)"):
        GundamEncoder.from_pretrained(tmp_path / "b.safetensors", config=TINY)


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        load_encoder_state_dict(tmp_path / "nope", GundamEncoder(TINY))
    with pytest.raises(ValueError, match="has no model.safetensors"):
        load_encoder_state_dict(tmp_path, GundamEncoder(TINY))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot read as safetensors"):
        load_encoder_state_dict(bad, GundamEncoder(TINY))
