"""Preemption: SIGTERM (what SLURM, Kubernetes and torchrun send before they kill a job)
becomes a request to checkpoint at the next step boundary and stop, agreed by every process.

The handler only sets a flag. Each step carries it in the all-reduce that checks the step
(training/guard.py), so all processes stop after the same step even when only one of them was
signalled, and the checkpoint they write together is complete.
"""
import signal
import threading

PREEMPTION_SIGNALS = (signal.SIGTERM,)


class PreemptionWatch:
    """A context manager that installs the handler (main thread only) and restores the
    previous one on exit."""

    def __init__(self):
        self.received = None  # the signal number once one arrived
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in PREEMPTION_SIGNALS:
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def handle(self, signum, frame):
        self.received = signum

    @property
    def requested(self):
        """This process has received a preemption signal."""
        return self.received is not None


def ignore_preemption_in_worker(worker_id):
    """DataLoader worker_init_fn: SLURM signals every process of a job, and a data worker
    killed by it would fail the step the main process still has to finish and checkpoint.
    Workers exit on their own when the main process shuts the loader down or dies."""
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
