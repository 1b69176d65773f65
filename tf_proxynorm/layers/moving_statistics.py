"""Moving statistics: the one place where batch-statistics layers switch and update.

Every layer of the package that normalizes with batch statistics (`BatchNormAct`,
`InstanceEnhancementBatchNormalization`, `BatchGroupNormalization`, `EvoNormB0`,
`CBNConv2D`) owns a `MovingStatistics` and asks it which statistics to use. The semantics
are those of Keras' `BatchNormalization`:

- batch statistics are used, and the moving averages updated, only when the layer is
  called with `training=True` AND is `trainable` (a frozen layer, `trainable=False`, runs
  in inference mode even inside `fit`, as Keras does for fine-tuning);
- otherwise the moving averages are used and nothing changes;
- the update is `moving = moving * momentum + batch * (1 - momentum)`;
- the moving averages are float32 non-trainable weights (under mixed precision too),
  created on the layer itself with the given names
  (`moving_mean`, `moving_variance`), so checkpoints and `.keras` files see plain layer
  weights;
- batch statistics across the replicas of a `tf.distribute` strategy (`synchronized=True`)
  are computed by `tf_proxynorm.ops.stats.moments(..., synchronized=True)`; layers pass
  the flag through, this class only stores and updates.

```python
stats = layer.moving_statistics
mean, var = stats.select(training, lambda: moments(x, axes), update=True)
```
"""

import keras
from keras import ops


class MovingStatistics:
    """Moving averages of a layer's batch statistics and its training/inference switch.

    Args:
        layer: the Keras layer that owns the weights (`trainable` is read from it).
        names: the weight names, in the order the statistics are passed and returned,
            e.g. `("moving_mean", "moving_variance")`.
        momentum: momentum of the moving averages, in [0, 1].
        initializers: the initializer of each name (anything `keras.initializers.get`
            takes); defaults zeros for a mean, ones otherwise.
    """

    def __init__(self, layer, names=("moving_mean", "moving_variance"), momentum=0.99,
                 initializers=None):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"`momentum` must be in [0, 1]. Received: momentum={momentum}")
        self._layer = layer
        self.names = tuple(names)
        self.momentum = float(momentum)
        initializers = initializers or {}
        self.initializers = {
            name: keras.initializers.get(
                initializers.get(name, "zeros" if name.endswith("mean") else "ones"))
            for name in self.names}

    def build(self, shape):
        """Creates the moving averages, of `shape`, as non-trainable float32 layer weights."""
        for name in self.names:
            setattr(self._layer, name, self._layer.add_weight(
                name=name, shape=tuple(shape), initializer=self.initializers[name],
                trainable=False, autocast=False, dtype="float32"))

    @property
    def variables(self):
        """The moving averages, in the order of `names`."""
        return tuple(getattr(self._layer, name) for name in self.names)

    def uses_batch(self, training):
        """Whether a call with `training` normalizes with batch statistics."""
        return bool(training) and self._layer.trainable

    def select(self, training, batch_statistics, update=True, count=None):
        """The statistics to normalize with.

        Args:
            training: the layer's `training` call argument.
            batch_statistics: a callable returning the batch statistics, one tensor per
                name; it is only called when they are used.
            update: whether using the batch statistics also updates the moving averages
                (`False` to read a layer's normalized output without changing it).
            count: optional number of elements the batch statistics were measured on (a
                scalar): with none (an empty batch, or every element masked) the moving
                averages stay as they are.

        Returns:
            A tuple of tensors: the batch statistics, or the moving averages.
        """
        if not self.uses_batch(training):
            return self.variables
        batch = tuple(batch_statistics())
        if update:
            self.update(batch, count)
        return batch

    def update(self, batch, count=None):
        """`moving = moving * momentum + batch * (1 - momentum)` for each statistic
        (unchanged when `count`, the number of elements measured, is 0)."""
        for moving, value in zip(self.variables, batch, strict=True):
            old = ops.convert_to_tensor(moving)
            new = old * self.momentum + ops.cast(value, old.dtype) * (1.0 - self.momentum)
            if count is not None:
                new = ops.where(ops.greater(count, 0), new, old)
            moving.assign(new)

    def config(self):
        """The Keras config entries: `momentum` and one `<name>_initializer` per name."""
        return {"momentum": self.momentum, **{
            f"{name}_initializer": keras.initializers.serialize(self.initializers[name])
            for name in self.names}}
