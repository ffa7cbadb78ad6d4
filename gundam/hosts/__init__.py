"""`gundam.patch(model)`: a host framework's DeepSeek-OCR model encodes its images through `GundamEncoder`.

    model = AutoModel.from_pretrained("deepseek-ai/DeepSeek-OCR", trust_remote_code=True)
    gundam.patch(model)          # generate / infer unchanged; all images of a batch in one encoder pass
    gundam.unpatch(model)        # back to the vendor's code

Hosts (one module each): Hugging Face remote code of DeepSeek-OCR and DeepSeek-OCR 2 (gundam.hosts.hf), vLLM
(gundam.hosts.vllm, with a `vllm.general_plugins` entry point for its worker processes), SGLang
(gundam.hosts.sglang) and transformers' native DeepSeek-OCR 2 and Unlimited-OCR classes (gundam.hosts.hf_native).
Patching is per
instance: a few instance attributes shadow the class's methods (for vLLM, the instance's class also becomes a
same-named subclass) and `unpatch` undoes it; the class, other instances and everything else of the host are
untouched. The encoder is built around the host's own parameters (gundam.hosts.shared): nothing is copied.

A patched model copies and pickles: the replaced methods are small objects of module-level classes that hold the
patch's state (not closures over the instance), and the state keeps no encoder when copied or pickled, so
`copy.deepcopy(model)` and `torch.save(model)` / `torch.load` give a patched model that builds its encoder around
its own parameters when it first encodes, and whose `unpatch` restores the host's methods.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch.nn as nn

from gundam.encoder import GundamEncoder, check_backend
from gundam.hosts import hf, hf_native, shared, sglang, vllm
from gundam.hosts.shared import owns_encoder, shares

STATE = "_gundam_patch"        # the patch's state, in the patched module's __dict__ (not a submodule)
HOSTS = {"hf": hf, "vllm": vllm, "sglang": sglang, "hf-native": hf_native}


class _Missing:
    """The mark of an attribute the instance did not have before it was patched. Pickled by name, so a copied or
    unpickled model's patch still tells "delete it" from a value to restore."""

    def __repr__(self):
        return "MISSING"

    def __reduce__(self):
        return "MISSING"    # gundam.hosts.MISSING; copy.deepcopy keeps it as is too


MISSING = _Missing()


@dataclass
class Patch:
    kind: str
    owner: nn.Module                       # the module holding the encoder (sam_model, ... or vision_tower, ...)
    backend: str
    encoder: GundamEncoder | None = None   # built when first needed
    params: dict | None = field(default=None, repr=False)   # the host parameters the encoder holds
    saved: list = field(default_factory=list, repr=False)   # (object, attribute, previous instance value)

    def current(self) -> GundamEncoder:
        """The encoder, (re)built if there is none yet (a new patch, a copy, an unpickled model) or the host's
        parameter objects were replaced since it was built."""
        source = self.source()
        if self.encoder is None or not shares(self.params, source.host_parameters(self.owner)):
            backend = self.encoder.backend if self.encoder is not None else self.backend
            self.encoder, self.params = source.shared_encoder(self.owner, backend)
        return self.encoder

    def source(self):
        """Where the host's encoder parameters are found: under the vendor's names (gundam.hosts.shared) or
        under transformers' native names (gundam.hosts.hf_native)."""
        return hf_native if self.kind == "hf-native" else shared

    def __getstate__(self) -> dict:
        """A copy or pickle holds the patch without its encoder: one around the copy's own parameters is built
        when it first encodes (a copied encoder would hold the copy's parameters too, but also cached tables and
        whatever the backend keeps)."""
        state = dict(self.__dict__)
        if self.encoder is not None:
            state["backend"] = self.encoder.backend
        state["encoder"] = state["params"] = None
        return state


def patch(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Route `model`'s image encoding through GundamEncoder, sharing its parameters; returns `model`.
    Patching a patched model only sets `backend`."""
    backend = check_backend(backend)
    owner, kind = _find_host(model)
    state = owner.__dict__.get(STATE)
    if state is not None:
        state.backend = backend
        if state.encoder is not None:
            state.encoder.backend = backend
        return model
    state = Patch(kind, owner, backend)
    state.current()   # a host the encoder cannot be built around fails here, before anything changes
    for obj, name, value in HOSTS[kind].replacements(model, owner, state):
        state.saved.append((obj, name, type(obj) if name == "__class__" else obj.__dict__.get(name, MISSING)))
        object.__setattr__(obj, name, value)  # an instance attribute (never a registered submodule), or a class
    owner.__dict__[STATE] = state
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: the host's own methods again (a model that is not patched is returned as is)."""
    for module in _modules(model):
        state = module.__dict__.pop(STATE, None)
        if state is not None:
            for obj, name, previous in reversed(state.saved):
                if previous is MISSING:  # (`__class__` always has a previous value)
                    del obj.__dict__[name]
                else:
                    object.__setattr__(obj, name, previous)
    return model


def patched_encoder(model: nn.Module) -> GundamEncoder | None:
    """The GundamEncoder a patched model encodes with (None if it is not patched)."""
    for module in _modules(model):
        state = module.__dict__.get(STATE)
        if state is not None:
            return state.current()
    return None


def _modules(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"gundam.patch: got a {type(model).__name__}, expected a DeepSeek-OCR model (a torch "
                        f"nn.Module)")
    return model.modules()


def _find_host(model) -> tuple[nn.Module, str]:
    """The module that holds the encoder (the model itself, or one it wraps: HF's DeepseekOCRModel inside
    DeepseekOCRForCausalLM, transformers' DeepseekOcr2Model inside DeepseekOcr2ForConditionalGeneration, a PEFT
    wrapper) and which host's class it is."""
    for module in _modules(model):
        if hf_native.is_host(module):
            return module, "hf-native"
        if owns_encoder(module):
            kind = _host_kind(module)
            if kind is not None:
                return module, kind
    raise TypeError(f"gundam.patch: {type(model).__name__} is not a DeepSeek-OCR model of a supported host: "
                    f"expected a module holding sam_model, vision_model, projector, image_newline and "
                    f"view_seperator, or sam_model, qwen2_model, projector and view_seperator (DeepSeek-OCR or "
                    f"DeepSeek-OCR 2 of Hugging Face remote code, vLLM or SGLang), or transformers' "
                    f"DeepseekOcr2ForConditionalGeneration or UnlimitedOcrForConditionalGeneration")


def _host_kind(module) -> str | None:
    """Which host's class: told apart by the class's own forward signature and methods."""
    forward = inspect.signature(type(module).forward).parameters
    if "images_seq_mask" in forward:    # HF remote code: only DeepSeek-OCR's and DeepSeek-OCR 2's model classes
        return "hf" if any(c.__name__ in hf.MODELS for c in type(module).__mro__) else None
    if "forward_batch" in forward and hasattr(module, "_process_image_input"):
        return "sglang"
    if hasattr(module, "_pixel_values_to_embedding"):
        return "vllm"
    return None


class PatchAfterLoading:
    """Mixin for a host's model class: the model patches itself once its weights are loaded (how the vLLM plugin
    and SGLang's registry use gundam); GUNDAM_BACKEND picks the backend (default "auto")."""

    def load_weights(self, weights):
        import os
        loaded = super().load_weights(weights)
        patch(self, backend=os.environ.get("GUNDAM_BACKEND", "auto"))
        return loaded
