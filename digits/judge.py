"""Judges digit samples with a classifier trained on real digits: the fraction classified as
their conditioning label, and a Frechet distance in the classifier's hidden feature space."""
import numpy as np
from sklearn.neural_network import MLPClassifier

from evaluations.metrics import feature_statistics, statistics_distance

HIDDEN_UNITS = 64


def to_features_input(images):
    """uint8 images (N, 8, 8) or (N, 8, 8, 3) -> float (N, 64) in [0, 1]."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 4:
        images = images.mean(axis=-1)  # samples are saved as RGB
    return images.reshape(len(images), -1) / 255.0


class DigitJudge:
    """A one-hidden-layer MLP: its predictions judge class fidelity, its ReLU hidden layer is
    the feature space of the Frechet distance (as Inception's pool layer is for FID)."""

    def __init__(self, train_images, train_labels, seed=0):
        self.classifier = MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), max_iter=1000, random_state=seed)
        self.classifier.fit(to_features_input(train_images), train_labels)

    def accuracy(self, images, labels):
        return float(np.mean(self.classifier.predict(to_features_input(images)) == np.asarray(labels)))

    def features(self, images):
        hidden = to_features_input(images) @ self.classifier.coefs_[0] + self.classifier.intercepts_[0]
        return np.maximum(hidden, 0)  # (N, HIDDEN_UNITS)

    def frechet_distance(self, images_a, images_b):
        return statistics_distance(feature_statistics(self.features(images_a)),
                                   feature_statistics(self.features(images_b)))
