"""ADM's Inception graph run by TensorFlow (tf.compat.v1), as ADM's evaluator runs it.

The graph's `ExpandDims:0` is replaced by a batch placeholder of float32 images in [0, 255].
TensorFlow is imported when a graph is loaded, i.e. only for `--backend tensorflow`.
"""
import os

import numpy as np

from evaluations.inception import (INPUT_NODE, LOGITS_MATMUL_NODE, POOL_DIM, POOL_NODE, SPATIAL_CHANNELS,
                                   SPATIAL_DIM, SPATIAL_NODE, WARMUP_SHAPE)


def _import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter off the report
    import tensorflow as tf
    return tf.compat.v1


class TensorFlowInception:
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
                    input_map={f"{INPUT_NODE}:0": self._images},
                    return_elements=[f"{POOL_NODE}:0", f"{SPATIAL_NODE}:0", LOGITS_MATMUL_NODE],
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
