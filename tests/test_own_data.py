"""Users' own data end to end on CPU: a 3-class 32x32 ImageFolder through a tiny 16-channel VAE
with a shift factor (extraction, training, sampling by class name, the diffusers pipeline, the
demo), the same through a 4-channel VAE with --latent-norm channel, an unconditional model,
fine-tuning a 1000-class checkpoint to the 3 classes, and a VAE refused for other weights or
other statistics."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

import extract_features
import image_generator
import image_generator_ddp
import train_mask_adan
from demo.generation import CheckpointCache, DemoInputError, Request, check_request
from latents import LatentDataset
from latents.extract import posterior_noise
from latents.shards import open_shard, read_manifest
from models import create_model
from runtime.checkpoint import read_checkpoint, save_checkpoint
from runtime.vae import VAENotFoundError, load_recorded_vae
from sampling import to_diffusers
from sampling.images import GRID_PADDING
from sampling.loading import load_sampling_model
from sampling.pipeline import EDTPipeline
from sampling.sampler import image_generators
from tiny_vae import tiny_vae_config

IMAGE_SIZE = 32
CLASSES = ("cat", "dog", "fox")  # ImageFolder order: cat 0, dog 1, fox 2
IMAGES_PER_CLASS = 4
LATENT_CHANNELS = 16
SCALING_FACTOR = 0.5
SHIFT_FACTOR = 0.2
LATENT_SIDE = IMAGE_SIZE // 2  # the tiny VAEs downsample by 2
TINY_EDT = ["--model", "EDT", "--dims", *["32"] * 5, "--num-heads", *["2"] * 5, "--depths", *["1"] * 5,
            "--patch-size", "2"]
TRAIN_OPTIONS = ["--global-batch-size", "4", "--max-steps", "2", "--ckpt-every", "2", "--log-every", "1",
                 "--num-workers", "0", "--ema-warmup"]
STEPS = ["--sampler", "ddim", "--num-sampling-steps", "2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


#################################################################################
#                                   Fixtures                                    #
#################################################################################

def write_image_folder(root):
    """Smooth colour gradients, one hue per class, so the VAE sees image-like input."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, IMAGE_SIZE)[None, :, None]
    for label, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for index in range(IMAGES_PER_CLASS):
            colour = rng.uniform(0, 255, size=3)
            pixels = (colour * ramp + (255 - colour) * ramp.transpose(1, 0, 2)) * (label + 1) / len(CLASSES)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index}.png")
    return root


def save_vae(path, seed=0, **config):
    torch.manual_seed(seed)
    AutoencoderKL(**{**tiny_vae_config(), **config}).save_pretrained(path)
    return str(path)


def extract(images, features, vae, *options):
    extract_features.main(["--data-path", str(images), "--features-path", str(features), "--image-size",
                           str(IMAGE_SIZE), "--vae-path", vae, "--shard-size", "5", "--num-workers", "0", *options])
    return str(features)


def train(features, results, *options):
    train_mask_adan.main(["--feature-path", features, "--results-dir", str(results), *TINY_EDT, *TRAIN_OPTIONS,
                          *options])
    (experiment,) = os.listdir(results)
    return str(results / experiment / "checkpoints" / "0000002.pt"), (results / experiment / "log.txt").read_text()


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """The 16-channel run: images, VAE (shift factor), features and a trained checkpoint."""
    root = tmp_path_factory.mktemp("own_data")
    images = write_image_folder(root / "images")
    vae = save_vae(root / "vae16", latent_channels=LATENT_CHANNELS, scaling_factor=SCALING_FACTOR,
                   shift_factor=SHIFT_FACTOR)
    features = extract(images, root / "features16", vae)
    ckpt, log = train(features, root / "results16")
    return {"root": root, "images": images, "vae": vae, "features": features, "ckpt": ckpt, "log": log}


def stored(features):
    manifest = read_manifest(features)
    return np.concatenate([open_shard(features, shard)[0] for shard in manifest["shards"]]).astype(np.float64)


def grid_cells(path, count):
    """The `count` images of a one-column grid PNG."""
    grid = np.asarray(Image.open(path))
    tops = [GRID_PADDING + row * (IMAGE_SIZE + GRID_PADDING) for row in range(count)]
    return np.stack([grid[top:top + IMAGE_SIZE, GRID_PADDING:GRID_PADDING + IMAGE_SIZE] for top in tops])


def one_line_error(raised, message):
    error = str(raised.value.code)
    assert error.startswith("error: ") and message in error and "\n" not in error, error


#################################################################################
#                  A 16-channel VAE with scaling and shift factors              #
#################################################################################

def test_features_are_16_channel_latents_normalised_by_the_vae_config(own):
    manifest = read_manifest(own["features"])
    assert manifest["vae"] == "vae16" and manifest["vae_path"] == os.path.abspath(own["vae"])
    assert manifest["latent_shape"] == [LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE]
    assert manifest["latent_norm"] == {"kind": "vae", "scaling_factor": SCALING_FACTOR, "shift_factor": SHIFT_FACTOR}
    assert manifest["class_to_idx"] == {name: label for label, name in enumerate(CLASSES)}
    autoencoder = AutoencoderKL.from_pretrained(own["vae"])
    with Image.open(own["images"] / "fox" / "0.png") as image:
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 127.5 - 1
    first_fox = 2 * IMAGES_PER_CLASS
    posterior = autoencoder.encode(x).latent_dist
    noise = posterior_noise(0, [first_fox], (LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE))[:1]  # the image, not its flip
    z = (posterior.mean + posterior.std * noise)[0].detach().numpy()
    np.testing.assert_allclose(stored(own["features"])[first_fox, 0], (z - SHIFT_FACTOR) * SCALING_FACTOR,
                               rtol=2e-3, atol=2e-3)


def test_checkpoint_records_the_vae_its_statistics_and_the_class_names(own):
    checkpoint = read_checkpoint(own["ckpt"])
    manifest = read_manifest(own["features"])
    assert checkpoint["model_config"]["kwargs"]["in_channels"] == LATENT_CHANNELS
    assert checkpoint["latent_norm"] == manifest["latent_norm"]
    assert checkpoint["vae_weights_sha256"] == manifest["settings"]["vae_weights_sha256"]
    assert checkpoint["class_names"] == list(CLASSES) and not checkpoint["unconditional"]
    assert "3 classes ['cat', 'dog', 'fox']" in own["log"] and "scaling_factor 0.5, shift_factor 0.2" in own["log"]


def test_sampling_undoes_the_normalisation_before_decoding(own):
    loaded = load_sampling_model(own["ckpt"])  # the VAE from where the features' VAE was
    assert loaded.latent_shape == (LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE)
    x = torch.randn(2, *loaded.latent_shape, generator=torch.Generator().manual_seed(0))
    expected = loaded.vae.autoencoder.decode(x / SCALING_FACTOR + SHIFT_FACTOR).sample
    torch.testing.assert_close(loaded.vae.decode(x), expected, rtol=0, atol=0)
    assert loaded.class_names == list(CLASSES)


def assert_grid_by_class_name_equals_the_pipeline(ckpt, folder):
    """image_generator.py by class name, and the converted pipeline by the same names, give the
    same images (both decode through the VAE with the checkpoint's normalisation)."""
    image_generator.main(["--ckpt", ckpt, "--class-labels", "fox", "cat", "--samples-per-class", "1",
                          "--cfg-scale", "2", *STEPS, "--batch-size", "2", "--output-dir", str(folder / "grid")])
    (grid,) = (folder / "grid").glob("*.png")
    assert "rows: 2 (fox), 0 (cat)" in (folder / "grid" / "log.txt").read_text()
    to_diffusers.main(["--ckpt", ckpt, "--sampler", "ddim", "--out", str(folder / "pipeline")])
    pipe = EDTPipeline.from_pretrained(folder / "pipeline")
    assert pipe.labels == {"cat": 0, "dog": 1, "fox": 2}
    assert pipe.config.latent_norm == read_checkpoint(ckpt)["latent_norm"]
    images = pipe(class_labels=pipe.get_label_ids(["fox", "cat"]), guidance_scale=2, num_inference_steps=2,
                  generator=image_generators(0, range(2)), output_type="np").images
    assert np.array_equal(images, grid_cells(grid, 2))


def test_grid_by_class_name_equals_the_pipeline_and_the_demo_lists_the_names(own, tmp_path):
    assert_grid_by_class_name_equals_the_pipeline(own["ckpt"], tmp_path)
    assert CheckpointCache().get(own["ckpt"]).class_names == list(CLASSES)


def test_a_vae_with_other_weights_or_statistics_is_refused(own, tmp_path):
    other_weights = save_vae(tmp_path / "other", seed=1, latent_channels=LATENT_CHANNELS,
                             scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR)
    other_statistics = shutil.copytree(own["vae"], tmp_path / "rescaled")
    config = json.loads((other_statistics / "config.json").read_text())
    (other_statistics / "config.json").write_text(json.dumps({**config, "shift_factor": 0.0}))
    grid = ["--ckpt", own["ckpt"], *STEPS, "--output-dir", str(tmp_path / "out")]
    for vae, message in ((other_weights, "has other weights (sha256 "),
                         (other_statistics, "normalises latents with scaling_factor 0.5, shift_factor 0, the "
                                            "model was trained with scaling_factor 0.5, shift_factor 0.2")):
        with pytest.raises(SystemExit) as raised:
            image_generator.main([*grid, "--vae-path", str(vae)])
        one_line_error(raised, message)
    with pytest.raises(VAENotFoundError, match="'vae16' the model was trained on was at .*gone, which is gone"):
        load_recorded_vae("vae16", None, str(tmp_path / "gone"), "cpu")
    with pytest.raises(SystemExit) as raised:
        image_generator.main([*grid, "--class-labels", "wolf"])
    one_line_error(raised, "unknown class 'wolf': the model has classes ['cat', 'dog', 'fox']")
    assert not (tmp_path / "out").exists()


#################################################################################
#                        --latent-norm channel, 4 channels                      #
#################################################################################

def test_channel_normalisation_is_measured_applied_in_training_and_undone_in_sampling(own, tmp_path):
    vae = save_vae(tmp_path / "vae4")
    per_channel = save_vae(tmp_path / "per-channel", latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    with pytest.raises(SystemExit) as raised:
        extract(own["images"], tmp_path / "refused", per_channel)
    one_line_error(raised, "(latents_mean / latents_std in its config): use --latent-norm channel")
    features = extract(own["images"], tmp_path / "features4", vae, "--latent-norm", "channel")
    manifest = read_manifest(features)
    raw = stored(features)  # (N, 2, 4, 16, 16): the latents are stored raw
    mean, std = raw.mean(axis=(0, 1, 3, 4)), raw.std(axis=(0, 1, 3, 4))
    assert manifest["normalised_on_read"] and manifest["latent_norm"]["kind"] == "channel"
    np.testing.assert_allclose(manifest["latent_norm"]["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(manifest["latent_norm"]["std"], std, rtol=1e-9)

    dataset = LatentDataset(features, seed=0, random_flip=False)
    latent, label = dataset[5]
    expected = (raw[5, 0] - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(latent.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert label.item() == 1 and dataset.class_names == list(CLASSES)

    ckpt, _ = train(features, tmp_path / "results")
    loaded = load_sampling_model(ckpt)
    x = torch.randn(1, *loaded.latent_shape, generator=torch.Generator().manual_seed(0))
    latent_mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    latent_std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    torch.testing.assert_close(loaded.vae.decode(x), loaded.vae.autoencoder.decode(x * latent_std + latent_mean).sample)
    assert_grid_by_class_name_equals_the_pipeline(ckpt, tmp_path)


#################################################################################
#                                 Unconditional                                 #
#################################################################################

def test_an_unconditional_model_trains_and_samples_without_labels_or_guidance(own, tmp_path):
    ckpt, log = train(own["features"], tmp_path / "results", "--unconditional")
    checkpoint = read_checkpoint(ckpt)
    assert checkpoint["unconditional"] and checkpoint["class_names"] is None and "unconditional" in log
    assert tuple(checkpoint["ema"]["y_embedder.embedding_table.weight"].shape) == (1, 32)  # no null row

    image_generator.main(["--ckpt", ckpt, *STEPS, "--output-dir", str(tmp_path / "grid")])
    (grid,) = (tmp_path / "grid").glob("*.png")
    assert "-cfg-1.0-" in grid.name and np.asarray(Image.open(grid)).shape[0] == 4 * (IMAGE_SIZE + GRID_PADDING) + GRID_PADDING
    image_generator_ddp.main(["--ckpt", ckpt, *STEPS, "--num-images", "3", "--output-dir", str(tmp_path / "samples")])
    (npz,) = (tmp_path / "samples").glob("*/samples_3x32x32x3.npz")
    assert np.load(npz)["arr_1"].tolist() == [0, 0, 0]
    assert json.loads((npz.parent / "manifest.json").read_text())["class_names"] is None
    for options, message in ((["--cfg-scale", "4"], "is unconditional (trained without labels)"),
                             (["--class-labels", "cat"], "is unconditional: it takes no --class-labels")):
        with pytest.raises(SystemExit) as raised:
            image_generator.main(["--ckpt", ckpt, *STEPS, *options, "--output-dir", str(tmp_path / "refused")])
        one_line_error(raised, message)

    to_diffusers.main(["--ckpt", ckpt, "--sampler", "ddim", "--out", str(tmp_path / "pipeline")])
    pipe = EDTPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.labels == {}
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    for kwargs in (dict(class_labels=[0]), dict(batch_size=1, guidance_scale=4)):
        with pytest.raises(ValueError, match="the model is unconditional"):
            pipe(num_inference_steps=2, **kwargs)

    demo_model = CheckpointCache().get(ckpt)
    request = Request(ckpt, "unconditional", 4.0, "ddim", 2, 0, 1, [0])
    with pytest.raises(DemoInputError, match="unconditional"):
        check_request(request, demo_model, max_images=4)


#################################################################################
#                   Fine-tuning a 1000-class checkpoint to 3 classes            #
#################################################################################

def test_a_1000_class_checkpoint_fine_tunes_to_the_three_classes(own, tmp_path):
    released = create_model("EDT", dims=(32,) * 5, num_heads=(2,) * 5, depths=(1,) * 5, patch_size=2,
                            input_size=LATENT_SIDE, in_channels=LATENT_CHANNELS, num_classes=1000)
    save_checkpoint({"ema": released.state_dict()}, tmp_path / "imagenet.pt")
    names = [f"class{index}" for index in range(1000)]
    names[281], names[277] = "cat", "fox"
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    ckpt, log = train(own["features"], tmp_path / "results", "--init-from", str(tmp_path / "imagenet.pt"),
                      "--init-class-names", str(tmp_path / "names.txt"))
    assert "class table: 2 of 3 classes kept by name (cat, fox), 1 new (dog), null row carried" in log
    table = read_checkpoint(ckpt)["model"]["y_embedder.embedding_table.weight"]
    assert table.shape == (4, 32)  # 3 classes and the null row
