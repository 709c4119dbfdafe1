"""TensorFlow GraphDefs read without TensorFlow, through the protobuf schema that TensorBoard ships.

Enough for ADM's Inception graph: nodes by name, their data inputs and attributes, and the values
of constants (float and integer tensors).
"""
import math

import numpy as np
from google.protobuf.message import DecodeError
from tensorboard.compat.proto import graph_pb2, types_pb2

# Tensor element types a constant may have, and the repeated field holding values that are not
# packed into tensor_content. Serialised tensors are little-endian.
NUMPY_DTYPES = {types_pb2.DT_FLOAT: "<f4", types_pb2.DT_DOUBLE: "<f8",
                types_pb2.DT_INT32: "<i4", types_pb2.DT_INT64: "<i8"}
VALUE_FIELDS = {types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
                types_pb2.DT_INT32: "int_val", types_pb2.DT_INT64: "int64_val"}
PASS_THROUGH_OPS = ("Identity", "CheckNumerics")  # the same tensor, or a NaN check done at run time


class GraphDefError(ValueError):
    """A file that is not a GraphDef, or a GraphDef without what is asked of it."""


def tensor_value(tensor):
    """A TensorProto as a numpy array. Values in a repeated field may be fewer than the
    elements: TensorFlow then repeats the last one (a constant filled with one number)."""
    if tensor.dtype not in NUMPY_DTYPES:
        raise GraphDefError(f"constant of unsupported type {types_pb2.DataType.Name(tensor.dtype)}")
    dtype = np.dtype(NUMPY_DTYPES[tensor.dtype])
    shape = [dim.size for dim in tensor.tensor_shape.dim]
    if tensor.tensor_content:
        return np.frombuffer(tensor.tensor_content, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    values = np.asarray(getattr(tensor, VALUE_FIELDS[tensor.dtype]), dtype=dtype.newbyteorder("="))
    count = math.prod(shape)
    if len(values) < count:
        values = np.concatenate([values, np.repeat(values[-1:], count - len(values))])
    return values.reshape(shape)


def input_name(reference):
    """The node an input reference names ("node" or "node:0"); a data input must be output 0."""
    name, _, index = reference.partition(":")
    if index not in ("", "0"):
        raise GraphDefError(f"input {reference}: only a node's first output is supported")
    return name


class GraphDef:
    """A GraphDef's nodes by name."""

    def __init__(self, graph_def):
        self.nodes = {node.name: node for node in graph_def.node}

    @classmethod
    def read(cls, path):
        graph_def = graph_pb2.GraphDef()
        with open(path, "rb") as file:
            try:
                graph_def.ParseFromString(file.read())
            except DecodeError as error:
                raise GraphDefError(f"{path}: not a TensorFlow GraphDef ({error})") from None
        return cls(graph_def)

    def node(self, name):
        if name not in self.nodes:
            raise GraphDefError(f"no node {name!r}")
        return self.nodes[name]

    def data_inputs(self, name):
        """Names of the nodes feeding `name`, without control inputs ("^node")."""
        return [input_name(reference) for reference in self.node(name).input if not reference.startswith("^")]

    def source(self, name):
        """The node whose tensor `name` passes on, through Identity and CheckNumerics nodes."""
        while self.node(name).op in PASS_THROUGH_OPS:
            name = self.data_inputs(name)[0]
        return name

    def constant(self, name):
        """The value of the Const node that `name` passes on."""
        node = self.node(self.source(name))
        if node.op != "Const":
            raise GraphDefError(f"node {name!r} is a {node.op}, not a constant")
        return tensor_value(node.attr["value"].tensor)
