"""Makes the repository root importable from the tests, as it is for the scripts."""
import os
import sys

import pytest
import torch

# Without CUDA, the Triton attention kernel (models/triton_attention.py) is tested under Triton's
# interpreter, which must be on before Triton compiles anything, its own library included.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton (loaded by torch._dynamo, e.g. through torchvision) segfaults when it is imported after
# TensorFlow, and the evaluator tests import TensorFlow into this same process: load it first.
import torch._dynamo  # noqa: E402,F401

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Runs a test module on one intra-op thread (its module fixtures too) and restores the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
