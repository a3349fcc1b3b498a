"""Why a training run stops with one message (the command line prints it and exits 1; the run
directory's `exit.json` says 'failed'), as opposed to the user errors found before it starts."""

from cascade_mega.errors import RunStopped


class NonFiniteError(RunStopped):
    """A step's loss or gradients were NaN / Inf under `train.nonfinite = stop`."""
