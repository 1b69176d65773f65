"""The exceptions of the fused-op machinery."""


class BuildError(RuntimeError):
    """The library could not be built or loaded; the message says why and what to do."""


class BuildInterrupted(BuildError):
    """A compiler was stopped by a signal (Ctrl-C, SIGTERM, SIGKILL, the out-of-memory
    killer): nothing is wrong with the set-up, so the build is not recorded as failed and
    the next attempt compiles again."""
