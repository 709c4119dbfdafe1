"""Makes the repository root importable from the tests, as it is for the scripts."""
import os
import sys

import pytest

# pytest.ini runs the suite on two xdist workers, which share the cores with each other and with
# the processes the tests launch. OpenMP threads that spin while they wait then starve the other
# side: a tiny EDT training step on two threads took 4.1 s instead of 0.27 s beside a second one,
# 0.45 s with sleeping threads. libgomp reads this when torch loads it, so it is set first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

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


# xdist (--dist loadfile --no-loadscope-reorder) hands the test files to its workers in collection
# order: the longest go first, so that neither worker is left running one of them alone at the end.
LONGEST_FILES = ("test_quickstart.py", "test_multinode.py", "test_benchmarks.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.fixture(scope="module")
def one_torch_thread():
    """Runs a test module on one intra-op thread (its module fixtures too) and restores the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
