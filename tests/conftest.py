import os

# The one place the tests turn on Triton's interpreter (kernels run on CPU); it must be set before triton is
# first imported, and conftest is imported before any test module.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from testutils import TINY, randomize  # noqa: E402


@pytest.fixture(scope="session")
def tiny_encoder():
    from gundam import GundamEncoder
    torch.manual_seed(0)
    return randomize(GundamEncoder(TINY)).eval()
