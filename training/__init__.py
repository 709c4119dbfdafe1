"""Training: configuration from the command line and the features manifest, run setup,
data order, the masked training step, the loop and the resumable TrainState."""
