"""User switches: which implementation `implementation="auto"` means.

The environment variable `TF_PROXYNORM_IMPLEMENTATION` (`auto`, `fused` or `reference`)
sets the global default; `set_implementation()` changes it at run time. A layer's own
`implementation="fused"` or `"reference"` argument always wins over the global default.
"""

import contextlib
import os

IMPLEMENTATIONS = ("auto", "fused", "reference")
ENV_VAR = "TF_PROXYNORM_IMPLEMENTATION"

_override = None


def validate_implementation(implementation, arg_name="implementation"):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"`{arg_name}` must be one of {IMPLEMENTATIONS}. Received: {arg_name}={implementation!r}"
        )
    return implementation


def set_implementation(implementation):
    """Sets the global default used by layers created with `implementation="auto"`.

    `None` goes back to the environment variable (or `"auto"` when it is unset).
    """
    global _override
    _override = None if implementation is None else validate_implementation(implementation)


def get_implementation():
    """The global default: `set_implementation()`, else the environment variable, else "auto"."""
    if _override is not None:
        return _override
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    return validate_implementation(value, ENV_VAR)


def resolve(implementation):
    """A layer's `implementation` argument combined with the global default."""
    return get_implementation() if implementation == "auto" else implementation


@contextlib.contextmanager
def use_implementation(implementation):
    """Sets the global default inside a `with` block and restores the previous one after.

    Example: `with use_implementation("reference"): model.export(path)`.
    """
    global _override
    previous = _override
    set_implementation(implementation)
    try:
        yield
    finally:
        _override = previous
