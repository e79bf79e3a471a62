"""The classes map2map derives from Dask's own, in a module of their own so that importing
`map2map.infer` does not import Dask's `distributed` (a noticeable part of a small job's start): a run
in one process never needs it, and `map2map.infer.cluster` imports this module only where it talks to a cluster."""

from __future__ import annotations

import signal
import threading
from typing import Any

from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

from map2map.infer.cluster import CLOSE_TIMEOUT
from map2map.infer.worker import WorkerState


class ClosingClient(Client):
    """A `Client` that closes itself, event-loop thread included, when it cannot start, before the error
    leaves its constructor: otherwise `Client.__del__` closes it later and, its loop gone by then, prints
    a timeout traceback at interpreter exit."""

    def start(self, **kwargs: Any) -> None:
        try:
            super().start(**kwargs)
        except BaseException:
            self.close(timeout=CLOSE_TIMEOUT)
            runner = getattr(self, "_loop_runner", None)  # close() leaves it running when the failed
            if runner is not None:                         # start already marked the client closed
                runner.stop()
            raise


class IgnoreInterrupt(WorkerPlugin):
    """Worker processes of the local cluster ignore Ctrl-C.  A terminal sends SIGINT to the whole process
    group; the client alone stops the run (closing the cluster) and says so in one line, where each worker
    would print a traceback of its own."""

    name = "m2m-ignore-interrupt"

    def setup(self, worker) -> None:
        if threading.current_thread() is threading.main_thread():  # where a nanny's worker runs its loop
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class WorkerStatePlugin(WorkerState, WorkerPlugin):
    """`WorkerState` as a Dask worker plugin (registered by `map2map.infer.cluster.register_state`): Dask
    calls its `setup` on every worker, present and future, and keeps it under its name."""
