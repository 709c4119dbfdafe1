"""Sampling end to end on CPU with a tiny EDT (random weights), a tiny saved AutoencoderKL and a
pixel-space model: the npz does not depend on the process count or the batch size, an
interrupted run resumes to the same npz, guidance and AMM do what they say, bad input fails with
one clear line, and the grid script compares AMM on and off from the same noise."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import image_generator
import image_generator_ddp
import models.attention_kernels
import models.triton_attention
import sampling.images
from models import create_model, model_config
from runtime.checkpoint import state_dict_sha256
from sampling.images import GRID_PADDING, make_grid, npz_name, side_by_side, to_uint8
from sampling.loading import SamplingSetupError, build_released_model, load_sampling_model
from sampling.naming import amm_tag, comparison_tag, sample_name
from sampling.sampler import SAMPLERS, Sampler, all_labels, batch_inputs, guided_model_fn
from launch import free_port
from tiny_vae import TINY_VAE_DOWNSAMPLING, save_tiny_vae

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 16
LATENT_SIZE = IMAGE_SIZE // TINY_VAE_DOWNSAMPLING
PIXEL_IMAGE_SIZE = 8
NUM_CLASSES = 10
AMM_BLOCKS = [1, 3]  # stages 1 and 3 (4x4 grids); stage 2's 2x2 grid is too small for an AMM
WEIGHT_SCALE = 0.1  # random weights large enough that guidance and AMM change the samples
NUM_IMAGES = 10
SEED = 7
STEPS = 5
CFG = 1.5


#################################################################################
#                                   Fixtures                                    #
#################################################################################

def tiny_edt_kwargs(**overrides):
    kwargs = dict(input_size=LATENT_SIZE, patch_size=1, in_channels=4, dims=(32,) * 5,
                  num_heads=(2,) * 5, depths=(1,) * 5, num_classes=NUM_CLASSES, amm_blocks=AMM_BLOCKS)
    return {**kwargs, **overrides}


def random_state_dict(model, seed=0):
    """The model's state dict with every tensor but the fixed sin-cos pos_embeds randomised."""
    generator = torch.Generator().manual_seed(seed)
    return {key: value if "pos_embed" in key else torch.randn(value.shape, generator=generator) * WEIGHT_SCALE
            for key, value in model.state_dict().items()}


def save_ours(path, kwargs, vae, image_size):
    """A checkpoint as train_mask_adan.py writes it."""
    weights = random_state_dict(create_model("EDT", **kwargs))
    torch.save({"model": weights, "ema": weights, "args": {}, "model_config": model_config("EDT", **kwargs),
                "vae": vae, "image_size": image_size}, path)
    return weights


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    paths = {"root": root, "vae": save_tiny_vae(str(root / "sd-vae-ft-ema")),
             "ckpt": str(root / "0000100.pt"), "released": str(root / "released.pt"),
             "pixel": str(root / "pixel.pt")}
    weights = save_ours(paths["ckpt"], tiny_edt_kwargs(), "ema", IMAGE_SIZE)
    torch.save(weights, paths["released"])  # a raw state dict, as released
    save_ours(paths["pixel"], tiny_edt_kwargs(input_size=PIXEL_IMAGE_SIZE, in_channels=3, num_classes=3),
              "none", PIXEL_IMAGE_SIZE)
    return paths


def ddp_args(files, output_dir, *extra, ckpt=None):
    return ["--ckpt", ckpt or files["ckpt"], "--vae-path", files["vae"], "--output-dir", str(output_dir),
            "--num-images", str(NUM_IMAGES), "--num-sampling-steps", str(STEPS),
            "--cfg-scale", str(CFG), "--global-seed", str(SEED), *extra]


EXPECTED_FOLDER = f"EDT-0000100-size-{IMAGE_SIZE}-vae-ema-cfg-{CFG}-ddpm{STEPS}-amm1.3-seed-{SEED}"
EXPECTED_NPZ = os.path.join(EXPECTED_FOLDER, npz_name(NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE))


@pytest.fixture(scope="module")
def reference(files):
    """One process, batches of 4 (the last one of 2)."""
    output_dir = files["root"] / "reference"
    image_generator_ddp.main(ddp_args(files, output_dir, "--per-proc-batch-size", "4"))
    return output_dir / EXPECTED_NPZ


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


#################################################################################
#                         The npz: exact and reproducible                       #
#################################################################################

def test_npz_has_exact_count_shape_dtype_and_labels(reference):
    with np.load(reference) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert torch.equal(torch.from_numpy(labels), all_labels(SEED, NUM_IMAGES, NUM_CLASSES))
    assert len(set(labels.tolist())) > 1
    assert 20 < images.std() and ((images == 0) | (images == 255)).mean() < 0.1  # not saturated
    folder = reference.parent
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(NUM_IMAGES)] + ["log.txt", "manifest.json",
                                                                                     reference.name]
    assert np.array_equal(np.asarray(Image.open(folder / "000003.png")), images[3])


def test_npz_is_identical_for_two_processes_and_other_batch_sizes(files, reference, tmp_path):
    # The float samples differ in their last bits between batch sizes (CPU float32 kernels block
    # differently); measured here 1.5e-6 pixel levels on average for batches of 3 against 4, an
    # expected 0.01 changed uint8 values in this npz, so the bytes agree.
    image_generator_ddp.main(ddp_args(files, tmp_path / "batch3", "--per-proc-batch-size", "3"))
    assert read_bytes(tmp_path / "batch3" / EXPECTED_NPZ) == read_bytes(reference)

    command = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nnodes=1", "--nproc_per_node=2",
               f"--master_port={free_port()}", os.path.join(REPO_ROOT, "image_generator_ddp.py"),
               *ddp_args(files, tmp_path / "two", "--per-proc-batch-size", "2")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sampling 10 on 2 processes" in result.stdout
    assert read_bytes(tmp_path / "two" / EXPECTED_NPZ) == read_bytes(reference)


def test_several_guidance_scales_in_one_run_write_what_separate_runs_write(files, reference, tmp_path):
    image_generator_ddp.main(ddp_args(files, tmp_path / "both", "--per-proc-batch-size", "4", "--cfg-scale", "1", str(CFG)))
    image_generator_ddp.main(ddp_args(files, tmp_path / "one", "--per-proc-batch-size", "4", "--cfg-scale", "1"))
    unguided_folder = EXPECTED_FOLDER.replace(f"-cfg-{CFG}-", "-cfg-1.0-")
    assert sorted(os.listdir(tmp_path / "both")) == sorted([EXPECTED_FOLDER, unguided_folder])
    assert read_bytes(tmp_path / "both" / EXPECTED_NPZ) == read_bytes(reference)
    unguided_npz = os.path.join(unguided_folder, reference.name)
    assert read_bytes(tmp_path / "both" / unguided_npz) == read_bytes(tmp_path / "one" / unguided_npz)
    assert read_bytes(tmp_path / "both" / unguided_npz) != read_bytes(reference)
    for folder, scale in ((EXPECTED_FOLDER, CFG), (unguided_folder, 1.0)):  # each folder logs its own run
        assert f"'cfg_scale': {scale}," in (tmp_path / "both" / folder / "log.txt").read_text()


def test_bf16_sampling_with_compiled_blocks_follows_eager(files, reference, tmp_path):
    runs = {}
    for name, extra in {"eager": [], "compiled": ["--compile"]}.items():
        image_generator_ddp.main(ddp_args(files, tmp_path / name, "--per-proc-batch-size", "4",
                                          "--mixed-precision", "bf16", *extra))
        npz = os.path.join(f"{EXPECTED_FOLDER}-amp-bf16", os.path.basename(EXPECTED_NPZ))
        with np.load(tmp_path / name / npz) as data:
            runs[name] = data["arr_0"].astype(int)
    with np.load(reference) as data:
        float32 = data["arr_0"].astype(int)
    assert np.abs(runs["compiled"] - runs["eager"]).mean() < 1.0  # pixel levels: bf16 kernels round differently
    assert np.abs(runs["eager"] - float32).mean() < 1.0
    assert not np.array_equal(runs["eager"], float32)  # bf16 did run


def test_sampling_through_the_inference_attention_kernels_follows_the_default(files, reference, tmp_path,
                                                                                 monkeypatch):
    # The Triton kernel runs in its interpreter here, once inside the compiled blocks: it is one
    # operator to torch.compile. Every call reaches it, the AMM blocks' too.
    kernel_calls = []
    launch = models.triton_attention.launch
    monkeypatch.setattr(models.triton_attention, "launch", lambda *args: kernel_calls.append(args[4] is not None)
                        or launch(*args))
    with np.load(reference) as data:
        default = data["arr_0"][:4].astype(int)  # each image from its own index: the first 4 alone are the same
    for name, extra in {"triton": ["--attention-kernel", "triton", "--compile"],
                        "flex": ["--attention-kernel", "flex"]}.items():
        image_generator_ddp.main(ddp_args(files, tmp_path / name, "--per-proc-batch-size", "4", *extra,
                                          "--num-images", "4"))
        with np.load(tmp_path / name / EXPECTED_FOLDER / npz_name(4, IMAGE_SIZE, IMAGE_SIZE)) as data:
            assert np.abs(data["arr_0"].astype(int) - default).max() <= 1, name  # float32 rounding
    # 5 steps x 5 blocks (two of them AMM ones), the guided batch in one forward
    assert kernel_calls == [False, True, False, True, False] * STEPS


def test_interrupted_run_resumes_to_the_same_npz(files, reference, tmp_path, monkeypatch):
    written = []
    save_png = sampling.images.save_png

    def crash_after_four(path, image):
        if len(written) == 4:
            raise KeyboardInterrupt  # as if the run were killed here
        save_png(path, image)
        written.append(os.path.basename(path))

    monkeypatch.setattr(sampling.images, "save_png", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        image_generator_ddp.main(ddp_args(files, tmp_path, "--per-proc-batch-size", "3"))
    folder = tmp_path / EXPECTED_FOLDER
    assert sorted(os.listdir(folder)) == sorted(written) + ["log.txt", "manifest.json"]  # no npz, no temporary files

    def counting(path, image):
        save_png(path, image)
        written.append(os.path.basename(path))

    monkeypatch.setattr(sampling.images, "save_png", counting)
    image_generator_ddp.main(ddp_args(files, tmp_path, "--per-proc-batch-size", "3"))
    assert sorted(written) == [f"{i:06d}.png" for i in range(NUM_IMAGES)]  # only the missing ones
    assert read_bytes(folder / reference.name) == read_bytes(reference)

    image_generator_ddp.main(ddp_args(files, tmp_path, "--per-proc-batch-size", "3"))
    assert len(written) == NUM_IMAGES  # a finished folder samples nothing
    assert read_bytes(folder / reference.name) == read_bytes(reference)


def test_a_sample_folder_resumes_only_from_the_same_weights(files, tmp_path):
    """Two runs' checkpoints share the file name 0000100.pt; the folder's manifest tells them apart."""
    image_generator_ddp.main(ddp_args(files, tmp_path / "samples", "--num-images", "4"))
    folder = tmp_path / "samples" / EXPECTED_FOLDER
    first_weights = torch.load(files["ckpt"])["ema"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["weights_sha256"] == state_dict_sha256(first_weights) and manifest["ckpt_key"] == "ema"
    before = {name: os.stat(folder / name).st_mtime_ns for name in os.listdir(folder)}
    assert len([name for name in before if name.endswith(".png")]) == 4

    other_run = tmp_path / "other-run"
    other_run.mkdir()
    other = str(other_run / "0000100.pt")  # its EMA differs, its raw weights are the first run's EMA
    checkpoint = torch.load(files["ckpt"])
    other_weights = random_state_dict(create_model("EDT", **tiny_edt_kwargs()), seed=1)
    checkpoint["model"], checkpoint["ema"] = first_weights, other_weights
    torch.save(checkpoint, other)
    with pytest.raises(SystemExit) as exit_info:
        image_generator_ddp.main(ddp_args(files, tmp_path / "samples", ckpt=other))
    error = str(exit_info.value.code)
    assert error.startswith("error: ") and "holds samples of other weights" in error and "\n" not in error
    assert {name: os.stat(folder / name).st_mtime_ns for name in os.listdir(folder)} == before  # nothing written
    with pytest.raises(SystemExit, match="holds samples of other weights"):  # the second scale's folder
        image_generator_ddp.main(ddp_args(files, tmp_path / "samples", "--cfg-scale", "1", str(CFG), ckpt=other))
    assert os.listdir(tmp_path / "samples") == [EXPECTED_FOLDER]  # not even the first scale's folder

    # The same weights under another file resume the folder: here the other run's raw weights.
    image_generator_ddp.main(ddp_args(files, tmp_path / "samples", "--ckpt-key", "model", ckpt=other))
    assert len([name for name in os.listdir(folder) if name.endswith(".png")]) == NUM_IMAGES

    unknown = tmp_path / "unknown" / EXPECTED_FOLDER  # samples from before folders had a manifest
    unknown.mkdir(parents=True)
    shutil.copy(folder / "000000.png", unknown)
    with pytest.raises(SystemExit, match="holds samples but no manifest.json"):
        image_generator_ddp.main(ddp_args(files, tmp_path / "unknown"))
    assert os.listdir(unknown) == ["000000.png"]


def test_pixel_space_model_and_class_balanced_labels(files, tmp_path):
    image_generator_ddp.main(["--ckpt", files["pixel"], "--output-dir", str(tmp_path), "--num-images", "6",
                              "--num-sampling-steps", "4", "--sampler", "ddim", "--class-balanced", "--no-amm"])
    folder = f"EDT-pixel-size-{PIXEL_IMAGE_SIZE}-vae-none-cfg-1.0-ddim4-noamm-seed-0-balanced-6"
    with np.load(tmp_path / folder / npz_name(6, PIXEL_IMAGE_SIZE, PIXEL_IMAGE_SIZE)) as data:
        assert data["arr_0"].shape == (6, PIXEL_IMAGE_SIZE, PIXEL_IMAGE_SIZE, 3)
        assert data["arr_0"].dtype == np.uint8
        assert np.bincount(data["arr_1"]).tolist() == [2, 2, 2]


#################################################################################
#                        Sampler, guidance, AMM, naming                         #
#################################################################################

@pytest.fixture(scope="module")
def loaded(files):
    return load_sampling_model(files["ckpt"], vae_path=files["vae"])


def test_loading_follows_the_checkpoint_and_the_amm_flags(files, loaded):
    assert (loaded.model_name, loaded.image_size, loaded.vae_name) == ("EDT", IMAGE_SIZE, "ema")
    assert loaded.latent_shape == (4, LATENT_SIZE, LATENT_SIZE) and not loaded.model.training
    assert loaded.model.amm_blocks == AMM_BLOCKS
    for amm, expected in (("default", AMM_BLOCKS), ([], []), ([0, 4], [0, 4])):
        assert load_sampling_model(files["ckpt"], vae_path=files["vae"], amm=amm).model.amm_blocks == expected
    with pytest.raises(SamplingSetupError, match="no AMM preset"):
        build_released_model("DiT-S/4", (4, LATENT_SIZE, LATENT_SIZE), NUM_CLASSES, "default")


def test_released_checkpoint_loads_by_model_name_with_the_amm_plug_in(files, tmp_path):
    dit = create_model("DiT-S/2", input_size=LATENT_SIZE, num_classes=NUM_CLASSES)
    weights = random_state_dict(dit)
    path = str(tmp_path / "DiT-S-2.pt")
    torch.save({"model": weights, "ema": weights, "opt": {}, "args": argparse.Namespace(model="DiT-S/2")}, path)
    loaded = load_sampling_model(path, model_name="DiT-S/2", image_size=IMAGE_SIZE, num_classes=NUM_CLASSES,
                                 vae_path=files["vae"], amm="default")
    assert loaded.model.amm_blocks == [8, 10]  # the published DiT-S/2 arrangement
    assert loaded.latent_shape == (4, LATENT_SIZE, LATENT_SIZE)
    assert torch.equal(loaded.model.state_dict()["blocks.3.mlp.fc1.weight"], weights["blocks.3.mlp.fc1.weight"])


def test_cfg_scale_one_takes_the_plain_forward(loaded, monkeypatch):
    model = loaded.model
    x, t, y = torch.randn(3, 4, LATENT_SIZE, LATENT_SIZE), torch.tensor([999, 500, 3]), torch.tensor([1, 2, 3])
    plain = model(x, t, y)

    def no_guidance(*args, **kwargs):
        raise AssertionError("cfg-scale 1 must not run forward_with_cfg")

    monkeypatch.setattr(model, "forward_with_cfg", no_guidance)
    assert torch.equal(guided_model_fn(model, 1.0)(x, t, y), plain)
    monkeypatch.undo()

    guided = guided_model_fn(model, 3.0)(x, t, y)
    uncond = model(x, t, torch.full_like(y, NUM_CLASSES))  # the null class
    assert guided.shape == plain.shape
    torch.testing.assert_close(guided[:, :3], uncond[:, :3] + 3.0 * (plain[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(guided[:, 3:], plain[:, 3:])  # the faithful default guides 3 channels
    guided_all = guided_model_fn(model, 3.0, cfg_channels=None)(x, t, y)
    torch.testing.assert_close(guided_all, uncond + 3.0 * (plain - uncond))


@pytest.mark.parametrize("method", SAMPLERS)
def test_samples_depend_on_seed_and_index_only_and_amm_changes_them(loaded, method):
    sample = Sampler(method, 4).sample_fn(guided_model_fn(loaded.model, CFG), loaded.latent_shape, "cpu")

    def run(indices):
        return sample(*batch_inputs(SEED, indices, NUM_CLASSES))

    torch.manual_seed(0)
    batch = run([0, 1, 2, 3])
    torch.manual_seed(1)  # the global RNG plays no part
    alone = torch.cat([run([2, 3]), run([0, 1])])[[2, 3, 0, 1]]
    tolerance = dict(rtol=1e-5, atol=1e-3)  # CPU matmuls vary in the last bits with the batch size
    torch.testing.assert_close(alone, batch, **tolerance)
    assert not torch.allclose(batch[0], batch[1], atol=1.0)

    loaded.model.set_amm_blocks([])
    try:
        without_amm = run([0, 1, 2, 3])
    finally:
        loaded.model.set_amm_blocks(AMM_BLOCKS)
    assert not torch.allclose(without_amm, batch, **tolerance)


def test_names_record_every_setting():
    name = sample_name("EDT-S/2", "results/000-EDT-S-2/checkpoints/0400000.pt", 256, "ema", 1, "ddpm", 250,
                       amm_tag([7, 10]), 0)
    assert name == "EDT-S-2-0400000-size-256-vae-ema-cfg-1.0-ddpm250-amm7.10-seed-0"
    assert sample_name("EDT-S/2", "0400000.pt", 256, "ema", 1.0, "ddpm", 250, amm_tag([]), 0) != name
    assert amm_tag([10], "512") == "amm10-v512" and amm_tag([], "512") == "noamm"
    assert comparison_tag([10], "512") == "amm10-v512-vs-noamm"
    assert sample_name("DiT-XL/2", "DiT-XL-2-256x256.pt", 256, "mse", 4.0, "ddim", 50, amm_tag([]), 3,
                       cfg_channels=None, precision="bf16", balanced_images=1000) == (
        "DiT-XL-2-DiT-XL-2-256x256-size-256-vae-mse-cfg-4.0-ddim50-noamm-seed-3-guide-all-amp-bf16-balanced-1000")


def test_uint8_conversion_and_grids():
    images = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0]).view(1, 3, 1, 2)  # channels first
    assert to_uint8(images).tolist() == [[[[0, 128, 255], [64, 191, 255]]]]  # 127.5 x + 128, truncated
    tiles = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    grid = make_grid(tiles, rows=2, columns=3)
    assert grid.shape == (2 * (2 + GRID_PADDING) + GRID_PADDING, 3 * (2 + GRID_PADDING) + GRID_PADDING, 3)
    top, left = GRID_PADDING + (2 + GRID_PADDING), GRID_PADDING + 2 * (2 + GRID_PADDING)
    assert np.array_equal(grid[top:top + 2, left:left + 2], tiles[5])  # row-major: tile 5 is row 1, column 2


#################################################################################
#                                   Grids                                       #
#################################################################################

def test_grid_script_compares_amm_from_the_same_noise(files, tmp_path, capsys):
    args = ["--ckpt", files["ckpt"], "--vae-path", files["vae"], "--class-labels", "1", "5",
            "--samples-per-class", "3", "--num-sampling-steps", "4", "--batch-size", "4"]
    image_generator.main([*args, "--compare-amm", "--output-dir", str(tmp_path / "compare")])
    base = f"EDT-0000100-size-{IMAGE_SIZE}-vae-ema-cfg-4.0-ddpm4-{{}}-seed-0.png"
    with_amm, without_amm, both = (np.asarray(Image.open(tmp_path / "compare" / base.format(tag)))
                                   for tag in ("amm1.3", "noamm", "amm1.3-vs-noamm"))
    cell = IMAGE_SIZE + GRID_PADDING
    assert with_amm.shape == (2 * cell + GRID_PADDING, 3 * cell + GRID_PADDING, 3)
    assert np.array_equal(both, side_by_side(with_amm, without_amm))
    assert not np.array_equal(with_amm, without_amm)
    assert str(tmp_path / "compare" / base.format("amm1.3-vs-noamm")) in capsys.readouterr().out

    # Several scales: each grid as a run at its scale alone, the AMM on again for the second scale.
    image_generator.main([*args, "--compare-amm", "--cfg-scale", "1", "4", "--output-dir", str(tmp_path / "scales")])
    for tag, alone in (("amm1.3", with_amm), ("noamm", without_amm)):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "scales" / base.format(tag))), alone)
        unguided = np.asarray(Image.open(tmp_path / "scales" / base.format(tag).replace("-cfg-4.0-", "-cfg-1.0-")))
        assert not np.array_equal(unguided, alone)
    assert len(os.listdir(tmp_path / "scales")) == 2 * 3 + 1  # three grids per scale, and the log

    image_generator.main([*args, "--no-amm", "--compile", "--output-dir", str(tmp_path / "plain")])
    compiled = np.asarray(Image.open(tmp_path / "plain" / base.format("noamm"))).astype(int)
    assert np.abs(compiled - without_amm).max() <= 1  # compiled kernels round differently in the last bits

    image_generator.main([*args, "--no-amm", "--mixed-precision", "bf16", "--output-dir", str(tmp_path / "bf16")])
    bf16 = np.asarray(Image.open(tmp_path / "bf16" / base.format("noamm").replace(".png", "-amp-bf16.png")))
    assert 0 < np.abs(bf16.astype(int) - without_amm).mean() < 1.0

    image_generator.main([*args, "--no-amm", "--zoom", "3", "--output-dir", str(tmp_path / "zoomed")])
    zoomed = np.asarray(Image.open(tmp_path / "zoomed" / base.format("noamm")))
    assert zoomed.shape == (3 * without_amm.shape[0], 3 * without_amm.shape[1], 3)
    assert np.array_equal(zoomed[::3, ::3], without_amm) and np.array_equal(zoomed[2::3, 1::3], without_amm)


#################################################################################
#                                  Bad input                                    #
#################################################################################

@pytest.mark.parametrize("ckpt, extra, message", [
    ("missing.pt", [], "checkpoint not found"),
    ("released", [], "does not record its model"),
    ("released", ["--model", "EDT-S/2", "--num-classes", str(NUM_CLASSES)], "does not fit EDT-S/2"),
    ("ckpt", ["--model", "EDT-B/2"], "holds EDT (its model_config), not --model EDT-B/2"),
    ("ckpt", ["--vae-path", "no-such-vae"], "no VAE at"),
    ("ckpt", ["--image-size", "32"], "takes inputs of shape (4, 8, 8)"),
    ("ckpt", ["--amm-blocks", "9"], "out of range"),
    ("ckpt", ["--class-balanced", "--num-images", "15"], "divisible by 10 classes"),
    ("ckpt", ["--cuda-graphs"], "--cuda-graphs needs a GPU"),
    ("ckpt", ["--cfg-scale", "2", "0.5"], "--cfg-scale must be at least 1"),
    ("ckpt", ["--cfg-scale", "2", "1", "2"], "lists a scale twice: 2 1 2"),
])
def test_bad_input_fails_with_one_clear_error_before_any_work(files, tmp_path, ckpt, extra, message):
    argv = ddp_args(files, tmp_path / "out", *extra, ckpt=files.get(ckpt, str(tmp_path / ckpt)))
    with pytest.raises(SystemExit) as exit_info:
        image_generator_ddp.main(argv)  # argparse takes the last of a repeated option
    error = str(exit_info.value.code)
    assert error.startswith("error: ") and message in error and "\n" not in error
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_triton_attention_without_a_gpu_or_its_interpreter_fails_with_one_line(files, tmp_path, monkeypatch):
    monkeypatch.setattr(models.attention_kernels, "triton_interpreted", lambda: False)
    grid_args = ["--ckpt", files["ckpt"], "--vae-path", files["vae"], "--output-dir", str(tmp_path / "out")]
    for main, argv in ((image_generator_ddp.main, ddp_args(files, tmp_path / "out")), (image_generator.main, grid_args)):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--attention-kernel", "triton"])
        assert str(exit_info.value.code).startswith("error: --attention-kernel triton: the Triton attention runs on a GPU")
    assert not os.path.exists(tmp_path / "out")


def test_grid_script_rejects_bad_classes_and_comparison_without_amm(files, tmp_path):
    args = ["--ckpt", files["ckpt"], "--vae-path", files["vae"], "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="unknown class .10.: the model has classes 0 .. 9"):
        image_generator.main([*args, "--class-labels", "3", "10"])
    with pytest.raises(SystemExit, match="--compare-amm needs AMM blocks"):
        image_generator.main([*args, "--class-labels", "3", "--compare-amm", "--no-amm"])
    assert not os.path.exists(tmp_path / "out")
