"""ADM's Inception-v3 graph (`classify_image_graph_def.pb`): where to find it, its tensors, the
two backends that run it, and the activations of a batch file.

Images (uint8, any size) are fed as float32 in [0, 255] straight into the graph's `ExpandDims:0`;
the graph itself resizes to 299x299 and normalises, exactly as in ADM. Outputs: pool_3 features
(N, 2048) for FID, precision and recall; the first 7 channels of mixed_6/conv (the 1x1 branch of
the seventh mixed block, 17x17) flattened (N, 17 * 17 * 7 = 2023) for sFID; and the logits' weight
matrix (2048, K) for the Inception Score. The "tensorflow" backend (tf_inception.py) runs the graph
as ADM does; the "torch" backend (torch_inception.py) rebuilds it in PyTorch from the same file.
Neither is imported before it is asked for.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional

import numpy as np
from tqdm.auto import tqdm

from evaluations.metrics import FeatureStatistics, RunningStatistics

GRAPH_FILENAME = "classify_image_graph_def.pb"
GRAPH_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
INPUT_NODE = "ExpandDims"
POOL_NODE = "pool_3"
SPATIAL_NODE = "mixed_6/conv"
LOGITS_MATMUL_NODE = "softmax/logits/MatMul"
BACKENDS = ("torch", "tensorflow")

POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of mixed_6/conv's 192 channels for sFID
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
DEFAULT_BATCH_SIZE = 64  # images per network run, as in ADM
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


def add_inception_arguments(parser):
    """--backend, --device and --batch-size of the evaluator and the reference-batch builder."""
    # TensorFlow by default, as ADM's evaluator: the torch backend is checked against it on a
    # stand-in graph only, not yet on the real classify_image_graph_def.pb.
    parser.add_argument("--backend", choices=BACKENDS, default="tensorflow",
                        help="tensorflow (default): the graph run by TensorFlow, as ADM's evaluator does; "
                             "torch: ADM's graph rebuilt in PyTorch, on CPU or GPU, without TensorFlow")
    parser.add_argument("--device", default=None,
                        help="torch backend: cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per Inception run")


def load_inception(backend, graph_path, device=None):
    """The Inception network of `backend` ("torch" or "tensorflow") over the graph file; the
    torch backend runs on `device` (default: CUDA when available). TensorFlow is imported only
    for its backend. ValueError for a file that is not ADM's graph."""
    if backend == "tensorflow":
        if device is not None:
            raise ValueError("--device is for the torch backend; TensorFlow places the graph itself")
        try:
            from evaluations.tf_inception import TensorFlowInception
            return TensorFlowInception(graph_path)
        except ImportError as error:
            raise ValueError(f"--backend tensorflow needs TensorFlow ({error}); --backend torch does not") from None
    from evaluations.torch_inception import TorchInception
    return TorchInception(graph_path, device)


#################################################################################
#                              Batch Activations                                #
#################################################################################

class Activations(NamedTuple):
    pool_features: Optional[np.ndarray]            # (N, 2048) float32, if kept
    pool_statistics: Optional[FeatureStatistics]    # over all N images, if accumulated
    spatial_statistics: Optional[FeatureStatistics]


def read_ahead(batches):
    """Yields the items of `batches` while a thread reads the next one, so that reading and
    inflating an npz overlaps the network (both release the GIL)."""
    iterator = iter(batches)
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(next, iterator, None)
        while (batch := pending.result()) is not None:
            pending = reader.submit(next, iterator, None)
            yield batch


def compute_activations(inception, image_batches, num_images, keep_pool_features=True,
                        accumulate_statistics=True, description="activations"):
    """Runs every batch through the graph. pool_3 features are kept whole (precision and recall
    need them all); spatial features only feed running statistics, batch by batch."""
    pool_features = np.empty((num_images, POOL_DIM), dtype=np.float32) if keep_pool_features else None
    pool_running, spatial_running = RunningStatistics(POOL_DIM), RunningStatistics(SPATIAL_DIM)
    seen = 0
    with tqdm(total=num_images, desc=description, unit="img") as progress:
        for images in read_ahead(image_batches):
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
