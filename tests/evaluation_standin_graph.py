"""A small stand-in for ADM's Inception graph, with the tensor names the evaluator uses.

The real graph cannot be downloaded here. This one has the same interface: input `ExpandDims:0`
(1, ?, ?, 3) float32 in [0, 255], resized inside the graph; `mixed_6/conv:0` (N, 17, 17, 8);
`pool_3:0` (N, 1, 1, 2048); op `softmax/logits/MatMul` whose second input is a constant
(2048, NUM_CLASSES) with small weights, so no probability underflows. Weights come from a fixed
seed, so the graph can be rebuilt on any input to compute the same features independently.
"""
import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1

RESIZED = 34          # 2x2 stride-2 convolution of 34x34 gives mixed_6's 17x17
SPATIAL_CHANNELS = 8  # at least the 7 that sFID keeps
POOL_DIM = 2048
NUM_CLASSES = 10
LOGIT_SCALE = 0.01
SEED = 1234
SPATIAL_SIZE = RESIZED // 2
HIDDEN_SCALE = 0.05  # keeps softplus inputs of order 1


def _features(images):
    """images (N, H, W, 3) float32 in [0, 255] -> (mixed_6/conv, pool_3)."""
    rng = np.random.default_rng(SEED)
    conv_weights = rng.normal(size=(2, 2, 3, SPATIAL_CHANNELS)).astype(np.float32)
    resized = tf1.image.resize_bilinear(images, [RESIZED, RESIZED])                  # (N, 34, 34, 3)
    scaled = (resized - 128.0) / 128.0
    conv = tf.nn.conv2d(scaled, conv_weights, strides=2, padding="VALID")          # (N, 17, 17, 8)
    with tf1.name_scope("mixed_6"):  # nonlinear, so 2023 spatial features have a full-rank covariance
        conv = tf.tanh(conv, name="conv")
    flat = tf.reshape(conv, [-1, SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS])  # (N, 2312)
    hidden = (rng.normal(size=(flat.shape[1], POOL_DIM)) * HIDDEN_SCALE).astype(np.float32)
    pool = tf.reshape(tf.nn.softplus(flat @ hidden), [-1, 1, 1, POOL_DIM], name="pool_3")  # (N, 1, 1, 2048)
    return conv, pool


def logit_weights():
    return (np.random.default_rng(SEED + 1).normal(size=(POOL_DIM, NUM_CLASSES)) * LOGIT_SCALE).astype(np.float32)


def write_graph(path):
    """Serialises the stand-in graph, fed through `ExpandDims:0` like the real one."""
    graph = tf.Graph()
    with graph.as_default():
        image = tf1.placeholder(tf.float32, [None, None, 3], name="Cast")
        batch = tf.expand_dims(image, 0, name="ExpandDims")                       # (1, H, W, 3)
        _, pool = _features(batch)
        with tf1.name_scope("softmax"), tf1.name_scope("logits"):
            logits = tf.matmul(tf.reshape(pool, [-1, POOL_DIM]), tf.constant(logit_weights()))
        tf.nn.softmax(logits, name="softmax")
    with open(path, "wb") as file:
        file.write(graph.as_graph_def().SerializeToString())


class DirectFeatures:
    """The stand-in's features computed on batches directly, without the evaluator's loader."""

    def __init__(self):
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.images = tf1.placeholder(tf.float32, [None, None, None, 3])
            conv, pool = _features(self.images)
            self.pool = tf.reshape(pool, [-1, POOL_DIM])
            self.spatial = tf.reshape(conv[..., :7], [-1, SPATIAL_SIZE * SPATIAL_SIZE * 7])
        self.session = tf1.Session(graph=self.graph)

    def __call__(self, images, batch_size=64):
        pools, spatials = [], []
        for start in range(0, len(images), batch_size):
            feed = {self.images: images[start:start + batch_size].astype(np.float32)}
            pool, spatial = self.session.run([self.pool, self.spatial], feed)
            pools.append(pool)
            spatials.append(spatial)
        return np.concatenate(pools), np.concatenate(spatials)
