"""The metrics of ADM's evaluation suite on Inception features, in numpy and scipy only.

Nothing here imports TensorFlow, so any part of the repository (e.g. a quickstart with its own
classifier) can reuse the Frechet distance and the feature statistics.
"""
import warnings
from typing import NamedTuple

import numpy as np
from scipy import linalg
from scipy.linalg import lapack
from scipy.special import logsumexp

# ADM's constants.
INCEPTION_SCORE_SPLIT = 5000     # the Inception Score is averaged over splits of this many samples
NEIGHBOURHOOD_SIZE = 3           # k of the k-nearest-neighbour manifold estimate
MIN_MANIFOLD_SIZE = NEIGHBOURHOOD_SIZE + 1  # each vector needs k neighbours besides itself
DISTANCE_BATCH_SIZE = 10000      # rows and columns per block of pairwise distances
STATISTICS_CHUNK_ROWS = 1024     # feature rows gathered before a covariance update


#################################################################################
#                          Feature Statistics and FID                           #
#################################################################################

class FeatureStatistics(NamedTuple):
    mu: np.ndarray     # (D,)
    sigma: np.ndarray  # (D, D), unbiased covariance as np.cov computes it


def feature_statistics(features):
    """Mean and covariance of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    return FeatureStatistics(features.mean(axis=0), np.cov(features, rowvar=False))


class RunningStatistics:
    """Mean and covariance of features that arrive in batches, without keeping them all.

    Batches are gathered into chunks of `chunk_rows` rows, and chunks are merged with Chan et
    al.'s pairwise update of the mean and the centred scatter matrix, which stays accurate in
    float64 where sum(x x^T) - n mu mu^T would cancel. Chunking amortises the (D, D) update.
    """

    def __init__(self, dim, chunk_rows=STATISTICS_CHUNK_ROWS):
        self.chunk_rows = chunk_rows
        self.count = 0
        self.mean = np.zeros(dim)
        self.scatter = np.zeros((dim, dim))
        self._pending = []
        self._pending_rows = 0

    def update(self, features):
        self._pending.append(np.asarray(features, dtype=np.float64))
        self._pending_rows += len(features)
        if self._pending_rows >= self.chunk_rows:
            self._merge_pending()

    def _merge_pending(self):
        if self._pending_rows == 0:
            return
        chunk = np.concatenate(self._pending)  # (N, D)
        self._pending, self._pending_rows = [], 0
        chunk_count = len(chunk)
        chunk_mean = chunk.mean(axis=0)
        centred = chunk - chunk_mean
        delta = chunk_mean - self.mean
        total = self.count + chunk_count
        self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * chunk_count / total)
        self.mean += delta * (chunk_count / total)
        self.count = total

    def statistics(self):
        self._merge_pending()
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return FeatureStatistics(self.mean.copy(), self.scatter / (self.count - 1))


def _matrix_sqrt(matrix):
    """scipy's sqrtm, or None where it fails. ADM asks it for disp=False, i.e. no message about
    singular input; scipy >= 1.16 warns instead (and deprecates disp), so the warning is
    silenced. The square root is the same."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        try:
            return linalg.sqrtm(matrix)
        except linalg.LinAlgError:
            return None


def _psd_root(sigma):
    """(A (D, r), r): sigma = A A^T, r its numerical rank, from LAPACK's Cholesky factorisation
    with complete pivoting (dpstrf; it stops where the rest of the diagonal is below
    D * eps * the largest entry)."""
    factor, pivots, rank, _ = lapack.dpstrf(sigma, lower=1)
    lower = np.tril(factor)[:, :rank]  # P^T sigma P = L L^T
    root = np.empty_like(lower)
    root[pivots - 1] = lower           # sigma = (P L) (P L)^T
    return root, rank


def trace_sqrt_product(sigma1, sigma2):
    """tr sqrt(sigma1 sigma2), by scipy's sqrtm as in ADM where that is stable.

    sigma1 sigma2 has real non-negative eigenvalues, so sqrtm returns a real matrix when it is
    accurate. For a singular covariance (fewer samples than features) its eigenvalues are at
    round-off, sqrtm turns complex and its trace errs by about the square root of round-off, which
    can turn a batch against itself negative. There, and wherever sqrtm fails or turns complex
    or non-finite, the trace comes from the symmetric product instead: with sigma1 = A A^T and
    sigma2 = B B^T, the eigenvalues of sigma1 sigma2 are those of B^T sigma1 B, the squared
    singular values of A^T B (r1 x r2), whose sum is the trace, with no square root of round-off."""
    root1, rank1 = _psd_root(sigma1)
    root2, rank2 = _psd_root(sigma2)
    if rank1 == rank2 == len(sigma1):
        covmean = _matrix_sqrt(sigma1 @ sigma2)
        if covmean is not None and not np.iscomplexobj(covmean) and np.isfinite(covmean).all():
            return float(np.trace(covmean))
    return float(np.linalg.svd(root1.T @ root2, compute_uv=False).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between two Gaussians as ADM (and TTUR) define it:
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)), never NaN or complex."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(array).all() for array in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("the feature statistics are not finite (NaN or infinite features)")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def statistics_distance(stats1, stats2):
    """Frechet distance between two FeatureStatistics."""
    return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)


#################################################################################
#                               Inception Score                                 #
#################################################################################

def log_softmax(logits):
    """Log-probabilities (N, K) of logits (N, K), in float64, so a vanishing probability
    contributes 0 to the score instead of nan."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits - logsumexp(logits, axis=1, keepdims=True)


def class_log_probabilities(pool_features, logit_weights):
    """log p(y|x) (N, K) as ADM's Inception Score takes it: the softmax of pool_3 features
    (N, 2048) times the logits' weight matrix (2048, K), without the graph's biases."""
    return log_softmax(np.asarray(pool_features, np.float64) @ np.asarray(logit_weights, np.float64))


def inception_score_from_log_probabilities(log_probs):
    """exp(E_x KL(p(y|x) || p(y))) of one split; log_probs (N, K)."""
    probs = np.exp(log_probs)
    log_marginal = np.log(probs.mean(axis=0, keepdims=True))       # (1, K)
    kl = np.sum(probs * (log_probs - log_marginal), axis=1)         # (N,)
    return float(np.exp(kl.mean()))


def inception_score(pool_features, logit_weights, split_size=INCEPTION_SCORE_SPLIT):
    """ADM's Inception Score of pool_3 features (N, 2048), per split of `split_size` samples,
    averaged over splits."""
    scores = [
        inception_score_from_log_probabilities(class_log_probabilities(pool_features[start:start + split_size],
                                                                       logit_weights))
        for start in range(0, len(pool_features), split_size)
    ]
    return float(np.mean(scores))


#################################################################################
#                     Precision and Recall (k-NN manifolds)                     #
#################################################################################

def _squared_distances(u, v, dtype):
    """Pairwise squared distances (len(u), len(v)) from |u|^2 - 2 u.v + |v|^2. Features are
    rounded to `dtype`; norms and inner products accumulate in float32 and are rounded to
    `dtype`, and the sum is taken in `dtype`."""
    with np.errstate(over="ignore", invalid="ignore"):  # float16 overflow gives inf or nan, caught by the caller
        u = np.asarray(u).astype(dtype).astype(np.float32)
        v = np.asarray(v).astype(dtype).astype(np.float32)
        norm_u = np.square(u).sum(axis=1).astype(dtype)[:, None]  # (U, 1)
        norm_v = np.square(v).sum(axis=1).astype(dtype)[None, :]  # (1, V)
        inner = (u @ v.T).astype(dtype)                           # (U, V)
        return np.maximum(norm_u - 2 * inner + norm_v, 0)


def pairwise_squared_distances(u, v):
    """Squared Euclidean distances as ADM computes them: in float16, or in float32 for a block
    whose float16 result overflows. Returns float32 (len(u), len(v))."""
    distances = _squared_distances(u, v, np.float16)
    if not np.isfinite(distances).all():
        distances = _squared_distances(u, v, np.float32)
    return distances.astype(np.float32)


def _blocks(count, batch_size):
    return [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def manifold_radii(features, k=NEIGHBOURHOOD_SIZE, batch_size=DISTANCE_BATCH_SIZE):
    """Squared distance from each feature vector to its k-th nearest neighbour in the set (the
    vector itself, at distance 0, is the 0-th). Only the k + 1 smallest distances of each row
    are kept across column blocks, so memory stays at one block."""
    if len(features) <= k:
        raise ValueError(f"a {k}-nearest-neighbour manifold needs more than {k} feature vectors, got {len(features)}")
    radii = np.empty(len(features), dtype=np.float32)
    for rows in _blocks(len(features), batch_size):
        nearest = np.empty((rows.stop - rows.start, 0), dtype=np.float32)  # (R, <= k + 1)
        for cols in _blocks(len(features), batch_size):
            candidates = np.concatenate([nearest, pairwise_squared_distances(features[rows], features[cols])], axis=1)
            kth = min(k, candidates.shape[1] - 1)
            nearest = np.partition(candidates, kth, axis=1)[:, :k + 1]
        radii[rows] = np.partition(nearest, k, axis=1)[:, k]
    return radii


def precision_recall(reference, samples, k=NEIGHBOURHOOD_SIZE, batch_size=DISTANCE_BATCH_SIZE):
    """Improved precision and recall (Kynkaanniemi et al.) as in ADM: precision is the share of
    samples inside the reference manifold (union of k-NN balls), recall the share of reference
    vectors inside the sample manifold."""
    reference_radii = manifold_radii(reference, k, batch_size)
    sample_radii = manifold_radii(samples, k, batch_size)
    reference_covered = np.zeros(len(reference), dtype=bool)
    samples_covered = np.zeros(len(samples), dtype=bool)
    for rows in _blocks(len(reference), batch_size):
        for cols in _blocks(len(samples), batch_size):
            distances = pairwise_squared_distances(reference[rows], samples[cols])  # (R, C)
            reference_covered[rows] |= (distances <= sample_radii[None, cols]).any(axis=1)
            samples_covered[cols] |= (distances <= reference_radii[rows, None]).any(axis=0)
    return float(samples_covered.mean()), float(reference_covered.mean())
