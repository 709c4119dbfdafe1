"""ADM-equivalent evaluation: metrics against independent numpy/scipy computations, npz
streaming and validation, the torch backend against TensorFlow, and the evaluator and
reference-batch builder end to end on a stand-in Inception graph with the real graph's
topology, node names and ops."""
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import tensorflow as tf
import torch
from PIL import Image
from scipy import linalg
from scipy.spatial.distance import cdist
from scipy.special import softmax
from threadpoolctl import threadpool_limits

import evaluation_standin_graph as standin
from evaluations import evaluator, metrics, reference_batch
from evaluations.inception import GRAPH_FILENAME, GRAPH_URL
from evaluations.tf_inception import TensorFlowInception
from evaluations.torch_inception import ResizeBilinear, TorchInception
from evaluations.npz_batches import ImageBatchFile, NpzFormatError, read_precomputed_statistics
from runtime.transforms import center_crop_arr

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELATIVE_TOLERANCE = 1e-6
# A float16 squared distance |u|^2 - 2 u.v + |v|^2 errs by a few float16 ulps of its terms:
# measured up to 3.8 * 2^-11 * (|u|^2 + |v|^2). A distance and a radius both err, so a
# decision closer than their two bounds may flip.
FLOAT16_DISTANCE_ERROR = 6 * 2.0 ** -11


#################################################################################
#                      Independent reference computations                       #
#################################################################################

def independent_statistics(features):
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def trace_sqrt_from_features(features1, features2):
    """tr sqrt(S1 S2) of two sample covariances from the features themselves: the nuclear norm
    of X1 X2^T / sqrt((n1 - 1)(n2 - 1)) for centred X1, X2 (the nonzero eigenvalues of S1 S2 are
    the squared singular values of that small matrix), exact for singular covariances too."""
    centred1 = features1 - features1.mean(axis=0)
    centred2 = features2 - features2.mean(axis=0)
    scale = np.sqrt((len(features1) - 1) * (len(features2) - 1))
    return np.linalg.svd(centred1 @ centred2.T / scale, compute_uv=False).sum()


def independent_fid(features1, features2):
    """The Frechet distance of two feature sets (N, D), from the features, without a D x D
    matrix function."""
    features1, features2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    (mu1, sigma1), (mu2, sigma2) = independent_statistics(features1), independent_statistics(features2)
    return (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
            - 2 * trace_sqrt_from_features(features1, features2))


def independent_inception_score(logits, split_size):
    scores = []
    for start in range(0, len(logits), split_size):
        p = softmax(np.asarray(logits[start:start + split_size], np.float64), axis=1)
        kl = np.sum(p * (np.log(p) - np.log(p.mean(axis=0))), axis=1)
        scores.append(np.exp(kl.mean()))
    return np.mean(scores)


def independent_precision_recall_bounds(reference, samples, k=3):
    """Float64 precision and recall, each as the (low, high) range that float16 distance errors
    allow: a vector is surely inside a manifold if some ball holds it by more than the errors,
    possibly inside if some ball misses it by less."""
    reference, samples = np.asarray(reference, np.float64), np.asarray(samples, np.float64)
    reference_norms, sample_norms = np.square(reference).sum(1), np.square(samples).sum(1)

    def radii_and_errors(features, norms):
        neighbour = np.argsort(cdist(features, features, "sqeuclidean"), axis=1)[:, k]
        radii = np.sum((features - features[neighbour]) ** 2, axis=1)
        return radii, FLOAT16_DISTANCE_ERROR * (norms + norms[neighbour])

    reference_radii, reference_radius_errors = radii_and_errors(reference, reference_norms)
    sample_radii, sample_radius_errors = radii_and_errors(samples, sample_norms)
    distances = cdist(reference, samples, "sqeuclidean")  # (R, S)
    distance_errors = FLOAT16_DISTANCE_ERROR * (reference_norms[:, None] + sample_norms[None, :])
    sample_slack = reference_radii[:, None] - distances                 # > 0: sample inside reference ball
    sample_error = distance_errors + reference_radius_errors[:, None]
    reference_slack = sample_radii[None, :] - distances                 # > 0: reference inside sample ball
    reference_error = distance_errors + sample_radius_errors[None, :]
    precision = [np.mean((sample_slack > bound).any(axis=0)) for bound in (sample_error, -sample_error)]
    recall = [np.mean((reference_slack > bound).any(axis=1)) for bound in (reference_error, -reference_error)]
    return precision, recall


def assert_within(value, bounds):
    assert bounds[0] <= value <= bounds[1], (value, bounds)


def assert_relative(actual, expected, tolerance=RELATIVE_TOLERANCE):
    assert abs(actual - expected) <= tolerance * abs(expected), (actual, expected)


#################################################################################
#                                    Metrics                                    #
#################################################################################

def correlated_features(rng, count, dim, shift=0.0):
    mixing = np.random.default_rng(99).normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(count, dim)) @ mixing + shift


def test_running_statistics_match_numpy():
    rng = np.random.default_rng(0)
    features = correlated_features(rng, 307, 24, shift=5.0).astype(np.float32)
    running = metrics.RunningStatistics(24, chunk_rows=50)
    for start, stop in [(0, 1), (1, 64), (64, 200), (200, 307)]:
        running.update(features[start:stop])
    mu, sigma = running.statistics()
    expected_mu, expected_sigma = independent_statistics(features)
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(metrics.feature_statistics(features).sigma, expected_sigma, rtol=1e-12)


def test_frechet_distance_matches_independent_computation():
    rng = np.random.default_rng(1)
    reference = correlated_features(rng, 600, 48)
    samples = correlated_features(rng, 600, 48, shift=0.3) * 1.2
    assert_relative(metrics.statistics_distance(metrics.feature_statistics(samples), metrics.feature_statistics(reference)),
                    independent_fid(samples, reference))


def test_frechet_distance_is_zero_for_identical_and_grows_with_shift():
    stats = metrics.feature_statistics(correlated_features(np.random.default_rng(2), 500, 32))
    assert abs(metrics.frechet_distance(*stats, *stats)) < 1e-8 * np.trace(stats.sigma)
    distances = [metrics.frechet_distance(stats.mu + shift, stats.sigma, *stats) for shift in (0.1, 0.5, 1.0)]
    np.testing.assert_allclose(distances, [32 * 0.01, 32 * 0.25, 32 * 1.0], rtol=1e-6)


def test_frechet_distance_of_a_batch_against_itself_is_zero():
    rng = np.random.default_rng(15)
    for count in (100, 400):  # fewer samples than the 256 features (a singular covariance), and more
        stats = metrics.feature_statistics(correlated_features(rng, count, 256, shift=3.0))
        assert abs(metrics.frechet_distance(*stats, *stats)) < 1e-6
        if count == 100:  # there, sqrtm alone (ADM) is complex and misses 0 by about 1e-5
            plain = linalg.sqrtm(stats.sigma @ stats.sigma)
            assert np.iscomplexobj(plain) and abs(np.trace(stats.sigma) - np.trace(plain).real) > 1e-6


@pytest.mark.parametrize("noise, full_rank", [(1e-7, False), (1e-4, True)])
def test_frechet_distance_of_near_singular_covariances(noise, full_rank):
    # Features in a 40-dimensional subspace of 256 plus a little noise: covariance eigenvalues fall
    # from 600 to about noise^2, round-off at 1e-14 (singular) and 1e-10 at 1e-8 (full rank, where
    # sqrtm, as in ADM, still turns complex).
    rng = np.random.default_rng(16)
    basis = rng.normal(size=(40, 256))
    batches = [rng.normal(size=(300, 40)) @ basis + noise * rng.normal(size=(300, 256)) + shift
               for shift in (0.0, 0.2)]
    stats = [metrics.feature_statistics(batch) for batch in batches]
    assert np.linalg.matrix_rank(stats[0].sigma) == (256 if full_rank else 40)
    assert np.iscomplexobj(linalg.sqrtm(stats[0].sigma @ stats[1].sigma))
    distance = metrics.statistics_distance(stats[0], stats[1])
    assert isinstance(distance, float) and np.isfinite(distance)
    assert_relative(distance, independent_fid(*batches), tolerance=1e-6)
    assert abs(metrics.frechet_distance(*stats[1], *stats[1])) < 1e-6


def test_frechet_distance_rejects_non_finite_statistics():
    with pytest.raises(ValueError, match="not finite"):
        metrics.frechet_distance(np.zeros(3), np.full((3, 3), np.nan), np.zeros(3), np.eye(3))


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="mismatched"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_matches_independent_computation():
    rng = np.random.default_rng(3)
    features, weights = rng.random((130, 16)), rng.normal(size=(16, 5))
    score = metrics.inception_score(features, weights, split_size=50)  # splits of 50, 50, 30
    assert_relative(score, independent_inception_score(features @ weights, 50))


def test_inception_score_bounds():
    # Identical predictions score 1; confident predictions spread over K classes score ~K.
    def score(logits):
        return metrics.inception_score_from_log_probabilities(metrics.log_softmax(logits))

    assert_relative(score(np.tile([1.0, 2.0, 3.0], (20, 1))), 1.0)
    confident = np.eye(4).repeat(5, axis=0) * 50.0
    assert_relative(score(confident), 4.0, tolerance=1e-9)


def test_precision_recall_exact_when_float16_is_exact():
    # Small integer features: every float16 distance is exact, so the result must equal float64.
    rng = np.random.default_rng(4)
    reference = rng.integers(-3, 4, size=(60, 16)).astype(np.float32)
    samples = (rng.integers(-3, 4, size=(50, 16)) + (rng.random((50, 16)) < 0.3)).astype(np.float32)
    distances = cdist(reference, samples, "sqeuclidean")
    reference_radii = np.sort(cdist(reference, reference, "sqeuclidean"), axis=1)[:, 3]
    sample_radii = np.sort(cdist(samples, samples, "sqeuclidean"), axis=1)[:, 3]
    precision = np.mean((distances <= reference_radii[:, None]).any(axis=0))
    recall = np.mean((distances <= sample_radii[None, :]).any(axis=1))
    assert 0 < precision < 1 and 0 < recall < 1
    assert metrics.precision_recall(reference, samples) == (precision, recall)
    assert metrics.precision_recall(reference, samples, batch_size=7) == (precision, recall)


def test_precision_recall_within_float16_tolerance():
    rng = np.random.default_rng(5)
    reference = correlated_features(rng, 300, 16).astype(np.float32)
    samples = (correlated_features(rng, 250, 16, shift=0.5)).astype(np.float32)
    precision, recall = metrics.precision_recall(reference, samples, batch_size=128)
    precision_bounds, recall_bounds = independent_precision_recall_bounds(reference, samples)
    assert 0.1 < precision_bounds[0] and precision_bounds[1] - precision_bounds[0] < 0.1
    assert 0.1 < recall_bounds[0] and recall_bounds[1] - recall_bounds[0] < 0.1
    assert_within(precision, precision_bounds)
    assert_within(recall, recall_bounds)


def test_distances_fall_back_to_float32_when_float16_overflows():
    rng = np.random.default_rng(6)
    u, v = rng.normal(300, 20, size=(5, 8)), rng.normal(300, 20, size=(6, 8))  # |u|^2 ~ 7e5 > 65504
    np.testing.assert_allclose(metrics.pairwise_squared_distances(u, v), cdist(u, v, "sqeuclidean"),
                               rtol=1e-3, atol=1.0)


#################################################################################
#                                   npz files                                   #
#################################################################################

@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_image_batches_stream_in_order(tmp_path, save):
    images = np.random.default_rng(7).integers(0, 256, size=(23, 5, 6, 3), dtype=np.uint8)
    save(tmp_path / "batch.npz", images)
    batch_file = ImageBatchFile(str(tmp_path / "batch.npz"))
    batches = list(batch_file.batches(10))
    assert batch_file.num_images == 23 and [len(batch) for batch in batches] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    part = list(batch_file.batches(4, start=7, stop=18))  # one process's share
    assert [len(batch) for batch in part] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(part), images[7:18])


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_image_batches_never_hold_the_whole_array(tmp_path, save):
    images = np.random.default_rng(14).integers(0, 256, size=(400, 64, 64, 3), dtype=np.uint8)  # 4.9 MB
    save(tmp_path / "batch.npz", images)
    batch_file = ImageBatchFile(str(tmp_path / "batch.npz"))
    tracemalloc.start()
    try:
        total = sum(int(batch.sum(dtype=np.int64)) for batch in batch_file.batches(16))  # 16 images: 197 KB
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == int(images.sum(dtype=np.int64))
    assert peak < images.nbytes / 4


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, "no array 'arr_0'"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, "must hold uint8 RGB images"),
    ({"arr_0": np.zeros((4, 3, 8, 8), np.uint8)}, "must hold uint8 RGB images"),
    ({"arr_0": np.zeros((4, 8, 8), np.uint8)}, "must hold uint8 RGB images"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.uint8)}, "at least 4 images"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.uint8), "mu": np.zeros(2048)}, "not sigma, mu_s, sigma_s"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.uint8), "mu": np.zeros(5), "sigma": np.eye(5),
      "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}, "must have shapes"),
])
def test_evaluator_rejects_bad_npz_with_one_clear_error(tmp_path, arrays, message, standin_graph):
    good = tmp_path / "good.npz"
    np.savez(good, np.zeros((4, 8, 8, 3), np.uint8))
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    for argv in ([str(bad), str(good)], [str(good), str(bad)]):
        with pytest.raises(SystemExit) as raised:
            evaluator.main([*argv, "--inception-graph", standin_graph])
        text = str(raised.value.code)
        assert text.startswith("error: ") and str(bad) in text and message in text and "\n" not in text


def test_evaluator_rejects_files_that_are_not_npz(tmp_path, standin_graph):
    (tmp_path / "text.npz").write_text("not a zip")
    for path, message in [(tmp_path / "text.npz", "not an npz file"), (tmp_path / "missing.npz", "no such file")]:
        with pytest.raises(SystemExit, match=message):
            evaluator.main([str(path), str(path), "--inception-graph", standin_graph])


def test_missing_graph_is_one_clear_error_from_the_script(tmp_path):
    np.savez(tmp_path / "batch.npz", np.zeros((4, 8, 8, 3), np.uint8))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "evaluations", "evaluator.py"), str(tmp_path / "batch.npz"),
         str(tmp_path / "batch.npz")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ") and GRAPH_URL in result.stderr
    assert os.path.join(str(tmp_path), GRAPH_FILENAME) in result.stderr  # the working directory was searched


#################################################################################
#                     Inception backends on the stand-in graph                  #
#################################################################################

@pytest.fixture(scope="module")
def standin_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / GRAPH_FILENAME
    standin.write_graph(str(path))
    return str(path)


@pytest.fixture(scope="module")
def direct_features():
    return standin.DirectFeatures()


@pytest.fixture(scope="module")
def tensorflow_inception(standin_graph):
    with TensorFlowInception(standin_graph) as inception:
        yield inception


@pytest.fixture(scope="module")
def torch_inception(standin_graph):
    with TorchInception(standin_graph, "cpu") as inception:
        yield inception


def random_images(seed, count, size=32, brightness_shift=0):
    height, width = (size, size) if isinstance(size, int) else size
    images = np.random.default_rng(seed).integers(0, 256, size=(count, height, width, 3))
    return np.clip(images + brightness_shift, 0, 255).astype(np.uint8)


def assert_close_to_scale(actual, expected, tolerance):
    """Equal to `tolerance` relative to the largest magnitude of `expected` (ReLU features are
    often 0, so an elementwise relative error says little)."""
    assert actual.shape == expected.shape
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error <= tolerance, error


def test_tensorflow_backend_matches_the_graph_run_directly(tensorflow_inception, direct_features):
    np.testing.assert_array_equal(tensorflow_inception.logit_weights, standin.logit_weights())
    for images in (random_images(8, 20), random_images(9, 4, size=45)):  # the graph resizes any size
        pool, spatial = tensorflow_inception.features(images)
        expected_pool, expected_spatial = direct_features(images)
        assert pool.shape == (len(images), 2048) and spatial.shape == (len(images), 17 * 17 * 7)
        np.testing.assert_allclose(pool, expected_pool, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(spatial, expected_spatial, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("count, size", [(24, 32), (3, 299), (6, (37, 45))])  # resized up, as is, non-square
def test_torch_backend_equals_tensorflow(count, size, tensorflow_inception, torch_inception, direct_features):
    images = random_images(17, count, size)
    expected_pool, expected_spatial = tensorflow_inception.features(images)
    pool, spatial = torch_inception.features(images)
    assert pool.dtype == spatial.dtype == np.float32
    assert_close_to_scale(pool, expected_pool, 1e-4)
    assert_close_to_scale(spatial, expected_spatial, 1e-4)
    np.testing.assert_array_equal(torch_inception.logit_weights, tensorflow_inception.logit_weights)
    # The class probabilities of the Inception Score against ADM's own softmax in TensorFlow.
    probabilities = np.exp(metrics.class_log_probabilities(pool, torch_inception.logit_weights))
    assert_close_to_scale(probabilities, direct_features.class_probabilities(expected_pool), 1e-4)


@pytest.mark.parametrize("in_size, out_size", [((256, 256), (299, 299)), ((37, 45), (299, 299)),
                                               ((299, 299), (17, 30))])
@pytest.mark.parametrize("align_corners", [False, True])
def test_resize_is_tensorflow_1s_bilinear_to_the_bit(in_size, out_size, align_corners):
    images = np.random.default_rng(18).uniform(0, 255, size=(2, *in_size, 3)).astype(np.float32)
    expected = tf.compat.v1.image.resize_bilinear(images, out_size, align_corners=align_corners).numpy()
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    resized = ResizeBilinear(out_size, align_corners)(nchw).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(resized, expected)
    if not align_corners:  # PyTorch's own bilinear resize samples other positions (half-pixel centres)
        plain = torch.nn.functional.interpolate(nchw, size=out_size, mode="bilinear").permute(0, 2, 3, 1).numpy()
        assert np.abs(plain - expected).max() > 10


def write_graph_with_op_replaced(path, node_name, op):
    graph_def = standin.build_graph_def()
    next(node for node in graph_def.node if node.name == node_name).op = op
    path.write_bytes(graph_def.SerializeToString())


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("content, message", [(b"\xff" * 64, "not a TensorFlow GraphDef"),
                                              (b"", "not ADM's Inception graph")])
def test_evaluator_rejects_a_graph_that_is_not_inceptions(tmp_path, content, message, backend):
    (tmp_path / "graph.pb").write_bytes(content)
    np.savez(tmp_path / "batch.npz", np.zeros((4, 8, 8, 3), np.uint8))
    batch = str(tmp_path / "batch.npz")
    with pytest.raises(SystemExit, match=message):
        evaluator.main([batch, batch, "--inception-graph", str(tmp_path / "graph.pb"), "--backend", backend])
    assert not (tmp_path / "batch.metrics.json").exists()


def test_torch_backend_names_an_op_it_does_not_know(tmp_path):
    write_graph_with_op_replaced(tmp_path / "graph.pb", "mixed_6/conv", "Relu6")
    with pytest.raises(ValueError, match="node 'mixed_6/conv': op Relu6 is not supported"):
        TorchInception(str(tmp_path / "graph.pb"), "cpu")


@pytest.mark.parametrize("arguments, message", [
    (["--backend", "torch", "--device", "gpu"], "--device gpu"),
    (["--backend", "tensorflow", "--device", "cpu"], "--device is for the torch backend"),
])
def test_evaluator_rejects_a_device_it_cannot_use(tmp_path, standin_graph, arguments, message):
    np.savez(tmp_path / "batch.npz", np.zeros((4, 8, 8, 3), np.uint8))
    batch = str(tmp_path / "batch.npz")
    with pytest.raises(SystemExit) as raised:
        evaluator.main([batch, batch, "--inception-graph", standin_graph, *arguments])
    text = str(raised.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text


#################################################################################
#                                  End to end                                   #
#################################################################################

NUM_REFERENCE = 200
NUM_REFERENCE_KEPT = 120
NUM_SAMPLES = 150


@threadpool_limits.wrap(limits=1, user_api="blas")  # on shared cores, threaded LAPACK slows down severalfold
def test_evaluator_end_to_end_matches_independent_metrics(tmp_path, standin_graph, direct_features, capsys):
    all_reference = random_images(10, NUM_REFERENCE)
    samples = random_images(11, NUM_SAMPLES, brightness_shift=40)
    np.savez(tmp_path / "all_reference.npz", all_reference)
    np.savez_compressed(tmp_path / "samples.npz", samples)
    tensorflow = ["--inception-graph", standin_graph, "--backend", "tensorflow"]
    reference_batch.main(["--npz", str(tmp_path / "all_reference.npz"), "--out", str(tmp_path / "ref.npz"),
                          "--num-images", str(NUM_REFERENCE_KEPT), *tensorflow])
    (printed,) = evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), *tensorflow])

    # Printed as ADM prints, and recorded next to the samples.
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    recorded = json.loads((tmp_path / "samples.metrics.json").read_text())
    for label, key in [("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                       ("Precision", "precision"), ("Recall", "recall")]:
        assert float(lines[label]) == recorded[key] == printed[key]

    # The reference keeps a subset of images but statistics over all of them; FID must use those.
    with np.load(tmp_path / "ref.npz") as ref:
        kept_images = ref["arr_0"]
    kept = reference_batch.choose_subset(NUM_REFERENCE, NUM_REFERENCE_KEPT, seed=0)
    assert len(np.unique(kept)) == NUM_REFERENCE_KEPT
    np.testing.assert_array_equal(kept_images, all_reference[kept])
    reference_pool, reference_spatial = direct_features(all_reference)
    sample_pool, sample_spatial = direct_features(samples)

    fid = independent_fid(sample_pool, reference_pool)
    sfid = independent_fid(sample_spatial, reference_spatial)
    inception_score = independent_inception_score(sample_pool @ standin.logit_weights().astype(np.float64),
                                                  metrics.INCEPTION_SCORE_SPLIT)
    assert_relative(recorded["fid"], fid)
    assert_relative(recorded["sfid"], sfid)
    assert_relative(recorded["inception_score"], inception_score)
    assert fid > 0 and sfid > 0 and inception_score > 1.5

    precision_bounds, recall_bounds = independent_precision_recall_bounds(reference_pool[kept], sample_pool)
    assert_within(recorded["precision"], precision_bounds)
    assert_within(recorded["recall"], recall_bounds)
    assert (recorded["precision"], recorded["recall"]) == metrics.precision_recall(reference_pool[kept], sample_pool)


@threadpool_limits.wrap(limits=1, user_api="blas")
def test_several_sample_batches_score_as_each_alone_against_one_reference_pass(tmp_path, standin_graph, capsys):
    paths = {}
    for name, seed, count in (("ref", 30, 8), ("dim", 31, 6), ("bright", 32, 5)):
        paths[name] = str(tmp_path / f"{name}.npz")
        np.savez(paths[name], random_images(seed, count, size=16, brightness_shift=60 if name == "bright" else 0))
    graph = ["--inception-graph", standin_graph]
    alone = [evaluator.main([paths["ref"], paths[name], *graph, "--output-json", str(tmp_path / f"{name}-alone.json")])
             for name in ("dim", "bright")]
    capsys.readouterr()
    together = evaluator.main([paths["ref"], paths["dim"], paths["bright"], *graph])
    assert together == [results for (results,) in alone] and together[0]["fid"] != together[1]["fid"]
    printed = capsys.readouterr().out
    assert printed.count("reference: 8 images") == 1 and printed.count("samples: ") == 2
    for name, results in zip(("dim", "bright"), together):
        recorded = json.loads((tmp_path / f"{name}.metrics.json").read_text())
        assert {key: recorded[key] for key in results} == results and recorded["num_sample_images"] < 8
        assert f"| {paths[name]} | {results['inception_score']:.2f} | {results['fid']:.2f} |" in printed

    with pytest.raises(SystemExit, match="--output-json names the file of a single sample batch"):
        evaluator.main([paths["ref"], paths["dim"], paths["bright"], *graph, "--output-json", str(tmp_path / "x.json")])


TORCH_EVALUATOR_WITHOUT_TENSORFLOW = textwrap.dedent("""
    import runpy, sys
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    import training.evaluation  # FID during training, with the sampling functions it uses
    assert "tensorflow" not in sys.modules, "the torch backend or training's evaluation imported TensorFlow"
""")


def test_backends_give_the_same_metrics(tmp_path, standin_graph):
    np.savez(tmp_path / "reference.npz", random_images(19, 160))
    np.savez(tmp_path / "samples.npz", random_images(20, 150, size=(28, 36), brightness_shift=90))
    arguments = [str(tmp_path / "reference.npz"), str(tmp_path / "samples.npz"), "--inception-graph", standin_graph,
                 "--batch-size", "50"]
    with threadpool_limits(limits=1, user_api="blas"):
        (expected,) = evaluator.main([*arguments, "--backend", "tensorflow"])
    # The torch backend as users run it: the script, in a process that must not load TensorFlow.
    script = os.path.join(REPO_ROOT, "evaluations", "evaluator.py")
    result = subprocess.run([sys.executable, "-c", TORCH_EVALUATOR_WITHOUT_TENSORFLOW, script, *arguments,
                             "--backend", "torch", "--device", "cpu", "--output-json", str(tmp_path / "torch.json")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((tmp_path / "torch.json").read_text())
    assert recorded["backend"] == "torch"
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert_relative(recorded[key], expected[key], tolerance=1e-3)
    assert expected["fid"] > 0 and expected["inception_score"] > 1.5 and 0 < expected["precision"] < 1


def write_image_folder(root):
    """Nine images of assorted sizes and formats in two class folders, in ImageFolder order."""
    rng = np.random.default_rng(12)
    paths = []
    for index, (width, height) in enumerate([(40, 50), (64, 48), (33, 33), (100, 70), (50, 90),
                                             (36, 40), (80, 80), (45, 38), (70, 66)]):
        folder = root / ("class_a" if index < 4 else "class_b")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:02d}.{'png' if index % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_reference_batch_from_image_folder(tmp_path, standin_graph, direct_features):
    paths = write_image_folder(tmp_path / "images")
    out = tmp_path / "ref.npz"
    reference_batch.main(["--image-folder", str(tmp_path / "images"), "--image-size", "32", "--out", str(out),
                          "--num-images", "5", "--seed", "3", "--inception-graph", standin_graph,
                          "--batch-size", "4"])
    crops = np.stack([np.asarray(center_crop_arr(Image.open(path), 32)) for path in paths])
    kept = reference_batch.choose_subset(len(paths), 5, seed=3)
    with np.load(out) as ref:
        np.testing.assert_array_equal(ref["arr_0"], crops[kept])
    pool_stats, spatial_stats = read_precomputed_statistics(str(out), 2048, 17 * 17 * 7)
    for stats, features in zip((pool_stats, spatial_stats), direct_features(crops)):
        expected_mu, expected_sigma = independent_statistics(features)
        np.testing.assert_allclose(stats.mu, expected_mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.sigma, expected_sigma, rtol=1e-5, atol=1e-6)


def test_reference_batch_leaves_nothing_behind_on_an_unreadable_image(tmp_path, standin_graph):
    write_image_folder(tmp_path / "images")
    (tmp_path / "images" / "class_b" / "99.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="99.png: cannot read image"):
        reference_batch.main(["--image-folder", str(tmp_path / "images"), "--image-size", "32",
                              "--out", str(tmp_path / "ref.npz"), "--inception-graph", standin_graph])
    assert os.listdir(tmp_path) == ["images"]


def test_reference_batch_rejects_bad_arguments_before_any_work(tmp_path, standin_graph):
    np.savez(tmp_path / "images.npz", np.zeros((6, 16, 16, 3), np.uint8))
    cases = [
        (["--image-folder", str(tmp_path / "nowhere"), "--image-size", "32"], "no such folder"),
        (["--image-folder", str(tmp_path)], "needs a positive --image-size"),
        (["--npz", str(tmp_path / "images.npz"), "--image-size", "32"], "16x16, not --image-size 32"),
        (["--npz", str(tmp_path / "images.npz"), "--inception-graph", str(tmp_path / "none.pb")], GRAPH_URL),
    ]
    for arguments, message in cases:
        argv = [*arguments, "--out", str(tmp_path / "ref.npz")]
        if "--inception-graph" not in argv:
            argv += ["--inception-graph", standin_graph]
        with pytest.raises(SystemExit, match=message):
            reference_batch.main(argv)
    assert not (tmp_path / "ref.npz").exists()


def test_npz_file_with_precomputed_statistics_is_read(tmp_path):
    rng = np.random.default_rng(13)
    mu, sigma, mu_s, sigma_s = rng.random(2048), np.eye(2048), rng.random(2023), np.eye(2023)
    np.savez(tmp_path / "ref.npz", np.zeros((4, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    pool, spatial = read_precomputed_statistics(str(tmp_path / "ref.npz"), 2048, 2023)
    np.testing.assert_array_equal(pool.mu, mu)
    np.testing.assert_array_equal(spatial.sigma, sigma_s)
    np.savez(tmp_path / "plain.npz", np.zeros((4, 8, 8, 3), np.uint8))
    assert read_precomputed_statistics(str(tmp_path / "plain.npz"), 2048, 2023) is None
    with pytest.raises(NpzFormatError):
        ImageBatchFile(str(tmp_path / "plain.npz"), min_images=5)
