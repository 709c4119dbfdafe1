"""Sample-quality evaluation with the numbers of OpenAI's ADM suite: Inception Score, FID, sFID,
precision and recall. `metrics` is pure numpy/scipy; the Inception graph runs through PyTorch
(`torch_inception`, no TensorFlow) or TensorFlow (`tf_inception`)."""
