"""Encoder weights from a DeepSeek-OCR safetensors checkpoint.

The real checkpoint is ~6.7 GB, mostly language model; only the encoder's tensors (`model.sam_model.*`,
`model.vision_model.*`, `model.projector.*`, `model.image_newline`, `model.view_seperator`) are read, one by
one through safetensors' lazy `safe_open`. Accepted: a `.safetensors` file, a directory holding
`model.safetensors`, or a sharded directory with `model.safetensors.index.json`; keys with or without `model.`.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open

PREFIXES = ("model.", "")
INDEX = "model.safetensors.index.json"


def checkpoint_files(path) -> list[str]:
    """The safetensors files of a checkpoint path (only the shards that hold encoder tensors when indexed)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".json"):
            return _indexed_files(path)
        return [path]
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, INDEX)):
            return _indexed_files(os.path.join(path, INDEX))
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(single):
            return [single]
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if files:
            return [os.path.join(path, f) for f in files]
        raise ValueError(f"checkpoint {path!r}: directory has no model.safetensors, {INDEX} or *.safetensors file")
    raise ValueError(f"checkpoint {path!r}: no such file or directory")


def _indexed_files(index_path: str) -> list[str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint index {index_path!r}: not a valid safetensors index ({e})") from None
    folder = os.path.dirname(index_path)
    wanted = ("sam_model.", "vision_model.", "projector.", "image_newline", "view_seperator")
    shards = {v for k, v in weight_map.items() if any(k.startswith(p + w) for p in PREFIXES for w in wanted)}
    if not shards:
        raise ValueError(f"checkpoint index {index_path!r}: names no encoder tensor (sam_model.*, vision_model.*, ...)")
    files = [os.path.join(folder, s) for s in sorted(shards)]
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"checkpoint index {index_path!r}: shard {f!r} is missing")
    return files


def load_encoder_state_dict(path, encoder: torch.nn.Module, device="cpu", dtype: torch.dtype = torch.float32):
    """Read the tensors `encoder.state_dict()` names (vendor names) from the checkpoint, checked for shape."""
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    found: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                keys = set(f.keys())
                for name in expected:
                    if name in found:
                        continue
                    for prefix in PREFIXES:
                        if prefix + name in keys:
                            found[name] = f.get_tensor(prefix + name)
                            break
        except (OSError, SafetensorError) as e:
            raise ValueError(f"checkpoint file {file!r}: cannot read as safetensors ({e})") from None
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint {os.fspath(path)!r}: missing encoder tensors {', '.join(missing[:5])}{more}")
    bad = [f"{k} {tuple(found[k].shape)} (expected {expected[k]})" for k in expected if tuple(found[k].shape) != expected[k]]
    if bad:
        raise ValueError(f"checkpoint {os.fspath(path)!r}: wrong shapes: {'; '.join(bad[:5])}")
    return {k: v.to(device=device, dtype=dtype) for k, v in found.items()}
