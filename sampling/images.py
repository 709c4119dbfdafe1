"""Sampled latents to images: VAE decoding, uint8 conversion, per-image PNGs (the resumable
record of a sampling run), grids, and the evaluator's npz assembled from the PNGs."""
import os
import zipfile

import numpy as np
import torch
from PIL import Image

from runtime.io import atomic_path

PNG_NAME_DIGITS = 6
IMAGES_KEY = "arr_0"  # what ADM's evaluator reads
LABELS_KEY = "arr_1"
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same samples give the same npz bytes
GRID_PADDING = 2
GRID_BACKGROUND = 255


#################################################################################
#                              Latents to pixels                                #
#################################################################################

def to_uint8(images):
    """(B, 3, H, W) floats in about [-1, 1] -> uint8 numpy (B, H, W, 3)."""
    pixels = torch.clamp(127.5 * images + 128, 0, 255).permute(0, 2, 3, 1)
    return pixels.to("cpu", dtype=torch.uint8).numpy()


def decode_to_uint8(vae, samples):
    """The model's latents (B, C, h, w) -> uint8 (B, H, W, 3) through a runtime.vae.LatentVAE,
    which undoes the latents' normalisation; vae None: the samples are pixels already."""
    with torch.no_grad():
        images = samples if vae is None else vae.decode(samples)
    return to_uint8(images)


#################################################################################
#                            PNGs: the run's record                             #
#################################################################################

def png_path(folder, index):
    return os.path.join(folder, f"{index:0{PNG_NAME_DIGITS}d}.png")


def save_pngs(folder, indices, images):
    """Writes images (B, H, W, 3) uint8 as `{index:06d}.png`, each atomically."""
    for index, image in zip(indices, images):
        save_png(png_path(folder, index), image)


def missing_indices(folder, num_images):
    """Indices in range(num_images) whose PNG is not in `folder` yet."""
    present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    return [index for index in range(num_images)
            if os.path.basename(png_path(folder, index)) not in present]


def read_png(folder, index):
    return np.asarray(Image.open(png_path(folder, index)).convert("RGB"))


#################################################################################
#                                The npz file                                   #
#################################################################################

def npz_name(num_images, height, width):
    """The name ADM's evaluator scripts expect."""
    return f"samples_{num_images}x{height}x{width}x3.npz"


def _write_member(archive, key, header, chunks):
    """Streams one array into the zip as `key.npy`: the .npy header, then its raw bytes."""
    info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE_TIME)
    with archive.open(info, "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in chunks:
            member.write(np.ascontiguousarray(chunk).tobytes())


def write_npz_from_pngs(path, folder, labels):
    """Writes `arr_0` uint8 (N, H, W, 3) from the PNGs 0..N-1 of `folder` and `arr_1` (N,)
    the labels, as an uncompressed npz like numpy.savez, atomically. Images are streamed one
    at a time, so 50,000 of them are never in memory together. Returns the images' shape."""
    labels = np.asarray(labels, dtype=np.int64)
    height, width, channels = read_png(folder, 0).shape
    shape = (len(labels), height, width, channels)
    images = (read_png(folder, index) for index in range(len(labels)))
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        image_header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                        "fortran_order": False, "shape": shape}
        _write_member(archive, IMAGES_KEY, image_header, (check_shape(image, shape[1:]) for image in images))
        _write_member(archive, LABELS_KEY, np.lib.format.header_data_from_array_1_0(labels), [labels])
    return shape


def check_shape(image, shape):
    if image.shape != shape:
        raise ValueError(f"sample PNGs differ in size: {image.shape} != {shape}")
    return image


#################################################################################
#                                    Grids                                      #
#################################################################################

def make_grid(images, rows, columns, padding=GRID_PADDING):
    """uint8 (rows * columns, H, W, 3), row-major -> one uint8 (rows*(H+p)+p, columns*(W+p)+p, 3)."""
    _, height, width, channels = images.shape
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding,
                    channels), GRID_BACKGROUND, dtype=np.uint8)
    for position, image in enumerate(images):
        row, column = divmod(position, columns)
        top = padding + row * (height + padding)
        left = padding + column * (width + padding)
        grid[top:top + height, left:left + width] = image
    return grid


def side_by_side(left, right, gap=4 * GRID_PADDING):
    """Two equally tall images with a blank gap between them."""
    spacer = np.full((left.shape[0], gap, left.shape[2]), GRID_BACKGROUND, dtype=np.uint8)
    return np.concatenate([left, spacer, right], axis=1)


def enlarge(image, factor):
    """Nearest-neighbour enlargement of a uint8 (H, W, 3) image by an integer factor, so tiny
    samples (8x8 digits) stay crisp in a viewer."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def save_png(path, image):
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
