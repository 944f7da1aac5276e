"""How a run stops: with one clear line (TrainingError), or quietly because another rank stopped (PeerStopped)."""


class TrainingError(Exception):
    """Stops a run with one clear line (bad flags, missing files, diverged loss)."""


class PeerStopped(Exception):
    """Another rank stopped the run and said why; this rank exits quietly with status 1."""
