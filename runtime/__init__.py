"""Run infrastructure shared by every script: distributed setup, checkpoint and file I/O,
EMA, logging and image transforms."""
