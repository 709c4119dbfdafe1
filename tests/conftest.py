"""Makes the repository root importable from the tests, as it is for the scripts."""
import os
import sys

# Triton (loaded by torch._dynamo, e.g. through torchvision) segfaults when it is imported after
# TensorFlow, and the evaluator tests import TensorFlow into this same process: load it first.
import torch._dynamo  # noqa: F401

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
