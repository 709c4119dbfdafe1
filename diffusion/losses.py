"""Elementwise terms of the variational bound: the KL divergence between two Gaussians and the
log-likelihood of a Gaussian discretised to 8-bit bins on [-1, 1] (the decoder at t = 0)."""
import math

import torch

NUM_PIXEL_BINS = 256
HALF_BIN_WIDTH = 1.0 / (NUM_PIXEL_BINS - 1)  # bin centres lie 2 / 255 apart on [-1, 1]
EDGE_BIN_THRESHOLD = 0.999  # values beyond it sit in the outermost bins, open to +-infinity
TANH_CDF_CUBIC = 0.044715  # the cubic term of the tanh approximation of the normal CDF
APPROX_PROB_FLOOR = 1e-12  # the approximation's bin probabilities are floored here, as released


def mean_flat(x):
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (
        logvar2 - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
        - 1.0
    )


def tanh_normal_cdf(x):
    """The standard normal CDF approximated as (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2,
    as ADM, DiT and the EDT release compute the decoder likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + TANH_CDF_CUBIC * x ** 3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales, exact=False):
    """Log-probability (nats) of the bin holding each x under N(means, exp(log_scales) ** 2).

    x must lie on the 256 bin centres of [-1, 1]; the lowest and highest bins extend to
    -infinity and +infinity. By default the released computation: the tanh approximation of
    the normal CDF, probabilities floored at 1e-12. exact=True uses the exact normal CDF in log
    space, so that bins far in a tail keep their (tiny) probability.
    """
    inv_stdv = torch.exp(-log_scales)
    upper = inv_stdv * (x - means + HALF_BIN_WIDTH)  # standardised bin edges
    lower = inv_stdv * (x - means - HALF_BIN_WIDTH)
    bin_log_probs = exact_bin_log_probs if exact else tanh_bin_log_probs
    log_prob_lowest_bin, log_prob_inner_bin, log_prob_highest_bin = bin_log_probs(lower, upper)
    return torch.where(
        x < -EDGE_BIN_THRESHOLD,
        log_prob_lowest_bin,
        torch.where(x > EDGE_BIN_THRESHOLD, log_prob_highest_bin, log_prob_inner_bin),
    )


def tanh_bin_log_probs(lower, upper):
    """log P(z < upper), log P(lower < z < upper), log P(z > lower) with the tanh CDF."""
    cdf_upper, cdf_lower = tanh_normal_cdf(upper), tanh_normal_cdf(lower)
    return (torch.log(cdf_upper.clamp(min=APPROX_PROB_FLOOR)),
            torch.log((cdf_upper - cdf_lower).clamp(min=APPROX_PROB_FLOOR)),
            torch.log((1.0 - cdf_lower).clamp(min=APPROX_PROB_FLOOR)))


def exact_bin_log_probs(lower, upper):
    """tanh_bin_log_probs with the exact normal CDF, without rounding a tail bin to zero."""
    log_prob_lowest_bin = torch.special.log_ndtr(upper)  # P(z < upper)
    log_prob_highest_bin = torch.special.log_ndtr(-lower)  # P(z > lower)
    # P(lo < z < hi) = Phi(hi) (1 - Phi(lo) / Phi(hi)), with the bin mirrored onto the lower
    # half of the line when it lies in the upper one, where Phi(hi) is far from 1.
    mirrored = lower > 0
    hi = torch.where(mirrored, -lower, upper)
    lo = torch.where(mirrored, -upper, lower)
    log_hi = torch.special.log_ndtr(hi)
    one_minus_ratio = -torch.expm1(torch.special.log_ndtr(lo) - log_hi)
    tiny = torch.finfo(one_minus_ratio.dtype).tiny  # a bin too narrow to resolve
    log_prob_inner_bin = log_hi + torch.log(one_minus_ratio.clamp(min=tiny))
    return log_prob_lowest_bin, log_prob_inner_bin, log_prob_highest_bin
