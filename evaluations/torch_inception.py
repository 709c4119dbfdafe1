"""ADM's Inception graph run by PyTorch, without TensorFlow, on CPU or GPU.

The network is rebuilt from the GraphDef itself: every op between the evaluators' input
`ExpandDims:0` and the outputs `pool_3` and `mixed_6/conv` becomes a module with that node's
weights and attributes (strides, padding, max or average pooling, batch-norm epsilon, the resize
to 299x299), so the file, not this code, fixes the 2015 network's topology and quirks. Each op
computes what its TensorFlow kernel computes: TensorFlow 1's bilinear resize (no half-pixel
offset), SAME padding, average pools that leave padding out of the count. Batch norms are folded
into the convolutions before them. Activations are NCHW here; TensorFlow's NHWC meaning (the
concatenation axis, the order of sFID's flattened features) is translated at the edges.
"""
import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluations.graph_def import GraphDef, GraphDefError
from evaluations.inception import (INPUT_NODE, LOGITS_MATMUL_NODE, POOL_DIM, POOL_NODE, SPATIAL_CHANNELS,
                                   SPATIAL_DIM, SPATIAL_NODE, WARMUP_SHAPE)

NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}


#################################################################################
#                            TensorFlow ops in PyTorch                          #
#################################################################################

def window_attributes(node, kernel_size):
    """(stride, padding) of a Conv2D or pool node. SAME padding is supported where it is
    symmetric whatever the input size (stride 1, odd kernel), as everywhere in the 2015 graph."""
    if node.attr["data_format"].s not in (b"", b"NHWC"):
        raise GraphDefError(f"node {node.name!r}: data format {node.attr['data_format'].s.decode()}, not NHWC")
    strides = tuple(node.attr["strides"].list.i[1:3])
    padding = node.attr["padding"].s.decode()
    if padding == "VALID":
        return strides, (0, 0)
    if padding == "SAME" and strides == (1, 1) and all(size % 2 for size in kernel_size):
        return strides, tuple((size - 1) // 2 for size in kernel_size)
    raise GraphDefError(f"node {node.name!r}: {padding} padding with strides {strides} and kernel "
                        f"{tuple(kernel_size)} is not supported")


class Conv2d(nn.Module):
    """Conv2D with HWIO weights, the batch norm after it folded in as a per-channel scale of
    the weights and a bias."""

    def __init__(self, weight_hwio, stride, padding, scale, shift):
        super().__init__()
        weight = torch.from_numpy(weight_hwio).permute(3, 2, 0, 1)  # (out, in, kh, kw)
        self.register_buffer("weight", (weight * scale[:, None, None, None]).contiguous())
        self.register_buffer("bias", shift)
        self.stride, self.padding = stride, padding

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


def batch_norm_scale_shift(node, mean, variance, beta, gamma):
    """BatchNormWithGlobalNormalization as y = x * scale + shift, per channel:
    scale = gamma / sqrt(variance + epsilon) (gamma only with scale_after_normalization)."""
    epsilon = node.attr["variance_epsilon"].f
    scale = torch.rsqrt(torch.from_numpy(variance) + epsilon)
    if node.attr["scale_after_normalization"].b:
        scale = scale * torch.from_numpy(gamma)
    return scale, torch.from_numpy(beta) - torch.from_numpy(mean) * scale


class Pool(nn.Module):
    """MaxPool or AvgPool; TensorFlow's average over SAME padding counts only real pixels."""

    def __init__(self, op, kernel_size, stride, padding):
        super().__init__()
        self.op, self.kernel_size, self.stride, self.padding = op, kernel_size, stride, padding

    def forward(self, x):
        if self.op == "MaxPool":
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, count_include_pad=False)


def tf1_bilinear_weights(in_size, out_size, align_corners):
    """Source rows (or columns) and weights of TensorFlow 1's ResizeBilinear: output pixel i
    reads input position i * scale, with scale = in / out in float32 (no half-pixel offset)."""
    if align_corners and out_size > 1:
        scale = np.float32(in_size - 1) / np.float32(out_size - 1)
    else:
        scale = np.float32(in_size) / np.float32(out_size)
    position = torch.arange(out_size, dtype=torch.float32) * torch.tensor(scale)  # (out,)
    lower = torch.floor(position)
    weight = position - lower
    lower_index = lower.long().clamp(min=0)
    upper_index = torch.ceil(position).long().clamp(max=in_size - 1)
    return lower_index, upper_index, weight


class ResizeBilinear(nn.Module):
    """ResizeBilinear with TensorFlow 1's coordinates and its arithmetic, in float32: within a
    row, left + (right - left) * x_weight; between rows, top + (bottom - top) * y_weight."""

    def __init__(self, size, align_corners):
        super().__init__()
        self.size, self.align_corners = size, align_corners

    def forward(self, x):  # (N, C, H, W) -> (N, C, out_h, out_w)
        (out_h, out_w), (in_h, in_w) = self.size, x.shape[2:]
        if (out_h, out_w) == (in_h, in_w):
            return x
        top, bottom, y_weight = (t.to(x.device) for t in tf1_bilinear_weights(in_h, out_h, self.align_corners))
        left, right, x_weight = (t.to(x.device) for t in tf1_bilinear_weights(in_w, out_w, self.align_corners))
        left_columns, right_columns = x.index_select(3, left), x.index_select(3, right)
        rows = left_columns + (right_columns - left_columns) * x_weight           # (N, C, H, out_w)
        top_rows, bottom_rows = rows.index_select(2, top), rows.index_select(2, bottom)
        return top_rows + (bottom_rows - top_rows) * y_weight[:, None]          # (N, C, out_h, out_w)


class ConstantOperand(nn.Module):
    """Sub or Mul of the activation and a constant (a scalar or one value per channel)."""

    def __init__(self, op, constant):
        super().__init__()
        self.op = op
        self.register_buffer("constant", torch.from_numpy(constant).reshape(-1, 1, 1) if constant.ndim else
                             torch.from_numpy(constant))

    def forward(self, x):
        return x - self.constant if self.op == "Sub" else x * self.constant


class Concat(nn.Module):
    def __init__(self, nhwc_axis):
        super().__init__()
        self.axis = NHWC_TO_NCHW_AXIS[nhwc_axis % 4]

    def forward(self, *tensors):
        return torch.cat(tensors, dim=self.axis)


#################################################################################
#                           The graph as a PyTorch module                       #
#################################################################################

def translate_node(graph, name):
    """(module, names of the activations it takes) for one node of the graph."""
    node, inputs = graph.node(name), [graph.source(input_) for input_ in graph.data_inputs(name)]
    if node.op == "ResizeBilinear":
        if node.attr["half_pixel_centers"].b:
            raise GraphDefError(f"node {name!r}: half-pixel-centre resizing is not supported")
        size = tuple(int(side) for side in graph.constant(inputs[1]))
        return ResizeBilinear(size, node.attr["align_corners"].b), inputs[:1]
    if node.op in ("Sub", "Mul"):
        return ConstantOperand(node.op, graph.constant(inputs[1])), inputs[:1]
    if node.op == "BatchNormWithGlobalNormalization":
        conv = graph.node(inputs[0])
        if conv.op != "Conv2D":
            raise GraphDefError(f"node {name!r}: a batch norm after {conv.op}, not after Conv2D")
        weight = graph.constant(graph.data_inputs(conv.name)[1])  # (kh, kw, in, out)
        if any(rate != 1 for rate in conv.attr["dilations"].list.i):
            raise GraphDefError(f"node {conv.name!r}: dilated convolutions are not supported")
        scale, shift = batch_norm_scale_shift(node, *(graph.constant(input_) for input_ in inputs[1:]))
        conv_input = graph.source(graph.data_inputs(conv.name)[0])
        return Conv2d(weight, *window_attributes(conv, weight.shape[:2]), scale, shift), [conv_input]
    if node.op == "Relu":
        return nn.ReLU(), inputs
    if node.op in ("MaxPool", "AvgPool"):
        kernel_size = tuple(node.attr["ksize"].list.i[1:3])
        return Pool(node.op, kernel_size, *window_attributes(node, kernel_size)), inputs
    if node.op == "Concat":
        return Concat(int(graph.constant(inputs[0]))), inputs[1:]
    if node.op == "ConcatV2":
        return Concat(int(graph.constant(inputs[-1]))), inputs[:-1]
    raise GraphDefError(f"node {name!r}: op {node.op} is not supported by the torch backend")


def dependency_order(graph, input_node, output_nodes):
    """[(name, module, input names)] of the nodes between input and outputs, each after its inputs."""
    steps, visited = [], set()

    def visit(name, path):
        if name == input_node or name in visited:
            return
        if name in path:
            raise GraphDefError(f"node {name!r} depends on itself")
        module, inputs = translate_node(graph, name)
        for input_ in inputs:
            visit(input_, path | {name})
        visited.add(name)
        steps.append((name, module, inputs))

    for output in output_nodes:
        visit(graph.source(output), set())
    return steps


class GraphNetwork(nn.Module):
    """Runs the ops from `input_node` to `output_nodes`; forward takes the input as NCHW float."""

    def __init__(self, graph, input_node, output_nodes):
        super().__init__()
        steps = dependency_order(graph, input_node, output_nodes)
        self.input_node = input_node
        self.output_nodes = [graph.source(output) for output in output_nodes]
        self.layers = nn.ModuleList(module for _, module, _ in steps)
        self.steps = [(name, inputs) for name, _, inputs in steps]
        # Each activation is dropped after its last reader, so memory stays at a few of them.
        last_reader = {input_: index for index, (_, inputs) in enumerate(self.steps) for input_ in inputs}
        self.released = [[input_ for input_ in set(inputs) if last_reader[input_] == index
                          and input_ not in self.output_nodes] for index, (_, inputs) in enumerate(self.steps)]

    def forward(self, x):
        values = {self.input_node: x}
        for layer, (name, inputs), released in zip(self.layers, self.steps, self.released):
            values[name] = layer(*(values[input_] for input_ in inputs))
            for input_ in released:
                del values[input_]
        return [values[name] for name in self.output_nodes]


#################################################################################
#                                   The backend                                 #
#################################################################################

@contextlib.contextmanager
def ieee_float32():
    """Full float32 matmuls and convolutions for the duration: training turns TF32 on for CUDA,
    whose 10-bit mantissas would move the features by about 1e-3."""
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    saved = [backend.fp32_precision for backend in backends]
    for backend in backends:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, precision in zip(backends, saved):
            backend.fp32_precision = precision


def inference_device(device=None):
    """torch.device of a --device string (default: cuda when available); ValueError if unusable."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"--device {device}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available")
    return device


class TorchInception:
    """ADM's Inception features computed by PyTorch from the graph file, with the interface of
    the TensorFlow backend: `features(images)`, `logit_weights`, a context manager."""

    def __init__(self, graph_path, device=None):
        self.device = inference_device(device)
        graph = GraphDef.read(graph_path)
        try:
            network = GraphNetwork(graph, INPUT_NODE, [POOL_NODE, SPATIAL_NODE])
            # Channels-last convolutions: 1.5x the images per second of NCHW on CPU (oneDNN).
            self.network = network.to(self.device, memory_format=torch.channels_last).eval()
            self.logit_weights = graph.constant(graph.data_inputs(LOGITS_MATMUL_NODE)[1])  # (2048, K)
        except GraphDefError as error:
            raise ValueError(f"{graph_path}: not ADM's Inception graph ({error})") from None
        if self.logit_weights.shape[0] != POOL_DIM:
            raise ValueError(f"{graph_path}: logits weight matrix has shape {self.logit_weights.shape}, "
                             f"expected ({POOL_DIM}, K)")
        self.features(np.zeros(WARMUP_SHAPE, dtype=np.uint8))  # checks the feature widths before any real work

    @torch.inference_mode()
    def features(self, images):
        """uint8 images (N, H, W, 3) -> pool_3 (N, 2048) and spatial (N, 2023) float32 features."""
        batch = torch.tensor(images, device=self.device).permute(0, 3, 1, 2).float()  # (N, 3, H, W) in [0, 255]
        with ieee_float32():
            pool, spatial = self.network(batch)                    # (N, 2048, 1, 1), (N, C, 17, 17)
        spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # (N, 17, 17, 7), TensorFlow's order
        pool, spatial = pool.reshape(len(images), -1), spatial.reshape(len(images), -1)
        if pool.shape[1] != POOL_DIM or spatial.shape[1] != SPATIAL_DIM:
            raise ValueError(f"Inception graph gave features of widths {pool.shape[1]} and {spatial.shape[1]}, "
                             f"expected {POOL_DIM} and {SPATIAL_DIM}")
        if not (torch.isfinite(pool).all() and torch.isfinite(spatial).all()):
            raise ValueError("Inception features are not finite (the graph's CheckNumerics would stop here)")
        return pool.cpu().numpy(), spatial.cpu().numpy()

    def close(self):
        self.network = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
