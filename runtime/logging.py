"""Run logging: the main process writes to stdout and `log.txt`; the others stay silent."""
import logging
import os
import sys

LOGGER_NAME = "edt"
LOG_FORMAT = "[%(asctime)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def create_logger(log_dir, is_main):
    """Returns the run's logger; calling it again (a second run in one process) replaces the
    handlers of the first instead of duplicating every line."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False

    if not is_main:
        logger.addHandler(logging.NullHandler())
        return logger

    os.makedirs(log_dir, exist_ok=True)
    formatter = logging.Formatter(LOG_FORMAT, datefmt=DATE_FORMAT)
    for handler in (logging.StreamHandler(sys.stdout),
                    logging.FileHandler(os.path.join(log_dir, "log.txt"))):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger
