"""Sample-quality evaluation with the numbers of OpenAI's ADM suite: Inception Score, FID, sFID,
precision and recall. `metrics` is pure numpy/scipy; only `inception` needs TensorFlow."""
