"""Errors about the model a user named, shared by the modules that inspect it (the CLI reports
them in one line)."""


class UnsupportedModelError(ValueError):
    """A model whose structure awqkit cannot quantize: no decoder blocks, no linears, unknown experts."""




class NonFiniteError(ValueError):
    """A weight, a statistic or an error that is NaN or infinite: never silently searched past."""
