"""Processes and GPUs: a node that runs more processes than it has GPUs stops with one line in every
script (they all join through runtime.distributed.init_distributed), and the quickstart starts at
most one process per GPU."""
import pytest
import torch

import quickstart
from runtime import distributed
from runtime.distributed import gpu_shortage, init_distributed


def test_gpu_shortage_names_the_counts_and_the_fix():
    assert gpu_shortage(1, 1) is None and gpu_shortage(8, 8) is None and gpu_shortage(2, 4) is None
    message = gpu_shortage(2, 1)
    assert message.startswith("2 processes on this node but it has 1 GPU(s)")
    assert "--nproc_per_node 1" in message and "--num_processes 1" in message


@pytest.mark.parametrize("local_rank", [0, 1])
def test_two_processes_on_a_one_gpu_node_both_stop_before_joining(monkeypatch, local_rank):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("must stop before taking a device"))
    monkeypatch.setattr(distributed, "join_process_group", lambda device: pytest.fail("must stop before joining"))
    for name, value in dict(RANK=local_rank, WORLD_SIZE=2, LOCAL_RANK=local_rank, LOCAL_WORLD_SIZE=2).items():
        monkeypatch.setenv(name, str(value))
    with pytest.raises(SystemExit) as stop:
        init_distributed()
    if local_rank == 0:  # one line from the node's first process, a plain exit status from the others
        assert stop.value.code == f"error: {gpu_shortage(2, 1)}"
    else:
        assert stop.value.code == 1


def test_quickstart_takes_one_process_per_gpu_at_most(capsys):
    assert quickstart.processes_for_devices(2, cuda=False, gpu_count=0) == 2
    assert quickstart.processes_for_devices(2, cuda=True, gpu_count=8) == 2
    assert quickstart.processes_for_devices(2, cuda=True, gpu_count=1) == 1
    assert "1 GPU(s) here, so 1 process(es) instead of 2" in capsys.readouterr().out
