"""Type checks of the layers' bool and int constructor arguments, with Keras-style errors.

`bool(x)` would turn any non-empty string on (`proxy_norm="no"` is True) and `int(x)` would
truncate `2.5`; the layers instead accept exactly the types that cannot mean something
else: Python and NumPy bools for flags, Python and NumPy integers (not bools) for counts.
The value is returned as a Python `bool` / `int`, so configs stay JSON-serializable.

```python
self.proxy_norm = check_bool("proxy_norm", proxy_norm)
# ValueError: `proxy_norm` must be a bool. Received: proxy_norm='no'
self.groups = check_int("groups", groups, lambda g: g >= 1 or g == -1, "a positive int or -1")
```
"""

import numpy as np


def check_bool(name, value):
    """`value` as a Python bool; a ValueError naming `name` unless it is a (NumPy) bool.

    Args:
        name: the argument's name, as the error shows it.
        value: the value the layer received.

    Returns:
        `bool(value)`.

    Raises:
        ValueError: for anything but `True`, `False` and NumPy bools (strings, numbers,
            None).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"`{name}` must be a bool. Received: {name}={value!r}")


def check_int(name, value, condition=None, requirement="an int", allow_none=False):
    """`value` as a Python int; a ValueError naming `name` for another type or range.

    Args:
        name: the argument's name, as the error shows it.
        value: the value the layer received.
        condition: optional `int -> bool`, the allowed range (e.g. `lambda v: v >= 1`).
        requirement: what the error says the argument must be (e.g. "a positive int").
        allow_none: whether None is accepted (and returned).

    Returns:
        `int(value)`, or None when `allow_none` and `value` is None.

    Raises:
        ValueError: for bools, floats (`2.0` too), strings and other non-integers, and
            for integers outside `condition`.
    """
    if value is None and allow_none:
        return None
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not is_int or (condition is not None and not condition(int(value))):
        raise ValueError(f"`{name}` must be {requirement}. Received: {name}={value!r}")
    return int(value)
