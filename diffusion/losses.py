"""Elementwise terms of the variational bound: the KL divergence between two Gaussians and the
log-likelihood of a Gaussian discretised to 8-bit bins on [-1, 1] (the decoder at t = 0)."""
import torch

NUM_PIXEL_BINS = 256
HALF_BIN_WIDTH = 1.0 / (NUM_PIXEL_BINS - 1)  # bin centres lie 2 / 255 apart on [-1, 1]
EDGE_BIN_THRESHOLD = 0.999  # values beyond it sit in the outermost bins, open to +-infinity


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


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-probability (nats) of the bin holding each x under N(means, exp(log_scales) ** 2).

    x must lie on the 256 bin centres of [-1, 1]; the lowest and highest bins extend to
    -infinity and +infinity. Uses the exact normal CDF, in log space, so that bins far in a
    tail keep their (tiny) probability instead of rounding to zero.
    """
    inv_stdv = torch.exp(-log_scales)
    upper = inv_stdv * (x - means + HALF_BIN_WIDTH)  # standardised bin edges
    lower = inv_stdv * (x - means - HALF_BIN_WIDTH)
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
    return torch.where(
        x < -EDGE_BIN_THRESHOLD,
        log_prob_lowest_bin,
        torch.where(x > EDGE_BIN_THRESHOLD, log_prob_highest_bin, log_prob_inner_bin),
    )
