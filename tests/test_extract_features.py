"""Feature extraction end to end on CPU: a tiny saved AutoencoderKL, a tiny ImageFolder of odd
sizes and modes, one process against two (torchrun, gloo), resume after a kill, pixel storage,
bad inputs, and the training dataset."""
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import extract_features
from latents import LatentDataset
from runtime.seeding import item_generator
from latents.shards import MANIFEST_NAME, open_shard, read_manifest, shard_file
from runtime.checkpoint import state_dict_sha256
from runtime.distributed import split_range
from runtime.transforms import center_crop_arr
from runtime.vae import load_autoencoder
from tiny_vae import TINY_VAE_DOWNSAMPLING, save_tiny_vae

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "extract_features.py")
SD_LATENT_SCALE = 0.18215  # the tiny VAE keeps diffusers' default scaling_factor, the SD VAEs'
IMAGE_SIZE = 16
SHARD_SIZE = 4
SEED = 3
CLASSES = ("bee", "ant", "cat")  # sorted: ant=0, bee=1, cat=2
MODES = ("RGB", "L", "RGBA", "P", "CMYK")  # all occur in ImageNet
NUM_IMAGES = 14  # 4 shards of 4, 4, 4, 2
LATENT_SHAPE = (4, IMAGE_SIZE // TINY_VAE_DOWNSAMPLING, IMAGE_SIZE // TINY_VAE_DOWNSAMPLING)
KILL_TEST_IMAGES = 400  # enough shards that a kill after the first lands mid-run


#################################################################################
#                                   Fixtures                                    #
#################################################################################

def write_image(path, mode, size, rng):
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    image.save(path, format="JPEG" if mode == "CMYK" else "PNG")


def make_image_folder(root, num_images, odd=True):
    """Images spread over CLASSES; with odd=True of varying sizes (short side >= IMAGE_SIZE),
    aspect ratios and modes. Returns [(path, label)] in the expected ImageFolder order."""
    rng = np.random.default_rng(0)
    for k in range(num_images):
        mode = MODES[k % len(MODES)] if odd else "RGB"
        size = (IMAGE_SIZE + (7 * k) % 25, IMAGE_SIZE + (11 * k) % 27) if odd else (IMAGE_SIZE,) * 2
        folder = os.path.join(root, CLASSES[k % len(CLASSES)])
        os.makedirs(folder, exist_ok=True)
        write_image(os.path.join(folder, f"img{k:03d}.{'jpg' if mode == 'CMYK' else 'png'}"),
                    mode, size, rng)
    return [(os.path.join(root, name, file), label)
            for label, name in enumerate(sorted(CLASSES))
            for file in sorted(os.listdir(os.path.join(root, name)))]


def extract_args(data_path, features_path, vae_path, *extra):
    return ["--data-path", str(data_path), "--features-path", str(features_path),
            "--image-size", str(IMAGE_SIZE), "--vae", "ema", "--vae-path", str(vae_path),
            "--shard-size", str(SHARD_SIZE), "--global-seed", str(SEED), *extra]


def load_all(features_path):
    """(features (N, 2, ...), labels (N,)) in manifest order."""
    manifest = read_manifest(features_path)
    shards = [open_shard(features_path, shard) for shard in manifest["shards"]]
    return (np.concatenate([features for features, _ in shards]),
            np.concatenate([labels for _, labels in shards]))


# torchrun starts its workers with OMP_NUM_THREADS=1, and CPU convolutions round differently with other
# thread counts (a stored float16 value can move by one step); with equal thread counts the output must
# not depend on the number of processes at all.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("extraction")
    return {"root": root, "vae": save_tiny_vae(str(root / "vae")),
            "images": root / "images", "samples": make_image_folder(root / "images", NUM_IMAGES)}


@pytest.fixture(scope="module")
def one_process(workspace):
    """A clean single-process run, in this process; batches of 3 straddle the shards of 4."""
    features = workspace["root"] / "one_process"
    extract_features.main(extract_args(workspace["images"], features, workspace["vae"],
                                       "--batch-size", "3", "--num-workers", "0"))
    return features


#################################################################################
#                                     Tests                                     #
#################################################################################

@pytest.mark.parametrize("total,world_size", [(0, 2), (3, 4), (10, 3), (16, 4)])
def test_split_range_covers_every_index_once(total, world_size):
    parts = [split_range(total, rank, world_size) for rank in range(world_size)]
    assert [i for part in parts for i in part] == list(range(total))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_manifest_describes_every_image_once(workspace, one_process):
    manifest = read_manifest(one_process)
    assert manifest["count"] == NUM_IMAGES
    assert manifest["image_size"] == IMAGE_SIZE
    assert manifest["latent_shape"] == list(LATENT_SHAPE)
    assert manifest["vae"] == "ema" and manifest["downsampling"] == TINY_VAE_DOWNSAMPLING
    assert manifest["latent_norm"] == {"kind": "vae", "scaling_factor": SD_LATENT_SCALE, "shift_factor": None}
    assert not manifest["normalised_on_read"]
    assert manifest["class_to_idx"] == {"ant": 0, "bee": 1, "cat": 2}
    assert [(s["start"], s["stop"], s["count"]) for s in manifest["shards"]] == \
        [(0, 4, 4), (4, 8, 4), (8, 12, 4), (12, 14, 2)]
    assert manifest["skipped"] == []
    features, labels = load_all(one_process)
    assert features.shape == (NUM_IMAGES, 2, *LATENT_SHAPE) and features.dtype == np.float16
    assert labels.dtype == np.int64
    assert labels.tolist() == [label for _, label in workspace["samples"]]


def test_latents_are_seeded_posterior_samples_of_image_and_flip(workspace, one_process):
    vae = load_autoencoder("ema", workspace["vae"])
    features, _ = load_all(one_process)
    for index in (0, 5, NUM_IMAGES - 1):
        with Image.open(workspace["samples"][index][0]) as image:
            pixels = torch.from_numpy(np.array(center_crop_arr(image, IMAGE_SIZE)))
        x = pixels.permute(2, 0, 1).float()[None] / 127.5 - 1  # (1, 3, S, S)
        posterior = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
        noise = torch.randn((2, *LATENT_SHAPE), generator=item_generator(SEED, index))
        expected = ((posterior.mean + posterior.std * noise) * SD_LATENT_SCALE).detach().numpy()
        np.testing.assert_allclose(features[index].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_two_processes_store_the_same_as_one(workspace, one_process):
    features = workspace["root"] / "two_processes"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               SCRIPT, *extract_args(workspace["images"], features, workspace["vae"],
                                     "--batch-size", "2", "--num-workers", "1")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "to compute on 2 processes" in result.stdout
    assert read_manifest(features)["count"] == NUM_IMAGES
    reference_features, reference_labels = load_all(one_process)
    two_features, two_labels = load_all(features)
    np.testing.assert_array_equal(two_labels, reference_labels)
    np.testing.assert_allclose(two_features.astype(np.float32),
                               reference_features.astype(np.float32), rtol=0, atol=1e-5)


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["crash", "preemption"])
def test_killed_run_resumes_to_the_clean_result(workspace, tmp_path, stop_signal):
    images = tmp_path / "images"
    make_image_folder(images, KILL_TEST_IMAGES, odd=False)
    args = extract_args(images, tmp_path / "killed", workspace["vae"],
                        "--batch-size", "1", "--num-workers", "0")
    first_record = tmp_path / "killed" / shard_file(0, "record")
    process = subprocess.Popen([sys.executable, SCRIPT, *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not first_record.exists() and process.poll() is None:
        time.sleep(0.001)
    process.send_signal(stop_signal)
    process.wait()
    assert not (tmp_path / "killed" / MANIFEST_NAME).exists(), "the run finished before the kill"
    kept = {name: os.stat(tmp_path / "killed" / name).st_mtime_ns
            for name in os.listdir(tmp_path / "killed") if name.startswith("shard-")}
    assert shard_file(0, "latents") in kept

    extract_features.main(args)
    for name, mtime in kept.items():
        assert os.stat(tmp_path / "killed" / name).st_mtime_ns == mtime, f"{name} was rewritten"
    extract_features.main(extract_args(images, tmp_path / "clean", workspace["vae"],
                                       "--batch-size", "7", "--num-workers", "0"))
    resumed_features, resumed_labels = load_all(tmp_path / "killed")
    clean_features, clean_labels = load_all(tmp_path / "clean")
    assert len(resumed_labels) == KILL_TEST_IMAGES
    np.testing.assert_array_equal(resumed_labels, clean_labels)
    np.testing.assert_allclose(resumed_features.astype(np.float32),
                               clean_features.astype(np.float32), rtol=0, atol=1e-5)


def test_vae_none_round_trips_pixels(workspace, tmp_path):
    extract_features.main(["--data-path", str(workspace["images"]),
                           "--features-path", str(tmp_path), "--image-size", str(IMAGE_SIZE),
                           "--vae", "none", "--shard-size", str(SHARD_SIZE), "--num-workers", "0"])
    manifest = read_manifest(tmp_path)
    assert manifest["latent_shape"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert manifest["latent_norm"] is None and manifest["vae"] == "none"
    features, _ = load_all(tmp_path)
    assert features.min() >= -1 and features.max() <= 1
    restored = np.round((features.astype(np.float32) + 1) * 127.5).astype(np.uint8)
    for index, (path, _) in enumerate(workspace["samples"]):
        with Image.open(path) as image:
            expected = np.asarray(center_crop_arr(image, IMAGE_SIZE)).transpose(2, 0, 1)
        np.testing.assert_array_equal(restored[index, 0], expected)
        np.testing.assert_array_equal(restored[index, 1], expected[:, :, ::-1])


def test_bad_image_stops_or_is_skipped(workspace, one_process, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(workspace["images"], images)
    bad_index, truncated_index = 5, 9
    bad_path, truncated_path = (
        images / os.path.relpath(workspace["samples"][index][0], workspace["images"])
        for index in (bad_index, truncated_index))
    bad_path.write_bytes(b"not an image at all")
    truncated_path.write_bytes(truncated_path.read_bytes()[:100])

    with pytest.raises(SystemExit, match=f"error: cannot read image {bad_path}"):
        extract_features.main(extract_args(images, tmp_path / "stopped", workspace["vae"],
                                           "--num-workers", "0"))
    assert not (tmp_path / "stopped" / MANIFEST_NAME).exists()

    extract_features.main(extract_args(images, tmp_path / "skipped", workspace["vae"],
                                       "--num-workers", "0", "--skip-bad-images"))
    manifest = read_manifest(tmp_path / "skipped")
    assert manifest["count"] == NUM_IMAGES - 2
    assert [(entry["index"], entry["path"]) for entry in manifest["skipped"]] == \
        [(bad_index, os.path.relpath(bad_path, images)),
         (truncated_index, os.path.relpath(truncated_path, images))]
    # The noise is seeded per image index, so the other images keep their latents.
    features, labels = load_all(tmp_path / "skipped")
    reference_features, reference_labels = load_all(one_process)
    kept = [i for i in range(NUM_IMAGES) if i not in (bad_index, truncated_index)]
    np.testing.assert_array_equal(labels, reference_labels[kept])
    np.testing.assert_allclose(features.astype(np.float32),
                               reference_features[kept].astype(np.float32), rtol=0, atol=1e-5)


def test_missing_vae_and_changed_settings_are_refused(workspace, one_process, tmp_path):
    missing = tmp_path / "sd-vae-ft-ema"
    with pytest.raises(SystemExit, match="huggingface-cli download stabilityai/sd-vae-ft-ema"):
        extract_features.main(extract_args(workspace["images"], tmp_path / "out", missing))
    assert not (tmp_path / "out").exists()

    manifest_before = (one_process / MANIFEST_NAME).read_text()
    with pytest.raises(SystemExit, match="other settings.*seed"):
        extract_features.main(extract_args(workspace["images"], one_process, workspace["vae"],
                                           "--global-seed", str(SEED + 1)))
    assert (one_process / MANIFEST_NAME).read_text() == manifest_before


def test_resume_refuses_shards_of_other_vae_weights(workspace, one_process, tmp_path):
    """Two VAE folders of the same name (sd-vae-ft-ema), other weights: one clear error."""
    vae = load_autoencoder("ema", workspace["vae"])
    assert read_manifest(one_process)["settings"]["vae_weights_sha256"] == state_dict_sha256(vae.state_dict())
    other_vae = save_tiny_vae(str(tmp_path / "other" / "sd-vae-ft-ema"), seed=1)
    before = {name: os.stat(one_process / name).st_mtime_ns for name in os.listdir(one_process)}
    with pytest.raises(SystemExit) as raised:
        extract_features.main(extract_args(workspace["images"], one_process, other_vae))
    error = str(raised.value)
    assert error.startswith("error: ") and "other settings (vae_weights_sha256: " in error and "\n" not in error
    assert {name: os.stat(one_process / name).st_mtime_ns for name in os.listdir(one_process)} == before


def test_dataset_shapes_dtypes_and_flips(one_process):
    features, labels = load_all(one_process)
    dataset = LatentDataset(one_process, seed=0)
    assert len(dataset) == NUM_IMAGES
    assert dataset.latent_shape == LATENT_SHAPE and dataset.num_classes == len(CLASSES)
    assert dataset.image_size == IMAGE_SIZE and dataset.vae == "ema"

    seen_flips = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        for index in range(NUM_IMAGES):
            latent, label = dataset[index]
            assert latent.shape == LATENT_SHAPE and latent.dtype == torch.float32
            assert label.dtype == torch.int64 and label.item() == labels[index]
            matches = [flip for flip in (0, 1)
                       if np.array_equal(latent.numpy(), features[index, flip].astype(np.float32))]
            assert len(matches) == 1
            seen_flips.add((index, matches[0]))
    assert seen_flips == {(index, flip) for index in range(NUM_IMAGES) for flip in (0, 1)}

    again = LatentDataset(one_process, seed=0)
    again.set_epoch(7)
    assert all(torch.equal(again[i][0], dataset[i][0]) for i in range(NUM_IMAGES))
    copy = pickle.loads(pickle.dumps(again))  # what a spawned DataLoader worker receives
    assert again.features is not None and copy.features is None  # maps, never copies, shards
    assert all(torch.equal(copy[i][0], again[i][0]) for i in range(NUM_IMAGES))
    unflipped = LatentDataset(one_process, random_flip=False)
    assert all(np.array_equal(unflipped[i][0].numpy(), features[i, 0].astype(np.float32))
               for i in range(NUM_IMAGES))
