"""awqkit's own errors; the CLI reports each in one line."""


class UnsupportedModelError(ValueError):
    """A model whose structure awqkit cannot quantize: no decoder blocks, no linears, unknown experts."""


class NonFiniteError(ValueError):
    """A weight, a statistic or an error that is NaN or infinite: never silently searched past."""


class WorkerStopped(RuntimeError):
    """A collective failed: another worker of the run stopped (killed, out of memory, an error)."""
