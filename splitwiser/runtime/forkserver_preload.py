"""What the fork server (``spawn.FORKSERVER``) runs before it forks its first worker: the
worker's code with torch and transformers imported, then ``gc.freeze()``. Frozen, the objects
of those imports are never visited by a worker's garbage collector, so their memory stays
shared with the server instead of being copied into every worker on its first collection."""

import atexit
import gc

import splitwiser.runtime.procs  # noqa: F401  (the worker's entry point and all it imports)

gc.freeze()
# the server's own exit collects them as usual (frozen objects would be reported as leaked by
# extension modules that check, e.g. nanobind's); a forked worker ends with os._exit
atexit.register(gc.unfreeze)
