"""Errors whose message says everything the user needs: the CLIs print them without a traceback.

Mixed into the specific error classes (a full disk, a refused file, unloadable snapshots, a data
stall, a lost peer, ...), so each keeps its natural base class (OSError, RuntimeError) for callers.
"""


class Reported(Exception):
    """An error the command line reports as one message and exit status 1."""
