"""Sampling from trained EDT / DiT models: checkpoint loading, the guided sampling function,
sample folder names and image output (PNGs, grids, the evaluator's npz)."""
