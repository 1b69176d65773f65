"""The one exception of the fused-op machinery."""


class BuildError(RuntimeError):
    """The library could not be built or loaded; the message says why and what to do."""
