"""Beyond one machine, simulated on loopback: every distributed script as 2 nodes x 1 process
(torchrun's c10d rendezvous; accelerate's multi-machine launch for training) gives what a
single-node run gives; a training worker killed with SIGKILL is restarted by torchelastic and
the run ends bit-identical; SIGTERM makes training checkpoint and exit 0, and sampling resumes
after it.

Training runs the released EDT-S/2 architecture on 16x16 pixels (24 images, global batch 8,
one thread per process), so bit-exact resume is shown at a size users train, not a toy one.
"""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import image_generator_ddp
import train_mask_adan
from runtime.checkpoint import read_checkpoint
from test_extract_features import extract_args, make_image_folder
from test_sampling import ddp_args, files, reference  # noqa: F401 (module fixtures)
from test_train import assert_same_tree, write_features
from launch import (ACCELERATE_CPU_ENV, LAUNCH_ENV, REPO_ROOT, children, run_together, single_node,
                    two_accelerate_machines, two_torchrun_nodes, wait_for, worker_pid)
from tiny_vae import save_tiny_vae

STEPS = 6
TRAINING = ["--model", "EDT-S/2", "--global-batch-size", "8", "--num-workers", "0",
            "--log-every", "1", "--max-steps", str(STEPS)]
STATE_KEYS = ("model", "ema", "opt", "schedule_sampler", "grad_scaler", "rng", "step", "epoch",
              "epoch_step", "world_size")


def train_args(features, results, *extra):
    return ["--feature-path", features, "--results-dir", str(results), *TRAINING, *extra]


def experiment(results):
    (name,) = os.listdir(results)
    return os.path.join(results, name)


def final_checkpoint(results):
    return read_checkpoint(os.path.join(experiment(results), "checkpoints", f"{STEPS:07d}.pt"))


def assert_same_training(results, reference):
    checkpoint = final_checkpoint(results)
    for key in STATE_KEYS:
        assert_same_tree(checkpoint[key], reference[key], key)


def assert_succeeded(results):
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("pixels"), latent_shape=(3, 16, 16), image_size=16,
                          vae="none", count=24)


@pytest.fixture(scope="module")
def single_node_training(features, tmp_path_factory):
    """The final checkpoint of a plain 2-process single-node run."""
    results = tmp_path_factory.mktemp("single_node")
    assert_succeeded(run_together([single_node(2, "train_mask_adan.py", *train_args(features, results))],
                                  cwd=results))
    return final_checkpoint(results)


#################################################################################
#                             Two nodes on loopback                             #
#################################################################################

def test_training_on_two_torchrun_nodes_equals_one_node(features, single_node_training, tmp_path):
    # No ACCELERATE_USE_CPU: on a CPU-only machine the script itself keeps the processes together.
    outcome = run_together(two_torchrun_nodes("train_mask_adan.py", *train_args(features, tmp_path)),
                           cwd=tmp_path)
    assert_succeeded(outcome)
    assert_same_training(tmp_path, single_node_training)
    log = open(os.path.join(experiment(tmp_path), "log.txt")).read()
    assert "2 processes on cpu" in log
    assert sum("saved" in result.stdout for result in outcome) == 1  # only global rank 0 logs


def test_training_on_two_accelerate_machines_equals_one_node(features, single_node_training, tmp_path):
    commands = two_accelerate_machines("train_mask_adan.py", *train_args(features, tmp_path))
    assert_succeeded(run_together(commands, cwd=tmp_path, env=ACCELERATE_CPU_ENV))
    assert_same_training(tmp_path, single_node_training)


def test_sampling_on_two_nodes_writes_the_same_npz(files, reference, tmp_path):  # noqa: F811
    outcome = run_together(two_torchrun_nodes("image_generator_ddp.py", *ddp_args(
        files, tmp_path, "--per-proc-batch-size", "2")), cwd=tmp_path)
    assert_succeeded(outcome)
    (folder,) = [name for name in os.listdir(tmp_path)]
    with open(reference, "rb") as expected, open(tmp_path / folder / reference.name, "rb") as written:
        assert written.read() == expected.read()


def test_extraction_on_two_nodes_writes_the_same_shards(tmp_path):
    images = tmp_path / "images"
    make_image_folder(images, 10)
    vae = save_tiny_vae(str(tmp_path / "vae"))
    arguments = {name: extract_args(images, tmp_path / name, vae, "--batch-size", "2", "--num-workers", "0")
                 for name in ("one_node", "two_nodes")}
    assert_succeeded(run_together([single_node(2, "extract_features.py", *arguments["one_node"]),
                                   *two_torchrun_nodes("extract_features.py", *arguments["two_nodes"])],
                                  cwd=tmp_path))
    names = sorted(name for name in os.listdir(tmp_path / "one_node") if name != "log.txt")
    assert sorted(name for name in os.listdir(tmp_path / "two_nodes") if name != "log.txt") == names
    for name in names:
        if name.endswith(".npy"):
            assert np.array_equal(np.load(tmp_path / "one_node" / name), np.load(tmp_path / "two_nodes" / name)), name


#################################################################################
#                          Killed workers and preemption                        #
#################################################################################

def test_resume_is_bit_exact_for_edt_s_on_two_threads(features, tmp_path):
    """One process on two intra-op threads, checkpoint at step 3 (an epoch boundary)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        straight = train_mask_adan.main(train_args(features, tmp_path / "straight"))
        train_mask_adan.main(train_args(features, tmp_path / "split", "--max-steps", "3"))
        train_mask_adan.main(train_args(features, tmp_path / "split", "--resume", "latest"))
    finally:
        torch.set_num_threads(threads)
    resumed = final_checkpoint(tmp_path / "split")
    assert resumed["step"] == STEPS and resumed["epoch"] == 2
    for key, value in (("model", straight.model), ("ema", straight.ema), ("opt", straight.optimizer)):
        assert_same_tree(resumed[key], value.state_dict(), key)


def checkpoint_exists(results, step):
    def exists():
        names = os.listdir(results)
        return bool(names) and os.path.exists(os.path.join(results, names[0], "checkpoints", f"{step:07d}.pt"))
    return exists


def test_killed_worker_restarts_and_resumes_bit_exactly(features, single_node_training, tmp_path):
    # The first launch finds no checkpoint for --resume latest and starts the run; the restart
    # after the kill finds the newest complete one.
    command = single_node(2, "train_mask_adan.py", *train_args(features, tmp_path, "--resume", "latest",
                                                               "--ckpt-every", "2"), max_restarts=2)
    launcher = subprocess.Popen(command, cwd=tmp_path, env=LAUNCH_ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert wait_for(checkpoint_exists(tmp_path, 2), launcher)
    os.kill(worker_pid(launcher.pid, rank=1), signal.SIGKILL)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output[-3000:]
    log = open(os.path.join(experiment(tmp_path), "log.txt")).read()
    assert "no checkpoint of EDT-S/2" in log and "resuming from" in log, "no restart happened"
    assert_same_training(tmp_path, single_node_training)


def test_sigterm_checkpoints_on_every_rank_and_resumes_bit_exactly(features, single_node_training, tmp_path):
    # One data-loader worker per process: SLURM signals those too, and they must live on.
    arguments = train_args(features, tmp_path, "--num-workers", "1")
    launcher = subprocess.Popen(single_node(2, "train_mask_adan.py", *arguments), cwd=tmp_path,
                                env=LAUNCH_ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log_path = lambda: os.path.join(experiment(tmp_path), "log.txt")  # noqa: E731
    assert wait_for(lambda: os.listdir(tmp_path) and os.path.exists(log_path())
                    and "(step=0000002)" in open(log_path()).read(), launcher)
    rank1 = worker_pid(launcher.pid, rank=1)
    for pid in [rank1, *children(rank1)]:  # rank 0 is never signalled: the ranks agree
        os.kill(pid, signal.SIGTERM)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, output[-3000:]
    saved = sorted(os.listdir(os.path.join(experiment(tmp_path), "checkpoints")))
    assert len(saved) == 1 and saved[0] < f"{STEPS:07d}.pt", "the run finished before the signal"
    assert f"stopped by SIGTERM at step {int(saved[0][:-3])}" in open(log_path()).read()

    resumed = run_together([single_node(2, "train_mask_adan.py", *arguments, "--resume", "latest")],
                           cwd=tmp_path)
    assert_succeeded(resumed)
    assert_same_training(tmp_path, single_node_training)


def test_sampling_resumes_after_sigterm(files, tmp_path):  # noqa: F811
    # One image per batch, so the signal lands between PNGs; the batch size changes no image.
    longer = ("--num-sampling-steps", "50")
    stopped_dir, straight_dir = tmp_path / "stopped", tmp_path / "straight"
    process = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "image_generator_ddp.py"),
                                *ddp_args(files, stopped_dir, "--per-proc-batch-size", "1", *longer)],
                               cwd=tmp_path, env=LAUNCH_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_png = lambda: stopped_dir.exists() and any(  # noqa: E731
        os.path.exists(stopped_dir / name / "000000.png") for name in os.listdir(stopped_dir))
    assert wait_for(first_png, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM
    (folder,) = os.listdir(stopped_dir)
    pngs = [name for name in os.listdir(stopped_dir / folder) if name.endswith(".png")]
    assert 0 < len(pngs) < 10, "the run finished before the signal"
    assert not any(name.endswith(".npz") for name in os.listdir(stopped_dir / folder))

    image_generator_ddp.main(ddp_args(files, stopped_dir, "--per-proc-batch-size", "10", *longer))
    image_generator_ddp.main(ddp_args(files, straight_dir, "--per-proc-batch-size", "10", *longer))
    npz = [name for name in os.listdir(stopped_dir / folder) if name.endswith(".npz")][0]
    with open(stopped_dir / folder / npz, "rb") as resumed, open(straight_dir / folder / npz, "rb") as clean:
        assert resumed.read() == clean.read()
