import os

# The one place the tests turn on Triton's interpreter (kernels run on CPU); it must be set before triton is
# first imported, and conftest is imported before any test module.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from gundam.kernels import interpreter  # noqa: E402

interpreter.install()   # the kernel tests call the launchers directly, not through gundam.model.kernels()

from testutils import TINY, randomize  # noqa: E402


@pytest.fixture(scope="session")
def tiny_encoder():
    from gundam import GundamEncoder
    torch.manual_seed(0)
    return randomize(GundamEncoder(TINY)).eval()


@pytest.fixture(params=["kernel", "torch-reference"])
def attention(request, monkeypatch):
    """Which attention the Triton path trains through: the kernel (`gundam.kernels.attention.attention`, its
    autograd Function), or the torch reference standing in for it, so that the rest of training through the
    packed path is checked independently of the attention backward."""
    if request.param == "torch-reference":
        from gundam.kernels import attention as A

        def reference_attention(qkv, segments, **kwargs):   # differentiable: autograd through torch ops
            return A.attention_reference(qkv, segments, compute_dtype=qkv.dtype, **kwargs)
        monkeypatch.setattr(A, "attention", reference_attention)
    return request.param
