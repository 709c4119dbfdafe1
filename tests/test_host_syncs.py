"""The training step waits for the device once, in the guard's all-reduce (training/guard.py).

What makes the host wait for CUDA can be seen without a GPU: on fake CUDA tensors
(benchmarks/launch_count.py's) a value read on the host fails, and a copy between the host and
the device shows whether it blocks. Fake tensors cannot be pinned, so pinning is left out there
and checked on its own.
"""
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.launch_count import fake_cuda
from diffusion import create_diffusion, create_named_schedule_sampler
from runtime.host_copies import to_device_without_waiting
from training.flat_adan import FlatAdan
from training.guard import agree_on_step

COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class HostWait(AssertionError):
    pass


class FailOnHostWait(TorchDispatchMode):
    """Raises HostWait for an operator that makes the host wait for CUDA: a value read on the
    host, a copy from CUDA to the host, or a blocking copy from the host to CUDA."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            output = func(*args, **kwargs)
        except DataDependentOutputException as error:  # .item(), .tolist()
            raise HostWait(f"{func} reads a value on the host") from error
        if func in COPIES:
            copy_in_place = func is torch.ops.aten.copy_.default
            source = args[1] if copy_in_place else args[0]
            non_blocking = args[2] if copy_in_place and len(args) > 2 else kwargs.get("non_blocking", False)
            devices = (source.device.type, output.device.type)
            if devices == ("cuda", "cpu") or (devices == ("cpu", "cuda") and not non_blocking):
                raise HostWait(f"{func} copies {devices[0]} to {devices[1]} and waits")
        return output


def unpinned():
    return mock.patch.object(torch.Tensor, "pin_memory", lambda tensor: tensor)


def test_fail_on_host_wait_sees_blocking_copies_and_host_reads():
    with fake_cuda() as to_fake_cuda, unpinned():
        x = to_fake_cuda(torch.ones(3))
        with FailOnHostWait():
            torch.ones(3).to("cuda", non_blocking=True)
            for wait in (lambda: torch.ones(3).to("cuda"), lambda: x.copy_(torch.ones(3)), lambda: x.cpu(),
                         lambda: x.sum().item()):
                with pytest.raises(HostWait):
                    wait()


def test_timestep_draws_reach_the_device_without_waiting():
    # Every sampler's `sample` (the uniform one's weights need no value of a CPU tensor, which fake
    # tensors lack).
    sampler = create_named_schedule_sampler("uniform", create_diffusion(timestep_respacing=""))
    expected = sampler.sample(32, "cpu", generator=torch.Generator().manual_seed(0))
    with fake_cuda(), unpinned(), FailOnHostWait():
        timesteps, weights = sampler.sample(32, "cuda", generator=torch.Generator().manual_seed(0))
    assert timesteps.device.type == weights.device.type == "cuda"
    assert (timesteps.shape, timesteps.dtype, weights.dtype) == (expected[0].shape, torch.long, torch.float32)


def test_flat_adan_scalars_reach_the_device_without_waiting():
    group = dict(betas=(0.98, 0.92, 0.99), step=3, lr=1e-4, weight_decay=0.0, no_prox=False)
    expected = FlatAdan.coefficients(group, torch.zeros(1))
    with fake_cuda() as to_fake_cuda, unpinned():
        like = to_fake_cuda(torch.zeros(1))
        with FailOnHostWait():
            coefficients = FlatAdan.coefficients(group, like)
    assert coefficients.device.type == "cuda" and coefficients.shape == expected.shape


def test_host_tensors_are_pinned_for_cuda_only():
    pinned = []
    with fake_cuda(), mock.patch.object(torch.Tensor, "pin_memory", lambda tensor: pinned.append(tensor) or tensor):
        values = torch.arange(4)  # a fake host tensor
        assert to_device_without_waiting(values, torch.device("cuda")).device.type == "cuda"
        assert to_device_without_waiting(values, torch.device("cpu")) is values
    assert len(pinned) == 1 and pinned[0] is values


@pytest.mark.parametrize("stop_requested", [False, True])
def test_the_step_check_carries_the_stop_request(stop_requested):
    one_process = SimpleNamespace(num_processes=1, process_index=0)
    check = agree_on_step(one_process, torch.tensor(0.5), torch.tensor(2.0), False, stop_requested)
    assert (check.loss, check.grad_norm, check.skipped, check.stop_requested) == (0.5, 2.0, False, stop_requested)
