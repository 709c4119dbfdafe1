"""The training losses replayed from CUDA graphs (training/graphed_losses.py), checked without a GPU.

The capture itself needs CUDA. What a graph cannot hold can be seen on the CPU: the losses'
forward runs on fake CUDA tensors (benchmarks/launch_count.py's) under a dispatch mode that
fails on every value read on the host and every CPU tensor handed to a CUDA operator (a copy
or a scalar read at launch, which a graph would bake in). The training run that replays the
losses is test_train.py's.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import models
from benchmarks.launch_count import fake_cuda
from diffusion import create_diffusion
from models.mdt import TRAINING_MASK_RATIO
from training.graphed_losses import TrainingLosses, graphing_problem

LATENT_SIZE = 32
BATCH = 4


class GraphHazard(AssertionError):
    pass


class FailOnHostTraffic(TorchDispatchMode):
    """Raises GraphHazard for an operator that reads a tensor's value on the host or takes a
    CPU tensor while working on CUDA ones (Python numbers are constants, and allowed)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            output = func(*args, **(kwargs or {}))
        except DataDependentOutputException as error:  # .item(), int(tensor), .tolist()
            raise GraphHazard(f"{func} reads a value on the host") from error
        tensors = [x for x in tree_leaves((args, kwargs, output)) if isinstance(x, torch.Tensor)]
        devices = {x.device.type for x in tensors}
        if {"cpu", "cuda"} <= devices:
            raise GraphHazard(f"{func} takes a CPU tensor for CUDA: {[tuple(x.shape) for x in tensors]}")
        return output


def check_losses_on_fake_cuda(name, masked, fused=False):
    """Registered model `name` in training mode: its bf16 training losses on fake CUDA tensors
    under FailOnHostTraffic, once the device's schedule tables exist (the capture's warm-up
    builds them)."""
    torch.manual_seed(0)
    options = dict(mask_ratio=TRAINING_MASK_RATIO) if name in models.MDT_models else {}
    model = models.create_model(name, input_size=LATENT_SIZE, **options).train()
    mask_flag = model.masked_training_flag if masked else None
    diffusion = create_diffusion(timestep_respacing="")
    losses = TrainingLosses(model, diffusion, mask_flag, fused, "bf16")
    x = torch.randn(BATCH, 4, LATENT_SIZE, LATENT_SIZE)
    y, t = torch.randint(0, 1000, (2, BATCH))
    with fake_cuda() as to_fake_cuda, torch.no_grad():
        losses = losses._apply(to_fake_cuda)
        x, y, t = (to_fake_cuda(tensor) for tensor in (x, y, t))
        diffusion.training_losses(losses.model, x, t, model_kwargs=dict(y=y))
        with FailOnHostTraffic():
            full, masked_losses = losses(x, y, t)
    assert full.shape == masked_losses.shape == (BATCH,) and full.device.type == "cuda"


@pytest.mark.parametrize("name, masked, fused", [("EDT-S/2", True, True), ("EDT-S/2", True, False),
                                                 ("DiT-S/2", False, False), ("MDTv2-S/2", False, False)])
def test_training_losses_keep_to_the_device(name, masked, fused):
    check_losses_on_fake_cuda(name, masked, fused)


def test_mdt_masked_losses_read_the_host_and_are_refused():
    with pytest.raises(GraphHazard, match="reads a value on the host"):
        check_losses_on_fake_cuda("MDTv2-S/2", masked=True)
    problem = graphing_problem(models.MDTv2, True, 1, False, torch.device("cuda"))
    assert "MDTv2's masked pass keeps a random number of tokens" in problem


def test_fail_on_host_traffic_sees_a_transfer_and_a_cpu_scalar():
    with fake_cuda() as to_fake_cuda:
        x = to_fake_cuda(torch.ones(3))
        with FailOnHostTraffic():
            x * 2.0
            for hazard in (lambda: torch.ones(3).to("cuda"), lambda: x * torch.tensor(2.0)):
                with pytest.raises(GraphHazard, match="takes a CPU tensor"):
                    hazard()


@pytest.mark.parametrize("model_class, masked, accumulation, checkpointing, device, expected", [
    (models.EDT, True, 1, False, "cuda", None),
    (models.MDTv2, False, 1, False, "cuda", None),
    (models.EDT, True, 1, False, "cpu", "needs a GPU"),
    (models.EDT, True, 2, False, "cuda", "one micro-batch per step"),
    (models.DiT, False, 1, True, "cuda", "drop --grad-checkpointing"),
])
def test_graphing_problem(model_class, masked, accumulation, checkpointing, device, expected):
    problem = graphing_problem(model_class, masked, accumulation, checkpointing, torch.device(device))
    assert problem is None if expected is None else expected in problem
