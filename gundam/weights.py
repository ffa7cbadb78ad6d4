"""Encoder weights from a DeepSeek-OCR or DeepSeek-OCR 2 safetensors checkpoint.

The real checkpoints are ~6.7 GB, mostly language model; only the encoder's tensors are read, one by one through
safetensors' lazy `safe_open`: DeepSeek-OCR's `model.sam_model.*`, `model.vision_model.*`, `model.projector.*`,
`model.image_newline`, `model.view_seperator`; DeepSeek-OCR 2's `model.sam_model.*`, `model.qwen2_model.*`,
`model.projector.*`, `model.view_seperator` (its `model.norm.weight` is the language model's). Which family a
checkpoint holds, its keys say (`vision_model.*` or `qwen2_model.*`). Accepted: a `.safetensors` file, a
directory holding `model.safetensors`, or a sharded directory with `model.safetensors.index.json`; keys with or
without `model.`.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from gundam.config import check_mode, default_config, family_of, resolve_mode

PREFIXES = ("model.", "")
INDEX = "model.safetensors.index.json"
FAMILY_KEYS = {"deepseek-ocr": ("sam_model.", "vision_model.", "projector.", "image_newline", "view_seperator"),
               "deepseek-ocr2": ("sam_model.", "qwen2_model.", "projector.", "view_seperator")}
FAMILY_MARK = {"deepseek-ocr": "vision_model.", "deepseek-ocr2": "qwen2_model."}   # keys only that family has
FAMILY_NAMES = {"deepseek-ocr": "DeepSeek-OCR", "deepseek-ocr2": "DeepSeek-OCR 2"}
ENCODER_KEYS = tuple(dict.fromkeys(k for keys in FAMILY_KEYS.values() for k in keys))
# CLIP's patch-embedding conv and position ids are in vendor checkpoints and host modules but unused (SAM's
# output replaces them): loading and host patching skip them
UNUSED_KEYS = ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.patch_embedding.bias",
               "vision_model.embeddings.position_ids")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (x86 AVX512-BF16 or AMX, Arm BF16; Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_dtype(device) -> torch.dtype:
    """What dtype "auto" means on `device`: bf16 on CUDA and on CPUs with native bf16 matrix units (several
    times the fp32 matmul rate there), fp32 on other CPUs (emulated bf16 is slower than fp32)."""
    if torch.device(device).type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype, device="cpu") -> torch.dtype:
    """A floating torch dtype, one of DTYPES' names ("bfloat16", "bf16", "torch.float16", ...), or "auto"
    (`default_dtype(device)`)."""
    if dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r}: expected a floating torch dtype, auto or one of {', '.join(DTYPES)}")


def resolve_device(device=None) -> torch.device:
    """A device this torch can allocate on (None: CUDA when there is one, else the CPU), or a one-line
    ValueError (e.g. "cuda" on a CPU-only build)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r}: expected a device such as 'cpu', 'cuda' or 'cuda:1'") from None
    if dev.type == "meta":
        raise ValueError(f"device={device!r}: expected a device that holds data (cpu, cuda, ...)")
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        cuda = "this torch has no CUDA" if dev.type == "cuda" and not torch.cuda.is_available() else why
        raise ValueError(f"device={device!r}: not available ({cuda})") from None
    return dev


def weights_line(weights) -> str:
    """What a command prints about the weights it encodes with (a checkpoint path, or None: random)."""
    if weights:
        return f"weights: {weights}"
    return "weights: RANDOM (no weights given): shapes and timings are real, embeddings are meaningless"


def checkpoint_files(path) -> list[str]:
    """The safetensors files of a checkpoint path (only the shards that hold encoder tensors when indexed)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint path of type {type(path).__name__}: expected a str or os.PathLike")
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


def _is_encoder_key(key: str, family: str | None = None) -> bool:
    """Whether `key` names an encoder tensor (of `family`, or of either)."""
    names = FAMILY_KEYS[family] if family else ENCODER_KEYS
    return any(key.startswith(p + w) for p in PREFIXES for w in names)


def _file_keys(file: str) -> list[str]:
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return list(f.keys())
    except (OSError, SafetensorError) as e:
        raise ValueError(f"checkpoint file {file!r}: cannot read as safetensors ({e})") from None


def checkpoint_family(path) -> str:
    """Which encoder family a checkpoint holds ("deepseek-ocr" or "deepseek-ocr2"), from its tensor names."""
    found = set()
    for file in checkpoint_files(path):
        for key in _file_keys(file):
            name = key.removeprefix("model.")
            found |= {fam for fam, mark in FAMILY_MARK.items() if name.startswith(mark)}
    if len(found) != 1:
        what = "both vision_model.* and qwen2_model.*" if found else "neither vision_model.* nor qwen2_model.*"
        raise ValueError(f"checkpoint {os.fspath(path)!r}: holds {what} tensors, expected one encoder family "
                         f"(DeepSeek-OCR: vision_model.*; DeepSeek-OCR 2: qwen2_model.*)")
    return found.pop()


def checked_config(path, config=None):
    """The config to load checkpoint `path` with: `config`, or the real encoder of the checkpoint's family when
    it is None; a config of the other family is a one-line error."""
    family = checkpoint_family(path)
    if config is None:
        return default_config(family)
    if family_of(config) != family:
        raise ValueError(f"checkpoint {os.fspath(path)!r} holds a {FAMILY_NAMES[family]} encoder "
                         f"({FAMILY_MARK[family]}* tensors), config is a {type(config).__name__} "
                         f"({FAMILY_NAMES[family_of(config)]}): expected a {type(default_config(family)).__name__}")
    return config


def resolve_encoder(weights=None, config=None, mode=None, max_crops: int | None = None):
    """(config, Mode) a command encodes with, each defaulting from what is given: the config from the checkpoint
    `weights` (its family; a config of the other family is refused) or from the mode's family; the mode from
    the config (DeepSeek-OCR 2's own; gundam for DeepSeek-OCR). A mode the encoder cannot take is a one-line
    error naming both."""
    if weights is not None:
        config = checked_config(weights, config)
    if config is None:
        config = default_config(resolve_mode(mode).family if mode is not None else "deepseek-ocr")
    mode = resolve_mode(config.mode if mode is None else mode, max_crops)
    try:
        check_mode(config, mode)
    except ValueError as e:
        whose = f"the weights {os.fspath(weights)!r}" if weights is not None else "the config"
        raise ValueError(f"mode {mode.base_size}/{mode.image_size} ({mode.family}) does not fit {whose}: {e}") from None
    return config, mode


def _indexed_files(index_path: str) -> list[str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint index {index_path!r}: not a valid JSON file ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise ValueError(f"checkpoint index {index_path!r}: expected a JSON object with \"weight_map\": "
                         f"{{tensor name: shard file name}}")
    folder = os.path.dirname(index_path)
    shards = {v for k, v in weight_map.items() if _is_encoder_key(k)}
    if not shards:
        raise ValueError(f"checkpoint index {index_path!r}: names no encoder tensor (sam_model.*, vision_model.*, ...)")
    files = [os.path.join(folder, s) for s in sorted(shards)]
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"checkpoint index {index_path!r}: shard {f!r} is missing")
    return files


def load_encoder_state_dict(path, encoder: torch.nn.Module, device="cpu", dtype: torch.dtype = torch.float32,
                            strict: bool = True):
    """Read the tensors `encoder.state_dict()` names (vendor names) from the checkpoint, checked for shape,
    floating dtype and finite values after the cast to `dtype`.

    strict: encoder tensors in the checkpoint that the encoder does not have (a deeper SAM or CLIP than the
    config, say) are an error; with strict=False they are ignored. Other tensors (the language model) are never
    read.
    """
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    found: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    family = family_of(encoder.config)
    for file in checkpoint_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = key.removeprefix("model.")
                    if name in expected:
                        if name not in found:  # with and without the prefix: the first one read
                            found[name] = f.get_tensor(key)
                    elif _is_encoder_key(key, family) and name not in UNUSED_KEYS:
                        unused.append(key)
        except (OSError, SafetensorError) as e:
            raise ValueError(f"checkpoint file {file!r}: cannot read as safetensors ({e})") from None
    where = f"checkpoint {os.fspath(path)!r}"
    missing = [k for k in expected if k not in found]
    if missing:
        raise ValueError(f"{where}: missing encoder tensors {_some(missing)}")
    if unused and strict:
        raise ValueError(f"{where}: encoder tensors the config does not use: {_some(unused)} (a different "
                         f"encoder than the config; pass strict=False to ignore them)")
    bad = [f"{k} {tuple(found[k].shape)} (expected {expected[k]})" for k in expected if tuple(found[k].shape) != expected[k]]
    if bad:
        raise ValueError(f"{where}: wrong shapes: {'; '.join(bad[:5])}")
    bad = [f"{k} ({found[k].dtype})" for k in expected if not found[k].is_floating_point()]
    if bad:
        raise ValueError(f"{where}: non-floating tensors {_some(bad)}: expected floating-point weights")
    state = {k: v.to(device=device, dtype=dtype) for k, v in found.items()}
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{where}: NaN or Inf in {_some(bad)} (as {dtype})")
    return state


def _some(names: list[str]) -> str:
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more
