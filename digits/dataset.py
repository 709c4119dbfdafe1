"""scikit-learn's digits as an ImageFolder of PNGs, with a held-out split."""
import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

DIGITS_MAX_VALUE = 16  # sklearn stores 17 grey levels, 0 (background) to 16 (ink)
NUM_DIGIT_CLASSES = 10


def digits_as_uint8(seed=0, held_out_fraction=0.2):
    """(train_images, train_labels), (held_out_images, held_out_labels): uint8 (N, 8, 8) images,
    white ink on black, split per class so both parts keep the class balance."""
    digits = load_digits()
    images = np.round(digits.images * (255 / DIGITS_MAX_VALUE)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    held_out = np.zeros(len(images), dtype=bool)
    for label in range(NUM_DIGIT_CLASSES):
        members = rng.permutation(np.flatnonzero(digits.target == label))
        held_out[members[: round(held_out_fraction * len(members))]] = True
    return (images[~held_out], digits.target[~held_out]), (images[held_out], digits.target[held_out])


def write_image_folder(images, labels, root):
    """root/<label>/<index>.png for every image; returns root."""
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(root, str(label))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image, mode="L").save(os.path.join(folder, f"{index:05d}.png"))
    return root
