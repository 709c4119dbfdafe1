"""Image preprocessing shared by feature extraction and reference-batch building."""
import numpy as np
from PIL import Image


def center_crop_arr(pil_image, image_size):
    """ADM's center crop: halve with BOX while the short side is at least twice the target,
    then resize with BICUBIC so the short side equals `image_size`, then crop the center.

    Returns an RGB PIL image of size (image_size, image_size).
    """
    image = pil_image.convert("RGB")
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return Image.fromarray(array[top:top + image_size, left:left + image_size])
