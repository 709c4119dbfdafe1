"""Kernel launches of one inference forward and one masked training step, counted without a GPU.
Where steps are small (the masked training step at batch 32, sampling a few images), the host's
launches, not the GPU, set the pace, so their count is the figure to lower.

    python -m benchmarks.launch_count --out results/launches
    python -m benchmarks.launch_count --out /tmp/launches --models EDT-S/2 --batch 2

Launches are the ATen operators that run a kernel: every operator below autograd but views and
metadata, a scaled-dot-product attention as one. Inference dispatches as on CUDA, through fake
CUDA tensors (shapes without data, so CUDA's autocast casts are those a GPU would run); the
training step (forward and backward of the full and the masked loss, the stacked modulations and
Adan's multi-tensor update as on CUDA, EMA) dispatches on fake CPU tensors (autograd needs a real
device for CUDA's), whose autocast casts fewer operands than CUDA's; MDTv2's masked pass keeps its
mean fraction of the tokens, without the three operators that round its random draw. Writes
OUT/launches.md and OUT/launches.json.
"""
import argparse
import collections
import contextlib
import os
import sys
import warnings
from unittest import mock

import torch
import torch.nn.functional as F
from timm.optim import Adan
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import gpu_protocol, speed  # noqa: E402
from models import blocks, mdt  # noqa: E402
from runtime.ema import EmaUpdate  # noqa: E402
from training.build import ADAN_BETAS, ADAN_EPS  # noqa: E402

# Operators that only make views or read metadata: no kernel.
NO_KERNEL = {"view", "_unsafe_view", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze", "as_strided",
             "detach", "split", "split_with_sizes", "unbind", "slice", "select", "alias", "reshape", "_reshape_alias",
             "unflatten", "flatten", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
             "lift_fresh", "view_as", "narrow", "movedim", "is_same_size", "_has_compatible_shallow_copy_type",
             "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_record_function_enter_new",
             "_record_function_exit"}
PRECISIONS = ("no", "bf16", "fp16")  # autocast dtypes as the scripts name them
# B counts as S (the same depths); XL training steps need more than 24 GiB of CPU memory.
DEFAULT_MODELS = ("EDT-S/2", "MDTv2-S/2")


class LaunchCounter(TorchDispatchMode):
    """Counts kernel-running operators by name, a fused attention call as one, and by the phase
    of speed.py's training step they run in (None outside one)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.phase_counts = collections.Counter()
        self.phase = None
        self.inside_attention = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_record_function_enter_new" and args[0].startswith(speed.STEP_PHASE_PREFIX):
            self.phase = args[0].removeprefix(speed.STEP_PHASE_PREFIX)
        if not self.inside_attention and name not in NO_KERNEL and func.namespace != "prim":
            self.count(name)
        return func(*args, **(kwargs or {}))

    def count(self, name):
        self.counts[name] += 1
        self.phase_counts[self.phase] += 1

    def fused_attention(self, attention, args, kwargs):
        self.count("scaled_dot_product_attention")
        return run_hidden(self, attention, args, kwargs)


def run_hidden(observer, attention, args, kwargs):
    """attention(*args, **kwargs) with the observer blind to the operators of the path it takes
    without a GPU."""
    observer.inside_attention = True
    try:
        return attention(*args, **kwargs)
    finally:
        observer.inside_attention = False


class FusedAttentionAsOne(TorchFunctionMode):
    """Hands each scaled_dot_product_attention call to `observer.fused_attention(attention, args,
    kwargs)`, which runs it as one kernel would."""

    def __init__(self, observer):
        super().__init__()
        self.observer = observer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return self.observer.fused_attention(func, args, kwargs or {})
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting():
    counter = LaunchCounter()
    with FusedAttentionAsOne(counter), counter:
        yield counter


@contextlib.contextmanager
def fake_cuda():
    """A fake mode whose tensors dispatch as CUDA tensors, with CUDA's autocast allowed."""
    with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode, \
            mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True), \
            warnings.catch_warnings():
        # Kept inference tensors are keyed by their parameters' storage, which fake tensors lack (all alike).
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        yield lambda tensor: fake_mode.from_tensor(tensor).to("cuda")


def fake_cuda_inference(name, precision, batch, latent_size, observed):
    """One inference forward of the model dispatched as on CUDA, inside the context `observed()`
    (after a forward that derives the kept inference tensors); returns what observed yields."""
    model = speed.build_model(name, latent_size, seed=0).eval()
    x, y, t = speed.make_inputs(batch, latent_size, torch.device("cpu"), torch.Generator().manual_seed(0))
    with fake_cuda() as to_fake_cuda:
        model = model._apply(to_fake_cuda)
        x, y, t = (to_fake_cuda(tensor) for tensor in (x, y, t))
        with torch.no_grad(), speed.autocast(torch.device("cuda"), precision):
            model(x, t, y)
            with observed() as observer:
                model(x, t, y)
    return observer


def inference_launches(name, precision, batch, latent_size):
    return fake_cuda_inference(name, precision, batch, latent_size, counting).counts


@contextlib.contextmanager
def mean_mdt_masking():
    """MDTv2's masked passes keep their mean fraction of the tokens: fake tensors hold no draw of
    the ratio to round."""
    subset = mdt.random_token_subset
    with mock.patch.object(mdt, "random_token_subset",
                           lambda x, mask_ratio: subset(x, 1 - mdt.MEAN_KEPT_FRACTION)):
        yield


def fake_training_step(name, precision, batch, latent_size, observed):
    """speed.py's masked training step on fake CPU tensors (its operators without their
    arithmetic, so any size is quick), with the modulations stacked and Adan's multi-tensor update
    as on CUDA, inside the context `observed()` (after a step that creates the optimizer's state);
    returns what observed yields. The CPU's autocast casts fewer operands than CUDA's."""
    device = torch.device("cpu")
    settings = argparse.Namespace(compile=False, flat_adan=False, mixed_precision=precision)
    variant = speed.Variant(name, name, speed.build_model(name, latent_size, seed=0).train(), True, settings, device)
    x, y, _ = speed.make_inputs(batch, latent_size, device, torch.Generator().manual_seed(0))
    with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode, mean_mdt_masking(), \
            mock.patch.object(blocks, "STACKED_MODULATION_TRAINING_DEVICES", ("cuda", "cpu")):
        for module in (variant.model, variant.ema):
            module._apply(fake_mode.from_tensor)
        variant.update_ema = EmaUpdate(variant.ema, variant.model)
        variant.optimizer = Adan(variant.model.parameters(), lr=speed.LEARNING_RATE, betas=ADAN_BETAS, eps=ADAN_EPS,
                                 weight_decay=0.0, foreach=True)
        step = speed.training_step_fn(variant, True, fake_mode.from_tensor(x), fake_mode.from_tensor(y), settings,
                                      device)
        step()
        with observed() as observer:
            step()
    return observer


def training_step_launches(name, precision, batch, latent_size):
    """(launches by operator, launches by phase of the step)."""
    counter = fake_training_step(name, precision, batch, latent_size, counting)
    return counter.counts, counter.phase_counts


def measure(args):
    rows = []
    for name in args.models:
        for precision in args.precisions:
            inference = inference_launches(name, precision, args.batch, args.latent_size)
            training, phases = training_step_launches(name, precision, args.batch, args.latent_size)
            rows.append(dict(model=name, precision=precision, inference=sum(inference.values()),
                             inference_casts=inference["_to_copy"], training_step=sum(training.values()),
                             training_casts=training["_to_copy"],
                             training_forward_backward=phases["forward"] + phases["backward"]))
            print(markdown_row(rows[-1]), flush=True)
    return rows


TABLE_HEADER = ("| model | precision | inference forward, CUDA dispatch | of them casts | masked training step, CPU "
                "dispatch | of them casts | of them forward and backward (--cuda-graphs replays them) |\n"
                "|---|---|---|---|---|---|---|")


def markdown_row(row):
    return (f"| {row['model']} | {row['precision']} | {row['inference']} | {row['inference_casts']} | "
            f"{row['training_step']} | {row['training_casts']} | {row['training_forward_backward']} |")


def markdown(result):
    settings = result["settings"]
    lines = [f"Kernel launches; batch {settings['batch']}, latent {settings['latent_size']}, torch {torch.__version__}",
             "", TABLE_HEADER, *(markdown_row(row) for row in result["rows"])]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for launches.md and launches.json")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["no", "bf16"],
                        help="autocast: no (float32), bf16 or fp16")
    parser.add_argument("--batch", type=int, default=4, help="launches do not depend on it; small is quick")
    parser.add_argument("--latent-size", type=int, default=32)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print(TABLE_HEADER, flush=True)
    result = {"settings": dict(batch=args.batch, latent_size=args.latent_size), "rows": measure(args)}
    gpu_protocol.write_report(result, markdown(result), args.out, "launches")
    return result


if __name__ == "__main__":
    main()
