"""diffusers' solvers (DPM-Solver++, its SDE variant, UniPC, Euler) on EDT's diffusion and EDT as a
diffusers pipeline: the solvers reach the exact probability-flow ODE's end point for Gaussian data,
each gives the same npz on one and two processes, the converted pipeline reloads offline and gives
the grid script's images, bad input fails with one clear line, and the sampler benchmark runs."""
import contextlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler
from PIL import Image

import image_generator
import image_generator_ddp
from benchmarks import samplers as samplers_benchmark
from benchmarks.chart import PANEL_SIZE
from models import create_model, model_config
from sampling import to_diffusers
from models.diffusers_wrapper import DiffusionTransformer
from sampling.images import GRID_PADDING
from sampling.labels import read_class_names
from sampling.pipeline import EDTPipeline
from sampling.sampler import SAMPLERS, Sampler, batch_inputs, draw_noise, image_generators
from sampling.solvers import SOLVERS, edt_betas, edt_scheduler, scheduler_method
from test_sampling import (AMM_BLOCKS, CFG, IMAGE_SIZE, NUM_CLASSES, NUM_IMAGES, REPO_ROOT, SEED, STEPS,
                           ddp_args, random_state_dict, read_bytes, save_ours, tiny_edt_kwargs)
from test_sampling import files  # noqa: F401  (test_sampling's checkpoints and tiny VAE, as a fixture here too)

GAUSSIAN_STD = 0.5  # the data distribution N(0, 0.5^2) of the exact-epsilon model
LATENT = (4, 8, 8)
GAUSSIAN_IMAGES = 32
CLASSES = [1, 5, 8]
EDT_S_PIXELS = 16  # EDT-S/2 on 16x16 pixels: 8x8, 4x4 and 2x2 token grids


#################################################################################
#                  The schedulers, against exact Gaussian answers               #
#################################################################################

def test_schedulers_have_edt_betas_and_stand_for_their_method():
    for method in SAMPLERS:
        scheduler = edt_scheduler(method)
        assert np.array_equal(scheduler.betas.numpy(), edt_betas().astype(np.float32))
        assert scheduler_method(scheduler) == method
        assert Sampler.for_scheduler(scheduler, 10).method == method
    with pytest.raises(ValueError, match="not a EulerAncestralDiscreteScheduler"):
        scheduler_method(EulerAncestralDiscreteScheduler(trained_betas=edt_betas().tolist()))
    with pytest.raises(ValueError, match="other betas than EDT's"):
        scheduler_method(DPMSolverMultistepScheduler(beta_schedule="scaled_linear"))


def gaussian_model_fn():
    """model_fn(x, t, y) of a perfect model of N(0, s^2) data: epsilon = x sqrt(1 - ab) / (ab s^2 + 1 - ab),
    and zero variance values. Fractional timesteps (Euler's) interpolate sigma as diffusers does."""
    alphas_cumprod = torch.tensor(np.cumprod(1 - edt_betas()))
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()

    def model_fn(x, t, y):
        low = t.double().floor().long().clamp(max=len(sigmas) - 2)
        weight = t.double() - low
        sigma = sigmas[low] * (1 - weight) + sigmas[low + 1] * weight
        alpha_bar = (1 / (1 + sigma ** 2)).view(-1, 1, 1, 1).float()
        eps = x * (1 - alpha_bar).sqrt() / (alpha_bar * GAUSSIAN_STD ** 2 + 1 - alpha_bar)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)
    return model_fn


def gaussian_samples(method, steps):
    """(samples, the exact probability-flow ODE end points of their x_T)."""
    sample = Sampler(method, steps).sample_fn(gaussian_model_fn(), LATENT, "cpu")
    samples = sample(*batch_inputs(SEED, range(GAUSSIAN_IMAGES), NUM_CLASSES))
    generators, _ = batch_inputs(SEED, range(GAUSSIAN_IMAGES), NUM_CLASSES)
    alpha_bar_T = np.prod(1 - edt_betas())
    x_T = draw_noise(generators, LATENT, "cpu")
    return samples, x_T * GAUSSIAN_STD / np.sqrt(alpha_bar_T * GAUSSIAN_STD ** 2 + 1 - alpha_bar_T)


def relative_error(samples, exact):
    return ((samples - exact).norm() / exact.norm()).item()


# Measured here: DPM-Solver++ 4.6e-2, 6.7e-4, 1.2e-4 at 20, 100, 200 steps; UniPC 4.3e-2, 1.6e-3,
# 1.1e-3; Euler (first order) 1.4e-1, 2.8e-2, 1.4e-2.
@pytest.mark.parametrize("method, tolerance", [("dpm-solver++", 1e-3), ("unipc", 3e-3), ("euler", 2e-2)])
def test_ode_solvers_converge_to_the_exact_end_point(method, tolerance):
    errors = [relative_error(*gaussian_samples(method, steps)) for steps in (20, 100, 200)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < tolerance


def test_sde_solver_samples_the_data_distribution_with_its_own_noise():
    samples, exact = gaussian_samples("dpm-solver++-sde", 200)
    assert abs(samples.std().item() / GAUSSIAN_STD - 1) < 0.03  # measured 0.9988
    assert relative_error(samples, exact) > 1.0  # the step noise takes it off the ODE's path


#################################################################################
#                   The npz: the same on one and on two processes               #
#################################################################################

def free_ports(count):
    """`count` distinct free ports (probed together, so none repeats)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def test_each_solver_gives_the_same_npz_on_one_and_two_processes(files, tmp_path):
    for method in SOLVERS:
        image_generator_ddp.main(ddp_args(files, tmp_path / "one", "--per-proc-batch-size", "4", "--sampler", method))
    agent_port, *run_ports = free_ports(1 + len(SOLVERS))  # torchrun's, and one per sampler's process group
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nnodes=1", "--nproc_per_node=2",
               f"--master_port={agent_port}", os.path.join(REPO_ROOT, "tests", "sample_with_each.py"),
               ",".join(SOLVERS), ",".join(map(str, run_ports)),
               *ddp_args(files, tmp_path / "two", "--per-proc-batch-size", "2")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    npz_files = []
    for method in SOLVERS:
        folder = f"EDT-0000100-size-{IMAGE_SIZE}-vae-ema-cfg-{CFG}-{method}{STEPS}-amm1.3-seed-{SEED}"
        name = f"samples_{NUM_IMAGES}x{IMAGE_SIZE}x{IMAGE_SIZE}x3.npz"
        npz_files.append(read_bytes(tmp_path / "one" / folder / name))
        assert read_bytes(tmp_path / "two" / folder / name) == npz_files[-1], method
    assert len(set(npz_files)) == len(SOLVERS)  # every solver samples differently


def test_edt_s_solvers_give_the_same_npz_on_one_and_two_processes_with_two_threads(tmp_path):
    """The released EDT-S/2 architecture (random weights, 16x16 pixels): the stochastic solver and
    a multistep one, on one process and on two, each with two threads, at one batch size (EDT-S/2's
    float32 kernels round some pixels differently for another number of rows)."""
    kwargs = {"input_size": EDT_S_PIXELS, "in_channels": 3, "num_classes": NUM_CLASSES}
    weights = random_state_dict(create_model("EDT-S/2", **kwargs))
    ckpt = tmp_path / "0000001.pt"
    torch.save({"model": weights, "ema": weights, "args": {}, "model_config": model_config("EDT-S/2", **kwargs),
                "vae": "none", "image_size": EDT_S_PIXELS}, ckpt)
    methods = ("dpm-solver++-sde", "unipc")
    arguments = ["--ckpt", str(ckpt), "--num-images", "6", "--num-sampling-steps", "4", "--cfg-scale", str(CFG),
                 "--global-seed", str(SEED)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for method in methods:
            image_generator_ddp.main([*arguments, "--output-dir", str(tmp_path / "one"), "--sampler", method,
                                      "--per-proc-batch-size", "2"])
    finally:
        torch.set_num_threads(threads)
    agent_port, *run_ports = free_ports(1 + len(methods))
    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nnodes=1", "--nproc_per_node=2",
               f"--master_port={agent_port}", os.path.join(REPO_ROOT, "tests", "sample_with_each.py"),
               ",".join(methods), ",".join(map(str, run_ports)),
               *arguments, "--output-dir", str(tmp_path / "two"), "--per-proc-batch-size", "2"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    npz_files = sorted((tmp_path / "one").glob("*/samples_*.npz"))
    assert len(npz_files) == len(methods)
    for npz in npz_files:
        assert read_bytes(tmp_path / "two" / npz.parent.name / npz.name) == read_bytes(npz), npz.parent.name


#################################################################################
#                               The diffusers pipeline                          #
#################################################################################

@pytest.fixture(scope="module")
def pipeline_folder(files):
    labels = files["root"] / "labels.txt"
    labels.write_text("".join(f"digit {index}, number {index}\n" for index in range(NUM_CLASSES)))
    out = files["root"] / "edt-pipeline"
    to_diffusers.main(["--ckpt", files["ckpt"], "--vae-path", files["vae"], "--out", str(out),
                       "--sampler", "dpm-solver++-sde", "--labels", str(labels)])
    return out


def grid_cells(path, count):
    """The `count` images of a one-column grid PNG."""
    grid = np.asarray(Image.open(path))
    tops = [GRID_PADDING + row * (IMAGE_SIZE + GRID_PADDING) for row in range(count)]
    return np.stack([grid[top:top + IMAGE_SIZE, GRID_PADDING:GRID_PADDING + IMAGE_SIZE] for top in tops])


def test_converted_folder_holds_safetensors_and_configs(pipeline_folder):
    assert sorted(os.listdir(pipeline_folder)) == ["model_index.json", "scheduler", "transformer", "vae"]
    assert sorted(os.listdir(pipeline_folder / "transformer")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((pipeline_folder / "transformer" / "config.json").read_text())
    assert (config["model_name"], config["amm_blocks"]) == ("EDT", AMM_BLOCKS)
    kwargs = {key: value for key, value in tiny_edt_kwargs().items() if key != "amm_blocks"}
    kwargs["amm_variant"] = "256"  # the AMM function the loaded model uses, kept with the weights
    assert config["model_kwargs"] == json.loads(json.dumps(kwargs))  # tuples as JSON lists
    index = json.loads((pipeline_folder / "model_index.json").read_text())
    assert index["transformer"] == ["models.diffusers_wrapper", "DiffusionTransformer"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]


def test_pipeline_loads_offline_in_a_fresh_process(pipeline_folder):
    load = (f"from sampling.pipeline import EDTPipeline; pipe = EDTPipeline.from_pretrained({str(pipeline_folder)!r}); "
            "print(type(pipe.transformer.model).__name__, type(pipe.scheduler).__name__, pipe.labels['digit 3'])")
    result = subprocess.run([sys.executable, "-c", load], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["EDT", "DPMSolverMultistepScheduler", "3"]


@pytest.mark.parametrize("method", ["dpm-solver++-sde", "ddpm"])
def test_pipeline_gives_the_grid_scripts_images(files, pipeline_folder, tmp_path, method):
    pipe = EDTPipeline.from_pretrained(pipeline_folder)
    pipe.scheduler = edt_scheduler(method)
    images = pipe(class_labels=CLASSES, guidance_scale=CFG, num_inference_steps=STEPS, amm=True,
                  generator=image_generators(0, range(len(CLASSES))), output_type="np").images
    image_generator.main(["--ckpt", files["ckpt"], "--vae-path", files["vae"], "--class-labels", *map(str, CLASSES),
                          "--samples-per-class", "1", "--cfg-scale", str(CFG), "--sampler", method,
                          "--num-sampling-steps", str(STEPS), "--batch-size", str(len(CLASSES)),
                          "--output-dir", str(tmp_path)])
    (grid,) = tmp_path.glob("*.png")
    assert f"-{method}{STEPS}-amm1.3-" in grid.name
    assert images.dtype == np.uint8 and np.array_equal(images, grid_cells(grid, len(CLASSES)))


def test_pipeline_returns_pil_images_names_classes_and_restores_its_amm(pipeline_folder):
    pipe = EDTPipeline.from_pretrained(pipeline_folder)
    assert pipe.get_label_ids(["digit 5", "number 7"]) == [5, 7]
    generators = image_generators(0, range(2))
    with_amm = pipe(class_labels=[5, 7], num_inference_steps=3, generator=generators).images
    assert [image.size for image in with_amm] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2
    without = pipe(class_labels=[5, 7], num_inference_steps=3, amm=False, generator=image_generators(0, range(2)))
    assert pipe.transformer.model.amm_blocks == AMM_BLOCKS  # amm=False held for that call only
    assert not np.array_equal(np.asarray(with_amm[0]), np.asarray(without.images[0]))
    with pytest.raises(ValueError, match="2 generators for 3 images"):
        pipe(class_labels=[1, 2, 3], generator=image_generators(0, range(2)))
    with pytest.raises(ValueError, match="unknown class names"):
        pipe.get_label_ids(["cat"])


@pytest.mark.parametrize("name, kwargs", [
    ("DiT", dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=NUM_CLASSES)),
    ("MDTv2", dict(input_size=8, patch_size=2, hidden_size=32, depth=4, decode_layer=2, num_heads=2,
                   num_classes=NUM_CLASSES)),
])
def test_dit_and_mdt_round_trip_through_save_pretrained(tmp_path, name, kwargs):
    config = model_config(name, **kwargs, amm_blocks=[1])
    weights = random_state_dict(create_model(name, **kwargs))
    DiffusionTransformer.from_config_and_weights(config, weights).save_pretrained(tmp_path)
    loaded = DiffusionTransformer.from_pretrained(tmp_path)
    model = create_model(name, **kwargs, amm_blocks=[1])
    model.load_state_dict(weights)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([3, NUM_CLASSES])
    assert not loaded.training and loaded.model.amm_blocks == [1]
    assert torch.equal(loaded(x, t, y), model.eval()(x, t, y))


def test_a_released_checkpoint_named_like_its_model_needs_no_model_flag():
    assert to_diffusers.model_named_like("weights/EDT-S-2.pt") == "EDT-S/2"
    assert to_diffusers.model_named_like("DiT-XL-2.pt") == "DiT-XL/2"
    assert to_diffusers.model_named_like("0400000.pt") is None


#################################################################################
#                                  Bad input                                    #
#################################################################################

@pytest.mark.parametrize("extra, message", [
    (["--sampler", "dpm"], "--sampler dpm: unknown; choose from ddpm, ddim, dpm-solver++"),
    (["--sampler", "dpm-solver++", "--num-sampling-steps", "1000"], "dpm-solver++ takes 1 to 999 steps"),
    (["--sampler", "euler", "--num-sampling-steps", "1"], "euler takes 2 to 1000 steps"),
    (["--sampler", "unipc", "--num-sampling-steps", "0"], "--num-sampling-steps must be at least 1"),
])
@pytest.mark.parametrize("script", [image_generator_ddp, image_generator])
def test_bad_sampler_or_step_count_is_one_error_line(files, tmp_path, script, extra, message):
    argv = ["--ckpt", files["ckpt"], "--vae-path", files["vae"], "--output-dir", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    error = str(exit_info.value.code)
    assert error.startswith("error: ") and message in error and "\n" not in error
    assert not os.path.exists(tmp_path / "out")


def test_label_files_as_json_or_lines_give_the_same_names(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"1": "one, i", "0": "zero"}))
    (tmp_path / "labels.txt").write_text("zero\n\none, i\n")
    assert read_class_names(tmp_path / "labels.json") == read_class_names(tmp_path / "labels.txt") == ["zero", "one, i"]
    (tmp_path / "gap.json").write_text(json.dumps({"0": "zero", "2": "two"}))
    with pytest.raises(ValueError, match="does not name the classes 0 to 1"):
        read_class_names(tmp_path / "gap.json")


def test_converter_refuses_a_full_folder_and_wrong_labels(files, tmp_path):
    args = ["--ckpt", files["ckpt"], "--vae-path", files["vae"]]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("")
    with pytest.raises(SystemExit, match="exists and is not an empty folder"):
        to_diffusers.main([*args, "--out", str(tmp_path / "full")])
    (tmp_path / "labels.json").write_text(json.dumps({"0": "zero", "1": "one"}))
    with pytest.raises(SystemExit, match="names 2 classes, the model has 10"):
        to_diffusers.main([*args, "--out", str(tmp_path / "new"), "--labels", str(tmp_path / "labels.json")])
    assert sorted(os.listdir(tmp_path)) == ["full", "labels.json"]  # nothing half-written


#################################################################################
#                               The sampler benchmark                           #
#################################################################################

def test_sampler_benchmark_writes_its_table_and_plot(tmp_path):
    checkpoint = str(tmp_path / "digits.pt")
    save_ours(checkpoint, tiny_edt_kwargs(input_size=8, in_channels=3), "none", 8)  # 8x8 digits, pixel space
    output = str(tmp_path / "report" / "samplers")
    rows = samplers_benchmark.main(["--ckpt", checkpoint, "--settings", "ddpm:3", "dpm-solver++:2",
                                    "--cfg-scales", "1", "2", "--num-images", "20", "--output", output])
    assert [(row["sampler"], row["steps"], row["cfg_scale"]) for row in rows] == [
        ("ddpm", 3, 1.0), ("dpm-solver++", 2, 1.0), ("ddpm", 3, 2.0), ("dpm-solver++", 2, 2.0)]
    assert all(0 <= row["accuracy"] <= 1 and row["frechet_distance"] > 0 and row["seconds"] > 0 for row in rows)
    table = open(f"{output}.md").read()
    assert "| dpm-solver++ | 2 | 2 |" in table and "Real held-out digits: accuracy" in table
    assert json.load(open(f"{output}.json"))["rows"] == json.loads(json.dumps(rows))
    assert Image.open(f"{output}.png").size[0] == 2 * PANEL_SIZE[0]  # a column per guidance scale
    with pytest.raises(SystemExit, match="expected SAMPLER:STEPS"):
        samplers_benchmark.parse_args(["--ckpt", checkpoint, "--settings", "plms:10"])
