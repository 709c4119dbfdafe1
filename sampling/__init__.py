"""Sampling from trained EDT / DiT models: checkpoint loading, the guided sampling function
(DDPM, DDIM or diffusers' solvers), sample folder names, image output (PNGs, grids, the
evaluator's npz) and the diffusers pipeline."""
