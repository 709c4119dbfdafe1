"""ADM's Inception-v3 graph (`classify_image_graph_def.pb`, TensorFlow, tf.compat.v1).

Images (uint8, any size) are fed as float32 in [0, 255] straight into the graph's `ExpandDims:0`,
replaced by a batch placeholder; the graph itself resizes to 299x299 and normalises, exactly as
in ADM. Outputs: pool_3 features (N, 2048) for FID, precision and recall; the first 7 channels
of mixed_6/conv flattened (N, 17 * 17 * 7 = 2023) for sFID; and the logits' weight matrix
(2048, K) for the Inception Score. TensorFlow is imported only when a graph is loaded.
"""
import os
from typing import NamedTuple, Optional

import numpy as np
from tqdm.auto import tqdm

from evaluations.metrics import FeatureStatistics, RunningStatistics

GRAPH_FILENAME = "classify_image_graph_def.pb"
GRAPH_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
INPUT_TENSOR = "ExpandDims:0"
POOL_TENSOR = "pool_3:0"
SPATIAL_TENSOR = "mixed_6/conv:0"
LOGITS_MATMUL_OP = "softmax/logits/MatMul"

POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of mixed_6/conv's 768 channels for sFID
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
DEFAULT_BATCH_SIZE = 64  # images per graph run, as in ADM
WARMUP_SHAPE = (1, 64, 64, 3)


class InceptionGraphNotFound(FileNotFoundError):
    pass


def default_graph_locations():
    """Where the graph is looked for without --inception-graph: next to this package, then the
    working directory."""
    return [os.path.join(os.path.dirname(os.path.abspath(__file__)), GRAPH_FILENAME),
            os.path.join(os.getcwd(), GRAPH_FILENAME)]


def find_inception_graph(path=None):
    """Path of the Inception graph: `path` if given, else the first default location that exists."""
    candidates = [path] if path else default_graph_locations()
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise InceptionGraphNotFound(
        f"Inception graph not found at {' or '.join(candidates)}; it is ADM's {GRAPH_FILENAME} "
        f"from {GRAPH_URL} (it cannot be downloaded here): fetch it elsewhere and pass --inception-graph PATH"
    )


def _import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter off the report
    import tensorflow as tf
    return tf.compat.v1


#################################################################################
#                                Inception Graph                                #
#################################################################################

class InceptionGraph:
    """A tf.compat.v1 session over ADM's Inception graph, fed with image batches."""

    def __init__(self, graph_path):
        tf = _import_tensorflow()
        graph_def = tf.GraphDef()
        with open(graph_path, "rb") as file:
            try:
                graph_def.ParseFromString(file.read())
            except Exception as error:  # protobuf raises its own DecodeError
                raise ValueError(f"{graph_path}: not a TensorFlow GraphDef ({error})") from None
        self._graph = tf.Graph()
        with self._graph.as_default():
            self._images = tf.placeholder(tf.float32, shape=[None, None, None, 3])
            try:
                pool, spatial, logits_matmul = tf.import_graph_def(
                    graph_def,
                    input_map={INPUT_TENSOR: self._images},
                    return_elements=[POOL_TENSOR, SPATIAL_TENSOR, LOGITS_MATMUL_OP],
                    name="inception",
                )
            except (ValueError, KeyError) as error:
                raise ValueError(f"{graph_path}: not ADM's Inception graph ({error})") from None
            self._pool = pool                                   # (N, 1, 1, 2048)
            self._spatial = spatial[..., :SPATIAL_CHANNELS]     # (N, 17, 17, 7)
        self._session = tf.Session(graph=self._graph)
        self.logit_weights = self._session.run(logits_matmul.inputs[1])  # (2048, K)
        if self.logit_weights.shape[0] != POOL_DIM:
            raise ValueError(f"{graph_path}: logits weight matrix has shape {self.logit_weights.shape}, "
                             f"expected ({POOL_DIM}, K)")
        self.features(np.zeros(WARMUP_SHAPE, dtype=np.uint8))  # checks the feature widths before any real work

    def features(self, images):
        """uint8 images (N, H, W, 3) -> pool_3 (N, 2048) and spatial (N, 2023) float32 features."""
        pool, spatial = self._session.run([self._pool, self._spatial],
                                          {self._images: images.astype(np.float32)})
        pool, spatial = pool.reshape(len(images), -1), spatial.reshape(len(images), -1)
        if pool.shape[1] != POOL_DIM or spatial.shape[1] != SPATIAL_DIM:
            raise ValueError(f"Inception graph gave features of widths {pool.shape[1]} and {spatial.shape[1]}, "
                             f"expected {POOL_DIM} and {SPATIAL_DIM}")
        return pool, spatial

    def close(self):
        self._session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


#################################################################################
#                              Batch Activations                                #
#################################################################################

class Activations(NamedTuple):
    pool_features: Optional[np.ndarray]            # (N, 2048) float32, if kept
    pool_statistics: Optional[FeatureStatistics]    # over all N images, if accumulated
    spatial_statistics: Optional[FeatureStatistics]


def compute_activations(inception, image_batches, num_images, keep_pool_features=True,
                        accumulate_statistics=True, description="activations"):
    """Runs every batch through the graph. pool_3 features are kept whole (precision and recall
    need them all); spatial features only feed running statistics, batch by batch."""
    pool_features = np.empty((num_images, POOL_DIM), dtype=np.float32) if keep_pool_features else None
    pool_running, spatial_running = RunningStatistics(POOL_DIM), RunningStatistics(SPATIAL_DIM)
    seen = 0
    with tqdm(total=num_images, desc=description, unit="img") as progress:
        for images in image_batches:
            pool, spatial = inception.features(images)
            if keep_pool_features:
                pool_features[seen:seen + len(images)] = pool
            if accumulate_statistics:
                pool_running.update(pool)
                spatial_running.update(spatial)
            seen += len(images)
            progress.update(len(images))
    if seen != num_images:
        raise ValueError(f"expected {num_images} images, got {seen}")
    if not accumulate_statistics:
        return Activations(pool_features, None, None)
    return Activations(pool_features, pool_running.statistics(), spatial_running.statistics())
