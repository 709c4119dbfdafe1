"""Image batches in npz files, as ADM's suite reads them: uint8 NHWC RGB images in `arr_0`,
optionally with precomputed Inception statistics `mu, sigma` (pool_3) and `mu_s, sigma_s`
(spatial). Images are streamed batch by batch from the zip member, compressed or not, so
50,000 images are never in memory at once; reference batches are written the same way.
"""
import contextlib
import zipfile

import numpy as np

from evaluations.metrics import FeatureStatistics

IMAGES_KEY = "arr_0"
POOL_KEYS = ("mu", "sigma")
SPATIAL_KEYS = ("mu_s", "sigma_s")
STATISTICS_KEYS = POOL_KEYS + SPATIAL_KEYS
IMAGE_DTYPE = np.dtype(np.uint8)
RGB_CHANNELS = 3


class NpzFormatError(ValueError):
    """An npz file that is not a batch of images in ADM's format."""


def _member_name(key):
    return f"{key}.npy"


@contextlib.contextmanager
def _open_member(path, key):
    """Yields the readable zip member `key.npy` of the npz file at `path`."""
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise NpzFormatError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, IsADirectoryError):
        raise NpzFormatError(f"{path}: not an npz file") from None
    with archive:
        names = archive.namelist()
        if _member_name(key) not in names:
            keys = sorted(name[:-len(".npy")] for name in names if name.endswith(".npy"))
            raise NpzFormatError(f"{path}: no array '{key}' (arrays: {', '.join(keys) or 'none'})")
        with archive.open(_member_name(key)) as member:
            yield member


def _read_image_header(member, path):
    """Reads the .npy header of `arr_0` and returns its shape (N, H, W, 3)."""
    try:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(member)
    except ValueError as error:
        raise NpzFormatError(f"{path}: '{IMAGES_KEY}' is not a readable array ({error})") from None
    if dtype != IMAGE_DTYPE or len(shape) != 4 or shape[3] != RGB_CHANNELS or fortran_order:
        raise NpzFormatError(f"{path}: '{IMAGES_KEY}' must hold uint8 RGB images of shape (N, H, W, 3) "
                             f"in C order, got {dtype} {shape}" + (" in Fortran order" if fortran_order else ""))
    return tuple(shape)


class ImageBatchFile:
    """The images of one npz file, checked on opening, read in batches on demand."""

    def __init__(self, path, min_images=1):
        self.path = path
        with _open_member(path, IMAGES_KEY) as member:
            self.shape = _read_image_header(member, path)
        if self.num_images < min_images:
            raise NpzFormatError(f"{path}: needs at least {min_images} images, got {self.num_images}")

    @property
    def num_images(self):
        return self.shape[0]

    def batches(self, batch_size, start=0, stop=None):
        """Yields uint8 arrays (B, H, W, 3) of images start .. stop - 1 (default: all) in file order."""
        stop = self.num_images if stop is None else stop
        image_bytes = int(np.prod(self.shape[1:]))
        with _open_member(self.path, IMAGES_KEY) as member:
            _read_image_header(member, self.path)
            member.seek(start * image_bytes, 1)  # a compressed member is inflated up to there
            for start in range(start, stop, batch_size):
                count = min(batch_size, stop - start)
                data = member.read(count * image_bytes)
                if len(data) != count * image_bytes:
                    raise NpzFormatError(f"{self.path}: '{IMAGES_KEY}' is truncated after {start} images")
                yield np.frombuffer(data, dtype=IMAGE_DTYPE).reshape(count, *self.shape[1:])


def read_precomputed_statistics(path, pool_dim, spatial_dim):
    """(pool, spatial) FeatureStatistics stored in the npz file, or None if it stores none.
    A file with only some of mu, sigma, mu_s, sigma_s, or with wrong shapes, is an error."""
    with np.load(path) as arrays:
        present = [key for key in STATISTICS_KEYS if key in arrays.files]
        if not present:
            return None
        if len(present) != len(STATISTICS_KEYS):
            missing = [key for key in STATISTICS_KEYS if key not in present]
            raise NpzFormatError(f"{path}: has {', '.join(present)} but not {', '.join(missing)}")
        statistics = []
        for (mu_key, sigma_key), dim in ((POOL_KEYS, pool_dim), (SPATIAL_KEYS, spatial_dim)):
            mu, sigma = arrays[mu_key], arrays[sigma_key]
            if mu.shape != (dim,) or sigma.shape != (dim, dim):
                raise NpzFormatError(f"{path}: '{mu_key}' and '{sigma_key}' must have shapes ({dim},) and "
                                     f"({dim}, {dim}), got {mu.shape} and {sigma.shape}")
            statistics.append(FeatureStatistics(mu.astype(np.float64), sigma.astype(np.float64)))
    return tuple(statistics)


#################################################################################
#                               Writing npz files                               #
#################################################################################

@contextlib.contextmanager
def image_member_writer(archive, num_images, image_shape):
    """Writes `arr_0` (num_images, *image_shape) into an open zipfile.ZipFile batch by batch.

    Yields `append(batch)`; on exit, checks that exactly num_images images were appended.
    """
    shape = (num_images, *image_shape)
    header = {"descr": np.lib.format.dtype_to_descr(IMAGE_DTYPE), "fortran_order": False, "shape": shape}
    written = 0
    with archive.open(_member_name(IMAGES_KEY), "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)

        def append(batch):
            nonlocal written
            batch = np.ascontiguousarray(batch, dtype=IMAGE_DTYPE)
            if batch.shape[1:] != tuple(image_shape):
                raise ValueError(f"image batch of shape {batch.shape} does not match {image_shape}")
            member.write(batch.tobytes())
            written += len(batch)

        yield append
    if written != num_images:
        raise ValueError(f"wrote {written} images into '{IMAGES_KEY}', its header says {num_images}")


def write_statistics_members(archive, pool_statistics, spatial_statistics):
    """Writes mu, sigma, mu_s, sigma_s into an open zipfile.ZipFile."""
    arrays = dict(zip(STATISTICS_KEYS, (*pool_statistics, *spatial_statistics)))
    for key, array in arrays.items():
        with archive.open(_member_name(key), "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.asarray(array))
