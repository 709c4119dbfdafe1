"""512x512 end to end on CPU: extraction with a tiny VAE that downsamples by 8 as the real one
(latents 64x64), masked training of a tiny EDT at patch 2 (token grid 32, as EDT-*/2 at 512),
and sampling into an npz of 512x512 images with the release's 512 AMM function by default."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import extract_features
import image_generator_ddp
import train_mask_adan
from latents.shards import read_manifest
from models.attention import attention_modulation_matrix
from runtime.checkpoint import read_checkpoint
from sampling.images import npz_name
from sampling.loading import load_sampling_model
from tiny_vae import save_tiny_vae

IMAGE_SIZE = 512
LATENT_SIZE = IMAGE_SIZE // 8
NUM_IMAGES = 4
AMM_BLOCK = "4"  # the last stage's block, on the 32x32 token grid
TINY_EDT = ["--model", "EDT", "--dims", *["32"] * 5, "--num-heads", *["2"] * 5, "--depths", *["1"] * 5,
            "--patch-size", "2", "--amm-blocks", AMM_BLOCK]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_images(root):
    """NUM_IMAGES images of two classes, larger than 512 and not square (the center crop acts)."""
    rng = np.random.default_rng(0)
    for index in range(NUM_IMAGES):
        folder = root / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(IMAGE_SIZE + 40, IMAGE_SIZE + 90, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")


def test_extract_train_and_sample_at_512(tmp_path):
    vae = save_tiny_vae(str(tmp_path / "sd-vae-ft-ema"), downsampling=8)
    write_images(tmp_path / "images")
    features = tmp_path / "features"
    extract_features.main(["--data-path", str(tmp_path / "images"), "--features-path", str(features),
                           "--image-size", str(IMAGE_SIZE), "--vae", "ema", "--vae-path", vae,
                           "--batch-size", "2", "--num-workers", "0"])
    manifest = read_manifest(features)
    assert manifest["image_size"] == IMAGE_SIZE and manifest["latent_shape"] == [4, LATENT_SIZE, LATENT_SIZE]

    results = tmp_path / "results"
    state = train_mask_adan.main(["--feature-path", str(features), "--results-dir", str(results), *TINY_EDT,
                                  "--image-size", str(IMAGE_SIZE), "--global-batch-size", "4",
                                  "--max-steps", "2", "--ckpt-every", "2", "--num-workers", "0"])
    assert state.step == 2 and state.model.pos_embed.shape[1] == (LATENT_SIZE // 2) ** 2
    (experiment,) = os.listdir(results)
    ckpt = str(results / experiment / "checkpoints" / "0000002.pt")
    assert read_checkpoint(ckpt)["image_size"] == IMAGE_SIZE

    loaded = load_sampling_model(ckpt, vae_path=vae)
    assert loaded.latent_shape == (4, LATENT_SIZE, LATENT_SIZE)
    assert loaded.model.amm_blocks == [int(AMM_BLOCK)] and loaded.model.amm_variant == "512"
    torch.testing.assert_close(loaded.model.blocks[int(AMM_BLOCK)].attn.amm, attention_modulation_matrix(32, "512"))

    sampling = ["--ckpt", ckpt, "--vae-path", vae, "--image-size", str(IMAGE_SIZE), "--num-images", "2",
                "--num-sampling-steps", "2", "--per-proc-batch-size", "2"]
    image_generator_ddp.main([*sampling, "--output-dir", str(tmp_path / "samples")])
    folder = f"EDT-0000002-size-{IMAGE_SIZE}-vae-ema-cfg-1.0-ddpm2-amm{AMM_BLOCK}-v512-seed-0"
    with np.load(tmp_path / "samples" / folder / npz_name(2, IMAGE_SIZE, IMAGE_SIZE)) as npz:
        assert npz["arr_0"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and npz["arr_0"].dtype == np.uint8
    # The 256 function is a choice at 512, sampled into a folder of its own.
    image_generator_ddp.main([*sampling, "--num-images", "1", "--amm-variant", "256",
                              "--output-dir", str(tmp_path / "samples")])
    assert sorted(os.listdir(tmp_path / "samples")) == sorted([folder, folder.replace("-v512", "")])
