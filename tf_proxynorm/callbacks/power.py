"""The power decomposition of a normalized activation (Proxy Norm spec, section 8), streamed.

For the output `y` of a normalization (before any affine), with expectations over the
inputs `x` of a data set, the positions `a` and the channels `c`:

```python
P(y) = E_{x,a,c}[y^2]                                    # power
     = E_c[mu_c^2]                 # (1) channel-wise constant part  -> collapse (LN)
     + E_c[Var_x(mu_{x,c})]        # (2) variability of instance means -> 0 under IN
     + E_c[E_x(s2_{x,c})]          # (3) within-instance variation
mu_{x,c} = E_a[y_{a,c}(x)],  s2_{x,c} = Var_a[y_{a,c}(x)],  mu_c = E_x[mu_{x,c}]
collapse = (1) / P,   mean_var = (2) / P
scale_var = E_c[Var_x(s_{x,c})] / E_c[E_x(s_{x,c})^2],   s_{x,c} = sqrt(s2_{x,c})
```

The data set is streamed: `instance_statistics` reduces a batch to per-(example, channel)
statistics in `keras.ops`, on any backend (float32 at least, with the package's one
statistics helper), and `PowerAccumulator` merges them in float64 NumPy per channel
(count, mean and sum of squared deviations merged with Chan's formula), so memory does not
grow with the data set and the identity (1) + (2) + (3) = P holds to float32 rounding of
the per-example statistics.
"""

import numpy as np
from keras import ops

from tf_proxynorm.ops.stats import channel_axis, moments, stats_dtype

# Names of the scalars `PowerAccumulator.result` returns, in display order.
POWER_METRICS = ("power", "constant", "instance_mean", "within", "collapse", "mean_var",
                 "scale_var")


def instance_statistics(y, axis=-1):
    """Per-(example, channel) mean, variance and mean square of `y` over its positions.

    Args:
        y: tensor of rank >= 2, examples on axis 0 and channels on `axis`.
        axis: the channel axis.

    Returns:
        A tuple `(mean, var, mean_square)` of `(N, C)` tensors in float32 (float64 for
        float64 input). For a rank-2 input each example has one position: `var` is 0.
    """
    y = ops.convert_to_tensor(y)
    rank = len(y.shape)
    if rank < 2:
        raise ValueError(
            "`y` must have rank >= 2 (examples, ..., channels). "
            f"Received: y with shape {getattr(y, 'shape', None)}")
    axis = channel_axis(rank, axis)
    if axis == 0:
        raise ValueError(f"`axis` must not be the example axis 0. Received: axis={axis}")
    y = ops.cast(y, stats_dtype(y.dtype))
    # (N, positions..., C): channels last, then reduce every middle axis.
    if axis != rank - 1:
        y = ops.transpose(y, [0] + [a for a in range(1, rank) if a != axis] + [axis])
    positions = list(range(1, rank - 1))
    if not positions:
        return y, ops.zeros_like(y), ops.square(y)
    mean, var = moments(y, positions)
    return mean, var, ops.mean(ops.square(y), axis=positions)


class _RunningMoments:
    """Per-channel count, mean and sum of squared deviations, merged with Chan's formula."""

    def __init__(self):
        self.count = 0
        self.mean = None
        self.m2 = None

    def update(self, values):
        values = np.asarray(values, np.float64)
        n = values.shape[0]
        if n == 0:
            return
        mean = values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    @property
    def variance(self):
        return self.m2 / self.count


class PowerAccumulator:
    """Streams the power decomposition of one normalized activation over a data set.

    ```python
    acc = PowerAccumulator()
    for x in dataset:
        acc.update(*instance_statistics(normalized(x)))   # per-(example, channel) stats
    acc.result()   # {"power", "constant", "instance_mean", "within", "collapse", ...}
    ```

    Memory is O(channels): per channel it keeps the running mean and squared deviations
    of the instance means and of the instance standard deviations, and the sums of the
    instance variances and of the mean squares (the power, measured directly so that the
    identity (1) + (2) + (3) = P can be checked).
    """

    def __init__(self):
        self._means = _RunningMoments()
        self._stds = _RunningMoments()
        self._var_sum = None
        self._square_sum = None

    @property
    def count(self):
        """Number of examples seen."""
        return self._means.count

    def update(self, mean, var, mean_square):
        """Adds a batch of per-(example, channel) statistics, each of shape `(N, C)`."""
        mean, var, mean_square = (np.asarray(v, np.float64) for v in (mean, var, mean_square))
        if not mean.shape == var.shape == mean_square.shape or mean.ndim != 2:
            raise ValueError(
                "`mean`, `var` and `mean_square` must have the same shape (N, C). Received: "
                f"shapes {mean.shape}, {var.shape}, {mean_square.shape}")
        if self._var_sum is not None and mean.shape[1] != self._var_sum.shape[0]:
            raise ValueError(
                f"Expected statistics of {self._var_sum.shape[0]} channels. "
                f"Received: {mean.shape[1]} channels")
        var = np.maximum(var, 0.0)
        self._means.update(mean)
        self._stds.update(np.sqrt(var))
        var_sum, square_sum = var.sum(axis=0), mean_square.sum(axis=0)
        if self._var_sum is None:
            self._var_sum, self._square_sum = var_sum, square_sum
        else:
            self._var_sum += var_sum
            self._square_sum += square_sum

    def channel_means(self):
        """`mu_c`, the per-channel mean over the data set, as a float64 `(C,)` array."""
        self._check_nonempty()
        return self._means.mean.copy()

    def result(self):
        """The decomposition as a dict of Python floats (keys `POWER_METRICS`).

        `power` is E[y^2] measured directly; `constant`, `instance_mean` and `within` are
        parts (1), (2), (3); `collapse` = (1)/P, `mean_var` = (2)/P; `scale_var` is the
        instance-scale variability. Ratios are NaN when their denominator is 0.
        """
        self._check_nonempty()
        n = self.count
        power = float(np.mean(self._square_sum / n))
        constant = float(np.mean(self._means.mean ** 2))
        instance_mean = float(np.mean(self._means.variance))
        within = float(np.mean(self._var_sum / n))
        std_mean_sq = float(np.mean(self._stds.mean ** 2))
        ratio = lambda a, b: a / b if b > 0 else float("nan")  # noqa: E731
        return {
            "power": power,
            "constant": constant,
            "instance_mean": instance_mean,
            "within": within,
            "collapse": ratio(constant, power),
            "mean_var": ratio(instance_mean, power),
            "scale_var": ratio(float(np.mean(self._stds.variance)), std_mean_sq),
        }

    def _check_nonempty(self):
        if self.count == 0:
            raise ValueError("PowerAccumulator has seen no example; call `update` first.")
