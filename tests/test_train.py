"""train_mask_adan.py on CPU: a tiny EDT on tiny latents.

Covers the lr schedule, the data order, loss falling, bit-exact resume (with and without
gradient accumulation), checkpoint contents, two processes under accelerate, and bad input.
"""
import argparse
import os
import textwrap

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters
from accelerate.state import AcceleratorState

import models
import train_mask_adan
import training.build
import training.loop
import training.setup
from diffusion import create_diffusion
from latents import LatentDataset
from latents.shards import plan_shards, write_manifest, write_shard
from runtime.checkpoint import load_checkpoint, read_checkpoint
from training.data import EpochBatches
from training.schedule import default_init_lr, learning_rate

from launch import run_on_one_accelerate_machine
from replay_stand_in import replayed_without_capture

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_LATENTS = 16
NUM_CLASSES = 3
TINY_EDT = ["--model", "EDT", "--dims", *["32"] * 5, "--num-heads", *["2"] * 5,
            "--depths", *["1"] * 5, "--patch-size", "1", "--num-workers", "0", "--log-every", "2"]


def write_features(path, latent_shape=(4, 8, 8), image_size=64, vae="ema", count=NUM_LATENTS):
    """A features folder with random latents, its manifest in the layout extract_features.py wrote
    before it recorded the latent normalisation (a `scale_factor`), which must still train."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((count, 1, *latent_shape)).astype(np.float16)
    features = np.concatenate([latents, latents[..., ::-1]], axis=1)  # (N, 2, C, h, w)
    labels = np.arange(count) % NUM_CLASSES
    settings = {"image_size": image_size, "vae": vae}
    specs = plan_shards(count, shard_size=8)
    for spec in specs:
        write_shard(path, spec, features[spec.start:spec.stop], labels[spec.start:spec.stop], [], settings)
    write_manifest(path, specs, {"image_size": image_size, "latent_shape": list(latent_shape), "vae": vae,
                                 "scale_factor": 0.18215, "settings": settings,
                                 "class_to_idx": {f"class{i}": i for i in range(NUM_CLASSES)}})
    return str(path)


# The tiny model runs several times faster on one thread, most of all on a busy machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("features"))


def train(features, results, *options):
    return train_mask_adan.main(["--feature-path", features, "--results-dir", str(results),
                                 *TINY_EDT, *options])


def checkpoint_files(results):
    (experiment,) = os.listdir(results)
    return sorted(os.listdir(os.path.join(results, experiment, "checkpoints"))), os.path.join(results, experiment)


def assert_same_tree(a, b, where="checkpoint"):
    """Recursively equal: tensors bit for bit, everything else with ==."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{index}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


#################################################################################
#                            Schedule and data order                            #
#################################################################################

def test_learning_rate_is_linear_then_flat():
    assert learning_rate(0, 1e-3, 5e-5, 400_000) == 1e-3
    assert learning_rate(200_000, 1e-3, 5e-5, 400_000) == pytest.approx(5.25e-4)
    assert learning_rate(100_000, 1e-3, 5e-5, 400_000) == pytest.approx(7.625e-4)
    assert learning_rate(400_000, 1e-3, 5e-5, 400_000) == 5e-5
    assert learning_rate(900_000, 1e-3, 5e-5, 400_000) == 5e-5
    assert default_init_lr("EDT-XL/2") == 5e-4
    assert default_init_lr("EDT-S/2") == default_init_lr("EDT") == 1e-3


def test_processes_read_disjoint_micro_batches_of_each_global_batch():
    world, mini, accumulation = 2, 2, 2
    global_batch = world * mini * accumulation
    ranks = [EpochBatches(20, 7, global_batch, mini, rank, world) for rank in range(world)]
    assert ranks[0].steps_per_epoch == 20 // global_batch  # the incomplete batch is dropped
    per_rank = [rank.micro_batches(epoch=3) for rank in ranks]
    for step in range(ranks[0].steps_per_epoch):
        step_items = [index for batches in per_rank
                      for batch in batches[step * accumulation:(step + 1) * accumulation] for index in batch]
        assert len(set(step_items)) == global_batch
    everything = [index for batches in per_rank for batch in batches for index in batch]
    assert len(set(everything)) == len(everything) == ranks[0].steps_per_epoch * global_batch
    # Resuming mid-epoch reads the rest of the same order; other epochs are reshuffled.
    assert ranks[1].micro_batches(epoch=3, first_step=1) == per_rank[1][accumulation:]
    assert ranks[1].micro_batches(epoch=4) != per_rank[1]


#################################################################################
#                                   Training                                    #
#################################################################################

def fixed_noise_loss(model, features_path):
    """The full-token loss of every latent at fixed timesteps and noise (no label drop)."""
    dataset = LatentDataset(features_path, seed=0, random_flip=False)
    latents = torch.stack([dataset[index][0] for index in range(len(dataset))])  # (N, C, h, w)
    labels = torch.stack([dataset[index][1] for index in range(len(dataset))])
    diffusion = create_diffusion("")
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    model.eval()
    with torch.no_grad():
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.full((len(latents),), t)
            total += diffusion.training_losses(model, latents, timesteps, dict(y=labels),
                                               noise=noise)["loss"].mean().item()
    return total / 5


def test_loss_falls_when_fitting_a_few_latents(tmp_path):
    features = write_features(tmp_path / "features", count=4)
    train(features, tmp_path / "results", "--global-batch-size", "4", "--max-steps", "60",
          "--ckpt-every", "5", "--init-lr", "2e-3", "--schedule-sampler", "uniform")
    files, experiment = checkpoint_files(tmp_path / "results")
    assert files[0] == "0000005.pt" and files[-1] == "0000060.pt"
    losses = []
    for name in (files[0], files[-1]):
        checkpoint = read_checkpoint(os.path.join(experiment, "checkpoints", name))
        model = models.build_model(checkpoint["model_config"])
        model.load_state_dict(checkpoint["model"])
        losses.append(fixed_noise_loss(model, features))
    assert losses[1] < 0.7 * losses[0], losses


def test_fused_mask_batch_trains(features, tmp_path):
    state = train(features, tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--fused-mask-batch")
    assert state.step == 2
    # Both halves of the fused batch fed the sampler: 2 steps x 4 samples.
    assert state.schedule_sampler.state_dict()["loss_counts"].sum() == 8
    log = open(os.path.join(checkpoint_files(tmp_path)[1], "log.txt")).read()
    full, masked = (float(value) for value in
                    log.split("(step=0000002) loss ")[1].split("(full ")[1].split(")")[0].split(", masked "))
    assert full > 0 and masked > 0


def test_gradient_checkpointing_changes_nothing(features, tmp_path):
    plain = train(features, tmp_path / "plain", "--global-batch-size", "4", "--max-steps", "2")
    recomputed = train(features, tmp_path / "recomputed", "--global-batch-size", "4", "--max-steps", "2",
                       "--grad-checkpointing")
    assert_same_tree(plain.model.state_dict(), recomputed.model.state_dict(), "model")
    assert_same_tree(plain.optimizer.state_dict(), recomputed.optimizer.state_dict(), "opt")


def test_flat_adan_resumes_bit_exactly_and_follows_timm_adan(features, tmp_path):
    plan = ("--global-batch-size", "4")
    timm_run = train(features, tmp_path / "timm", *plan, "--max-steps", "4")
    train(features, tmp_path / "straight", *plan, "--max-steps", "4", "--flat-adan")
    train(features, tmp_path / "split", *plan, "--max-steps", "2", "--flat-adan")
    resumed = train(features, tmp_path / "split", *plan, "--max-steps", "4", "--resume", "latest", "--flat-adan")
    assert type(resumed.optimizer).__name__ == "FlatAdan"
    checkpoints = [read_checkpoint(os.path.join(checkpoint_files(tmp_path / run)[1], "checkpoints", "0000004.pt"))
                   for run in ("straight", "split")]
    for key in ("model", "ema", "opt"):
        assert_same_tree(checkpoints[0][key], checkpoints[1][key], key)
    flat_state, timm_state = checkpoints[0]["opt"], timm_run.optimizer.state_dict()
    assert flat_state["param_groups"] == timm_state["param_groups"]
    for name, value in timm_run.model.state_dict().items():  # compiled: equal to rounding
        torch.testing.assert_close(checkpoints[0]["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for index, state in timm_state["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(flat_state["state"][index][name], value, rtol=1e-5, atol=1e-6)


@pytest.fixture
def bf16_accelerator_state():
    """accelerate keeps one mixed-precision setting per process: this test's bf16 runs get a
    state of their own, and the tests after it get back a fresh one."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_training_with_compiled_blocks_follows_eager(features, tmp_path, bf16_accelerator_state):
    options = ["--global-batch-size", "4", "--max-steps", "2", "--mixed-precision", "bf16", "--log-every", "1",
               "--amm-blocks", "1"]
    eager = train(features, tmp_path / "eager", *options)
    counters.clear()
    compiled = train(features, tmp_path / "compiled", *options, "--compile")
    assert all(block._compiled_call_impl is not None for block in compiled.model.blocks)
    # One per grid, 8x8, 4x4 and 2x2 tokens: the AMM block, whose AMM acts only at inference, shares its grid's.
    assert counters["stats"]["unique_graphs"] == 3
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()  # checkpoints keep their names
    losses = [float(open(os.path.join(checkpoint_files(run)[1], "log.txt")).read().split("(step=0000001) loss ")[1]
                    .split()[0]) for run in (tmp_path / "eager", tmp_path / "compiled")]
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)  # bf16 kernels round differently
    for name, value in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[name], value, atol=5e-3, rtol=0, msg=name)


def assert_graphed_run_trains_as_the_default(results):
    default, graphed = (read_checkpoint(os.path.join(checkpoint_files(results / run)[1], "checkpoints", "0000002.pt"))
                        for run in ("default", "graphed"))
    for key in ("model", "ema", "opt"):
        assert_same_tree(graphed[key], default[key], key)
    assert "replay from CUDA graphs" in open(os.path.join(checkpoint_files(results / "graphed")[1], "log.txt")).read()
    return graphed


def test_cuda_graph_training_without_its_capture_trains_as_the_default(features, tmp_path, bf16_accelerator_state,
                                                                       monkeypatch):
    """--cuda-graphs on the CPU with torch's capture left out (it needs CUDA; the GPU protocol
    checks it against eager): EDT-S/2's losses module, its autocast and its DDP-ready preparation
    give the default run's checkpoint bit for bit, on two threads."""
    torch.set_num_threads(2)  # the module's fixture puts the count back
    options = ["--feature-path", features, "--model", "EDT-S/2", "--amm-blocks", "none", "--num-workers", "0",
               "--global-batch-size", "4", "--max-steps", "2", "--mixed-precision", "bf16", "--fused-mask-batch"]
    train_mask_adan.main([*options, "--results-dir", str(tmp_path / "default")])
    captured = []

    def recorded(losses, latent_shape, batch_size, device):
        captured.append((type(losses).__name__, losses.training, latent_shape, batch_size, device.type))
        return replayed_without_capture(losses, latent_shape, batch_size, device)
    monkeypatch.setattr(training.setup, "graphing_problem", lambda *args: None)
    monkeypatch.setattr(training.loop, "graph_training_losses", recorded)
    train_mask_adan.main([*options, "--results-dir", str(tmp_path / "graphed"), "--cuda-graphs"])
    assert captured == [("TrainingLosses", True, (4, 8, 8), 4, "cpu")]
    assert_graphed_run_trains_as_the_default(tmp_path)


GRAPHED_DDP_DRIVER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    sys.path.append(os.path.join({repo!r}, "tests"))
    import train_mask_adan
    import training.loop, training.setup
    from replay_stand_in import replayed_without_capture

    if "--cuda-graphs" in sys.argv:
        training.setup.graphing_problem = lambda *args: None
        training.loop.graph_training_losses = replayed_without_capture
    train_mask_adan.main(sys.argv[1:])
""")


def test_cuda_graph_training_without_its_capture_trains_two_processes_as_the_default(features, tmp_path):
    """The same on two processes, where accelerate wraps the losses module, not the model, in DDP
    (one launch per run: a process group is not joined twice)."""
    driver = tmp_path / "driver.py"
    driver.write_text(GRAPHED_DDP_DRIVER.format(repo=REPO_ROOT))
    options = [str(driver), "--feature-path", features, "--model", "EDT-S/2", "--amm-blocks", "none",
               "--num-workers", "0", "--global-batch-size", "4", "--max-steps", "2", "--fused-mask-batch"]
    for run, extra in (("default", []), ("graphed", ["--cuda-graphs"])):
        completed = run_on_one_accelerate_machine(tmp_path, *options, "--results-dir", str(tmp_path / run), *extra)
        assert completed.returncode == 0, completed.stderr[-3000:]
    assert assert_graphed_run_trains_as_the_default(tmp_path)["world_size"] == 2


def test_cuda_graphs_on_the_cpu_stop_before_any_folder(features, tmp_path):
    with pytest.raises(SystemExit, match="error: --cuda-graphs needs a GPU"):
        train(features, tmp_path / "results", "--global-batch-size", "4", "--max-steps", "1", "--cuda-graphs")
    assert not os.path.exists(tmp_path / "results")


def test_exact_decoder_nll_is_an_option_of_the_training_diffusion(features, tmp_path, monkeypatch):
    built = []

    def recording(*args, **kwargs):
        built.append(create_diffusion(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(training.build, "create_diffusion", recording)
    train(features, tmp_path / "released", "--global-batch-size", "4", "--max-steps", "1")
    train(features, tmp_path / "exact", "--global-batch-size", "4", "--max-steps", "1", "--exact-decoder-nll")
    assert [diffusion.exact_decoder_nll for diffusion in built] == [False, True]


@pytest.fixture(scope="module")
def resume_runs(features, tmp_path_factory):
    """For each batch plan: (checkpoint of 6 straight steps, of 3 + resume + 3, results dirs)."""
    runs = {}
    for plan in (("--global-batch-size", "4"), ("--global-batch-size", "8", "--mini-batch-size", "4")):
        straight = tmp_path_factory.mktemp("straight")
        split = tmp_path_factory.mktemp("split")
        train(features, straight, *plan, "--max-steps", "6")
        train(features, split, *plan, "--max-steps", "3")
        train(features, split, *plan, "--max-steps", "6", "--resume", "latest")
        runs[plan] = (straight, split)
    return runs


def test_resume_is_bit_exact(resume_runs):
    for plan, (straight, split) in resume_runs.items():
        straight_files, straight_dir = checkpoint_files(straight)
        split_files, split_dir = checkpoint_files(split)
        assert straight_files == ["0000006.pt"]
        assert split_files == ["0000003.pt", "0000006.pt"]  # the resumed run went on in its folder
        a = read_checkpoint(os.path.join(straight_dir, "checkpoints", "0000006.pt"))
        b = read_checkpoint(os.path.join(split_dir, "checkpoints", "0000006.pt"))
        for key in ("model", "ema", "opt", "schedule_sampler", "rng", "step", "epoch", "epoch_step"):
            assert_same_tree(a[key], b[key], f"{plan} {key}")
        assert b["schedule_sampler"]["loss_counts"].sum() > 0


def test_checkpoint_contents(resume_runs, features):
    straight, _ = resume_runs[("--global-batch-size", "4")]
    files, experiment = checkpoint_files(straight)
    assert os.path.basename(experiment) == "000-EDT"
    path = os.path.join(experiment, "checkpoints", files[-1])
    checkpoint = read_checkpoint(path)
    assert {"model", "ema", "opt", "args", "step", "epoch", "epoch_step", "schedule_sampler", "rng",
            "model_config", "vae", "image_size", "world_size", "grad_scaler"} <= checkpoint.keys()
    assert isinstance(checkpoint["args"], argparse.Namespace) and checkpoint["args"].max_steps == 6
    # 6 steps of 4 steps per epoch (16 latents, batch 4): 2 steps into the second epoch.
    assert (checkpoint["step"], checkpoint["epoch"], checkpoint["epoch_step"]) == (6, 1, 2)
    assert checkpoint["vae"] == "ema" and checkpoint["image_size"] == 64
    assert checkpoint["model_config"]["kwargs"]["in_channels"] == 4
    assert len(checkpoint["rng"]) == checkpoint["world_size"] == 1
    assert checkpoint["opt"]["param_groups"][0]["betas"] == (0.98, 0.92, 0.99)
    assert checkpoint["opt"]["param_groups"][0]["weight_decay"] == 0.0
    assert not torch.equal(checkpoint["model"]["final_layer.linear.weight"],
                           checkpoint["ema"]["final_layer.linear.weight"])
    model = models.build_model(checkpoint["model_config"])
    load_checkpoint(model, path, key="ema")
    assert torch.equal(model.final_layer.linear.weight, checkpoint["ema"]["final_layer.linear.weight"])
    log = open(os.path.join(experiment, "log.txt")).read()
    assert "trainable parameters" in log and "GMACs" in log and "(step=0000006) loss" in log
    assert any(name.startswith("events.out.tfevents")
               for name in os.listdir(os.path.join(experiment, "tensorboard")))


#################################################################################
#                                Two processes                                  #
#################################################################################

TWO_PROCESS_DRIVER = textwrap.dedent("""
    import os, sys
    import torch
    sys.path.insert(0, {repo!r})
    import train_mask_adan
    from training.data import EpochBatches

    seen = {{}}
    planned = EpochBatches.micro_batches

    def recording(self, epoch, first_step=0):
        batches = planned(self, epoch, first_step)
        seen.setdefault(epoch, []).extend(index for batch in batches for index in batch)
        return batches

    EpochBatches.micro_batches = recording
    state = train_mask_adan.main(sys.argv[2:])
    torch.save({{"model": state.model.state_dict(), "seen": seen, "tensorflow": "tensorflow" in sys.modules}},
               os.path.join(sys.argv[1], f"rank{{os.environ['RANK']}}.pt"))
""")


def test_two_processes_stay_in_sync_on_disjoint_data(features, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(TWO_PROCESS_DRIVER.format(repo=REPO_ROOT))
    results = tmp_path / "results"
    completed = run_on_one_accelerate_machine(
        tmp_path, str(driver), str(tmp_path), "--feature-path", features, "--results-dir", str(results),
        *TINY_EDT, "--global-batch-size", "8", "--mini-batch-size", "2", "--max-steps", "4")
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert_same_tree(ranks[0]["model"], ranks[1]["model"], "rank 0 vs rank 1")
    files, experiment = checkpoint_files(results)
    checkpoint = read_checkpoint(os.path.join(experiment, "checkpoints", files[-1]))
    assert_same_tree(checkpoint["model"], ranks[0]["model"], "checkpoint vs rank 0")
    assert checkpoint["world_size"] == len(checkpoint["rng"]) == 2
    assert not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])
    # Rank 0 wrote TensorBoard's events without importing TensorFlow, about 5 s of every launch.
    assert not any(rank["tensorflow"] for rank in ranks)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(experiment, "tensorboard")))
    # 16 latents, global batch 8: 2 steps per epoch, so 4 steps are 2 whole epochs.
    for epoch in (0, 1):
        mine, theirs = ranks[0]["seen"][epoch], ranks[1]["seen"][epoch]
        assert len(mine) == len(theirs) == NUM_LATENTS // 2
        assert sorted(mine + theirs) == list(range(NUM_LATENTS))


#################################################################################
#                                  Bad input                                    #
#################################################################################

def expect_error(argv, message):
    with pytest.raises(SystemExit) as raised:
        train_mask_adan.main(argv)
    text = str(raised.value)
    assert text.startswith("error: ") and message in text and "\n" not in text, text


def test_bad_input_fails_before_any_work(features, tmp_path):
    results = tmp_path / "results"
    base = ["--results-dir", str(results), "--num-workers", "0"]
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(["--feature-path", str(tmp_path / "missing"), *base], "is not a folder")
    expect_error(["--feature-path", str(empty), *base], "is empty")
    expect_error(["--feature-path", features, *base, "--model", "EDT-M/2"], "unknown model 'EDT-M/2'")
    expect_error(["--feature-path", features, *base, "--image-size", "256"], "--image-size 256 does not match")
    expect_error(["--feature-path", features, *base, "--num-classes", "1000"], "--num-classes 1000 does not match")
    expect_error(["--feature-path", features, *base, "--model", "EDT", "--dims", "32", "32"],
                 "--model EDT needs --dims with 5 integers")
    tiny_patch4 = [*TINY_EDT[:TINY_EDT.index("--patch-size")], "--patch-size", "4"]
    expect_error(["--feature-path", features, *base, *tiny_patch4], "cannot build EDT for these latents")
    expect_error(["--feature-path", features, *base, "--model", "DiT-S/2"], "train DiT-S/2 with --no-mask")
    expect_error(["--feature-path", features, *base, *TINY_EDT, "--global-batch-size", "6",
                  "--mini-batch-size", "4"], "must be a multiple of")
    expect_error(["--feature-path", features, *base, *TINY_EDT, "--global-batch-size", "4",
                  "--resume", str(tmp_path / "0400000.pt")], "no such checkpoint file")
    expect_error(["--feature-path", features, *base, "--unconditional", "--eval-every", "2", "--eval-reference",
                  str(tmp_path / "reference.npz"), "--eval-cfg-scale", "1", "1.5"],
                 "an --unconditional model has one class and no guidance")
    assert not results.exists()  # nothing was written


def test_resume_refuses_features_that_do_not_fit_the_checkpoint(resume_runs, tmp_path):
    straight, _ = resume_runs[("--global-batch-size", "4")]
    files, experiment = checkpoint_files(straight)
    pixels = write_features(tmp_path / "pixels", latent_shape=(3, 8, 8), image_size=8, vae="none")
    expect_error(["--feature-path", pixels, "--results-dir", str(tmp_path), *TINY_EDT, "--global-batch-size", "4",
                  "--resume", os.path.join(experiment, "checkpoints", files[-1])], "was trained as")
