"""A stand-in for ADM's Inception graph (`classify_image_graph_def.pb`, inception-2015-12-05),
written with TensorFlow's protobufs and run by TensorFlow.

The real graph cannot be downloaded here. This one has its topology, node names and op types:
DecodeJpeg, Cast, ExpandDims (the evaluators' input), ResizeBilinear to 299x299, Sub 128,
Mul 1/128; convolutions as Conv2D, BatchNormWithGlobalNormalization, CheckNumerics, an Identity
with a control input and Relu (`conv`, ..., `mixed_6/conv`, ...); max and average pools; the
eleven mixed blocks joined by Concat; pool_3 (8x8 average); pool_3/_reshape and the softmax layer
(`softmax/logits/MatMul` over 1008 classes). Names follow public listings of the real graph's
nodes; the concatenations inside the towers of mixed_9 and mixed_10, which those listings do not
show, are named by analogy (`mixed_9/tower/mixed/join`). Its GraphDef declares no producer
version, so TensorFlow still runs the deprecated batch norm op, as it runs the real graph.

Weights are seeded random, each node's from its own name. Convolution widths are divided by
`width_divisor` (1 gives the real graph's shapes, for speed measurements), except the six
convolutions that form the last block's output, so pool_3 keeps its 2048 features. The stem's
batch norms scale by gamma after normalising (`scale_after_normalization`) and the mixed blocks'
do not, so that both readings of the attribute are exercised.
"""
import functools
import zlib

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1

WIDTH_DIVISOR = 8
IMAGE_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SEED = 1234
VARIANCE_EPSILON = 0.001
LOGIT_SPREAD = 2.0  # standard deviation of a logit between images
CALIBRATION_IMAGES = 16
BATCH_NORM_SPREAD = 0.1


#################################################################################
#                                GraphDef nodes                                 #
#################################################################################

def attr_value(value):
    """A Python value as a NodeDef attribute."""
    if isinstance(value, tf.DType):
        return tf1.AttrValue(type=value.as_datatype_enum)
    if isinstance(value, bool):
        return tf1.AttrValue(b=value)
    if isinstance(value, int):
        return tf1.AttrValue(i=value)
    if isinstance(value, float):
        return tf1.AttrValue(f=value)
    if isinstance(value, str):
        return tf1.AttrValue(s=value.encode())
    return tf1.AttrValue(list=tf1.AttrValue.ListValue(i=list(value)))


def node_rng(name):
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


class GraphBuilder:
    """Appends nodes to a GraphDef and tracks the channel count of every activation."""

    def __init__(self, width_divisor):
        self.graph_def = tf1.GraphDef()
        self.width_divisor = width_divisor
        self.channels = {}

    def node(self, name, op, inputs=(), **attrs):
        node = self.graph_def.node.add(name=name, op=op, input=list(inputs))
        for key, value in attrs.items():
            node.attr[key].CopyFrom(attr_value(value))
        return name

    def const(self, name, value):
        tensor = tf1.make_tensor_proto(value)
        node = self.graph_def.node.add(name=name, op="Const")
        node.attr["value"].tensor.CopyFrom(tensor)
        node.attr["dtype"].type = tensor.dtype
        return name

    def width(self, channels, full=False):
        return channels if full else max(channels // self.width_divisor, 1)

    def conv(self, scope, x, channels, kernel, stride=1, padding="SAME", full=False, scale_after=False):
        """Conv2D, batch norm, a numerics check and Relu, as the real graph writes them."""
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        channels_in, channels_out = self.channels[x], self.width(channels, full)
        rng = node_rng(scope)
        fan_in = kernel[0] * kernel[1] * channels_in
        weights = rng.normal(size=(*kernel, channels_in, channels_out)) * np.sqrt(2 / fan_in)  # (kh, kw, in, out)
        conv = self.node(f"{scope}/Conv2D", "Conv2D", [x, self.const(f"{scope}/conv2d_params", weights.astype(np.float32))],
                         T=tf.float32, strides=[1, stride, stride, 1], padding=padding, data_format="NHWC",
                         use_cudnn_on_gpu=True)
        statistics = {
            "beta": rng.normal(size=channels_out) * BATCH_NORM_SPREAD,
            "gamma": rng.uniform(0.5, 1.5, size=channels_out),
            "moving_mean": rng.normal(size=channels_out) * BATCH_NORM_SPREAD,
            "moving_variance": rng.uniform(0.5, 1.5, size=channels_out),
        }
        names = {key: self.const(f"{scope}/batchnorm/{key}", value.astype(np.float32)) for key, value in statistics.items()}
        norm = self.node(f"{scope}/batchnorm", "BatchNormWithGlobalNormalization",
                         [conv, names["moving_mean"], names["moving_variance"], names["beta"], names["gamma"]],
                         T=tf.float32, variance_epsilon=VARIANCE_EPSILON, scale_after_normalization=scale_after)
        checked = self.checked(scope, norm)
        self.channels[scope] = channels_out
        return self.node(scope, "Relu", [checked], T=tf.float32)

    def checked(self, scope, x):
        check = self.node(f"{scope}/CheckNumerics", "CheckNumerics", [x], T=tf.float32, message=scope)
        return self.node(f"{scope}/control_dependency", "Identity", [x, f"^{check}"], T=tf.float32)

    def pool(self, scope, x, op, size, stride, padding):
        self.channels[scope] = self.channels[x]
        return self.node(scope, op, [self.checked(scope, x)], T=tf.float32, ksize=[1, size, size, 1],
                         strides=[1, stride, stride, 1], padding=padding, data_format="NHWC")

    def join(self, scope, inputs):
        self.channels[f"{scope}/join"] = sum(self.channels[x] for x in inputs)
        axis = self.const(f"{scope}/join/concat_dim", np.int32(3))
        return self.node(f"{scope}/join", "Concat", [axis, *inputs], T=tf.float32, N=len(inputs))


#################################################################################
#                                The 2015 network                               #
#################################################################################

def preprocessing(b):
    """The graph's own input pipeline; the evaluators feed ExpandDims:0 (N, H, W, 3) in [0, 255]."""
    contents = b.const("DecodeJpeg/contents", np.array(b"", dtype=object))
    decoded = b.node("DecodeJpeg", "DecodeJpeg", [contents], channels=3, ratio=1, fancy_upscaling=True,
                     try_recover_truncated=False, acceptable_fraction=1.0, dct_method="")
    cast = b.node("Cast", "Cast", [decoded], SrcT=tf.uint8, DstT=tf.float32)
    batch = b.node("ExpandDims", "ExpandDims", [cast, b.const("ExpandDims/dim", np.int32(0))],
                   T=tf.float32, Tdim=tf.int32)
    resized = b.node("ResizeBilinear", "ResizeBilinear",
                     [batch, b.const("ResizeBilinear/size", np.array([IMAGE_SIZE, IMAGE_SIZE], np.int32))],
                     T=tf.float32, align_corners=False)
    centred = b.node("Sub", "Sub", [resized, b.const("Sub/y", np.float32(128))], T=tf.float32)
    scaled = b.node("Mul", "Mul", [centred, b.const("Mul/y", np.float32(1 / 128))], T=tf.float32)
    b.channels[scaled] = 3
    return scaled


def stem(b, x):
    """299 -> 35: five convolutions and two max pools; their batch norms scale by gamma."""
    x = b.conv("conv", x, 32, 3, stride=2, padding="VALID", scale_after=True)  # 149
    x = b.conv("conv_1", x, 32, 3, padding="VALID", scale_after=True)           # 147
    x = b.conv("conv_2", x, 64, 3, scale_after=True)                           # 147
    x = b.pool("pool", x, "MaxPool", 3, 2, "VALID")                           # 73
    x = b.conv("conv_3", x, 80, 1, padding="VALID", scale_after=True)           # 73
    x = b.conv("conv_4", x, 192, 3, padding="VALID", scale_after=True)          # 71
    return b.pool("pool_1", x, "MaxPool", 3, 2, "VALID")                      # 35


def mixed_35(b, scope, x, pool_channels):
    """mixed, mixed_1, mixed_2 (35x35): 1x1, 5x5 and double 3x3 towers, average pool."""
    branch = b.conv(f"{scope}/conv", x, 64, 1)
    tower = b.conv(f"{scope}/tower/conv_1", b.conv(f"{scope}/tower/conv", x, 48, 1), 64, 5)
    tower_1 = b.conv(f"{scope}/tower_1/conv", x, 64, 1)
    tower_1 = b.conv(f"{scope}/tower_1/conv_2", b.conv(f"{scope}/tower_1/conv_1", tower_1, 96, 3), 96, 3)
    pooled = b.pool(f"{scope}/tower_2/pool", x, "AvgPool", 3, 1, "SAME")
    tower_2 = b.conv(f"{scope}/tower_2/conv", pooled, pool_channels, 1)
    return b.join(scope, [branch, tower, tower_1, tower_2])


def mixed_35_to_17(b, scope, x):
    """mixed_3: stride-2 3x3 convolution, double 3x3 tower and max pool."""
    branch = b.conv(f"{scope}/conv", x, 384, 3, stride=2, padding="VALID")
    tower = b.conv(f"{scope}/tower/conv_1", b.conv(f"{scope}/tower/conv", x, 64, 1), 96, 3)
    tower = b.conv(f"{scope}/tower/conv_2", tower, 96, 3, stride=2, padding="VALID")
    pooled = b.pool(f"{scope}/pool", x, "MaxPool", 3, 2, "VALID")
    return b.join(scope, [branch, tower, pooled])


def mixed_17(b, scope, x, channels_7x7):
    """mixed_4 to mixed_7 (17x17): 1x1 (`conv`, whose first 7 channels of mixed_6 give sFID),
    factorised 7x7 towers and average pool."""
    branch = b.conv(f"{scope}/conv", x, 192, 1)
    tower = b.conv(f"{scope}/tower/conv", x, channels_7x7, 1)
    tower = b.conv(f"{scope}/tower/conv_1", tower, channels_7x7, (1, 7))
    tower = b.conv(f"{scope}/tower/conv_2", tower, 192, (7, 1))
    tower_1 = b.conv(f"{scope}/tower_1/conv", x, channels_7x7, 1)
    for index, (kernel, channels) in enumerate([((7, 1), channels_7x7), ((1, 7), channels_7x7),
                                                ((7, 1), channels_7x7), ((1, 7), 192)], start=1):
        tower_1 = b.conv(f"{scope}/tower_1/conv_{index}", tower_1, channels, kernel)
    pooled = b.pool(f"{scope}/tower_2/pool", x, "AvgPool", 3, 1, "SAME")
    tower_2 = b.conv(f"{scope}/tower_2/conv", pooled, 192, 1)
    return b.join(scope, [branch, tower, tower_1, tower_2])


def mixed_17_to_8(b, scope, x):
    """mixed_8: stride-2 towers and max pool."""
    tower = b.conv(f"{scope}/tower/conv", x, 192, 1)
    tower = b.conv(f"{scope}/tower/conv_1", tower, 320, 3, stride=2, padding="VALID")
    tower_1 = b.conv(f"{scope}/tower_1/conv", x, 192, 1)
    tower_1 = b.conv(f"{scope}/tower_1/conv_1", tower_1, 192, (1, 7))
    tower_1 = b.conv(f"{scope}/tower_1/conv_2", tower_1, 192, (7, 1))
    tower_1 = b.conv(f"{scope}/tower_1/conv_3", tower_1, 192, 3, stride=2, padding="VALID")
    pooled = b.pool(f"{scope}/pool", x, "MaxPool", 3, 2, "VALID")
    return b.join(scope, [tower, tower_1, pooled])


def mixed_8(b, scope, x, pool_op, full):
    """mixed_9 and mixed_10 (8x8): towers that split into 1x3 and 3x1; mixed_10 pools with max,
    a quirk of the 2015 graph. `full` keeps the output convolutions at the real widths."""
    def split(tower_scope, tower):
        halves = [b.conv(f"{tower_scope}/mixed/conv", tower, 384, (1, 3), full=full),
                  b.conv(f"{tower_scope}/mixed/conv_1", tower, 384, (3, 1), full=full)]
        return b.join(f"{tower_scope}/mixed", halves)

    branch = b.conv(f"{scope}/conv", x, 320, 1, full=full)
    tower = split(f"{scope}/tower", b.conv(f"{scope}/tower/conv", x, 384, 1))
    tower_1 = b.conv(f"{scope}/tower_1/conv", x, 448, 1)
    tower_1 = split(f"{scope}/tower_1", b.conv(f"{scope}/tower_1/conv_1", tower_1, 384, 3))
    pooled = b.pool(f"{scope}/tower_2/pool", x, pool_op, 3, 1, "SAME")
    tower_2 = b.conv(f"{scope}/tower_2/conv", pooled, 192, 1, full=full)
    return b.join(scope, [branch, tower, tower_1, tower_2])


def calibration_images():
    """Seeded random images whose pool_3 features set the scale of the logits."""
    return np.random.default_rng(SEED).integers(0, 256, size=(CALIBRATION_IMAGES, 32, 32, 3), dtype=np.uint8)


@functools.lru_cache
def logit_weights(width_divisor=WIDTH_DIVISOR):
    """softmax/weights (2048, 1008), the matrix ADM's Inception Score multiplies pool_3 with.

    pool_3 of a network with random weights is nearly the same vector for every image (a few
    percent apart), and that common part would give every image the same class. So the weights
    are random directions orthogonal to the mean pool_3 of calibration images, scaled to give
    logits that vary by LOGIT_SPREAD between images: probabilities neither uniform nor one-hot."""
    graph = tf.Graph()
    with graph.as_default():
        builder = GraphBuilder(width_divisor)
        tf1.import_graph_def(feature_graph(builder)[0], name="")
        with tf1.Session(graph=graph) as session:
            pools = [session.run("pool_3:0", {"Cast:0": image.astype(np.float32)}).reshape(-1)
                     for image in calibration_images()]
    pools = np.stack(pools)                                             # (n, 2048)
    mean = pools.mean(axis=0) / np.linalg.norm(pools.mean(axis=0))
    weights = node_rng("softmax/weights").normal(size=(POOL_DIM, NUM_CLASSES))
    weights -= np.outer(mean, mean @ weights)                           # (2048, 1008), orthogonal to the mean
    return (weights * LOGIT_SPREAD / (pools @ weights).std(axis=0).mean()).astype(np.float32)


def classifier(b, pool, weights):
    flat = b.node("pool_3/_reshape", "Reshape", [pool, b.const("pool_3/_reshape/shape", np.array([1, POOL_DIM], np.int32))],
                  T=tf.float32, Tshape=tf.int32)
    matmul = b.node("softmax/logits/MatMul", "MatMul", [flat, b.const("softmax/weights", weights)],
                    T=tf.float32, transpose_a=False, transpose_b=False)
    biases = node_rng("softmax/biases").normal(size=NUM_CLASSES).astype(np.float32)
    logits = b.node("softmax/logits", "BiasAdd", [matmul, b.const("softmax/biases", biases)],
                    T=tf.float32, data_format="NHWC")
    b.node("softmax", "Softmax", [logits], T=tf.float32)


def feature_graph(b):
    """The network up to pool_3; returns (graph_def, pool_3's name)."""
    x = stem(b, preprocessing(b))
    for scope, pool_channels in (("mixed", 32), ("mixed_1", 64), ("mixed_2", 64)):
        x = mixed_35(b, scope, x, pool_channels)
    x = mixed_35_to_17(b, "mixed_3", x)
    for scope, channels_7x7 in (("mixed_4", 128), ("mixed_5", 160), ("mixed_6", 160), ("mixed_7", 192)):
        x = mixed_17(b, scope, x, channels_7x7)
    x = mixed_17_to_8(b, "mixed_8", x)
    x = mixed_8(b, "mixed_9", x, "AvgPool", full=False)
    x = mixed_8(b, "mixed_10", x, "MaxPool", full=True)
    return b.graph_def, b.pool("pool_3", x, "AvgPool", 8, 1, "VALID")


def build_graph_def(width_divisor=WIDTH_DIVISOR):
    b = GraphBuilder(width_divisor)
    graph_def, pool = feature_graph(b)
    classifier(b, pool, logit_weights(width_divisor))
    return graph_def


def write_graph(path, width_divisor=WIDTH_DIVISOR):
    with open(path, "wb") as file:
        file.write(build_graph_def(width_divisor).SerializeToString())


#################################################################################
#                      The graph run as designed, image by image                #
#################################################################################

class DirectFeatures:
    """The stand-in's features computed without the evaluators' loaders: the graph imported
    as it is and fed one image at a time through its own `Cast:0`, as it was built to be."""

    def __init__(self, width_divisor=WIDTH_DIVISOR):
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf1.import_graph_def(build_graph_def(width_divisor), name="")
            pool = self.graph.get_tensor_by_name("pool_3:0")                        # (1, 1, 1, 2048)
            self.pool = tf1.reshape(pool, [-1, POOL_DIM])
            self.spatial = self.graph.get_tensor_by_name("mixed_6/conv:0")[..., :7]  # (1, 17, 17, 7)
            self.features = tf1.placeholder(tf.float32, [None, POOL_DIM])
            self.softmax = tf1.nn.softmax(tf1.matmul(self.features, logit_weights(width_divisor)))
        self.session = tf1.Session(graph=self.graph)

    def __call__(self, images):
        """uint8 (N, H, W, 3) -> pool_3 (N, 2048), mixed_6/conv[..., :7] flattened (N, 2023)."""
        pools, spatials = [], []
        for image in images:
            pool, spatial = self.session.run([self.pool, self.spatial], {"Cast:0": image.astype(np.float32)})
            pools.append(pool)
            spatials.append(spatial.reshape(1, -1))
        return np.concatenate(pools), np.concatenate(spatials)

    def class_probabilities(self, pool_features):
        """ADM's softmax for the Inception Score: of pool_3 times softmax/weights, no biases."""
        return self.session.run(self.softmax, {self.features: pool_features})
