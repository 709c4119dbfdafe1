"""Launching the scripts as users do, on loopback: torchrun (one node or two side by side
through c10d), accelerate launch on two machines, and the process lookups signal tests need."""
import os
import socket
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread per process, as torchrun gives its workers; gloo bound to loopback, so two
# "nodes" never send traffic off this machine.
LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
# Without it, accelerate on a machine without GPUs starts each process as a run of its own.
ACCELERATE_CPU_ENV = {**LAUNCH_ENV, "ACCELERATE_USE_CPU": "1"}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def script(name):
    return os.path.join(REPO_ROOT, name)


def torchrun(*options):
    return [sys.executable, "-m", "torch.distributed.run", *options]


def single_node(processes, name, *args, max_restarts=0):
    return torchrun("--standalone", f"--nproc-per-node={processes}", f"--max-restarts={max_restarts}",
                    script(name), *args)


def two_torchrun_nodes(name, *args):
    """Two launchers of one process each, meeting at a c10d rendezvous on 127.0.0.1."""
    port = free_port()
    return [torchrun("--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=loopback-{port}",
                     "--local-addr=127.0.0.1", script(name), *args)
            for rank in range(2)]


def accelerate_launch(*options):
    """accelerate launch of two processes in all, in float32 and without dynamo."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--mixed_precision", "no", "--dynamo_backend", "no", *options]


def two_accelerate_machines(name, *args):
    """accelerate launch on two "machines" of one process each, the first as main process."""
    port = free_port()
    return [accelerate_launch("--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                              "--main_process_port", str(port), script(name), *args)
            for rank in range(2)]


def run_on_one_accelerate_machine(cwd, *args, timeout=300):
    """accelerate launch of two processes on this machine, on the CPU; returns the CompletedProcess.
    At a free port: its default, 29500, is shared by every launch, and the suite's two workers may
    launch at the same time."""
    command = accelerate_launch("--num_machines", "1", "--main_process_port", "0", *args)
    return subprocess.run(command, cwd=cwd, env=ACCELERATE_CPU_ENV, capture_output=True, text=True, timeout=timeout)


def run_together(commands, cwd, env=None, timeout=300):
    """Starts every command at once and waits for all; returns their CompletedProcess."""
    processes = [subprocess.Popen(command, cwd=cwd, env=env or LAUNCH_ENV, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for command in commands]
    results = []
    for command, process in zip(commands, processes):
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return results


def wait_for(condition, process, timeout=240, interval=0.01):
    """Polls until condition() holds; False if the process ended first or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return condition()
        time.sleep(interval)
    return False


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def worker_pid(launcher_pid, rank):
    """The pid of the torchrun worker with global RANK `rank` under a launcher."""
    for child in children(launcher_pid):
        with open(f"/proc/{child}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return child
    raise LookupError(f"no worker of rank {rank} under process {launcher_pid}")
