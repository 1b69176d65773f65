"""Cross-Iteration Batch Normalization (CBN): BatchNorm over the last k iterations.

CBN averages the batch statistics of the current and the `window_size - 1` previous
training steps, after a first-order Taylor compensation of each previous statistic to the
current kernel of the convolution that produced the input. It therefore needs that
convolution: the layer that does the work is `CBNConv2D`, a `Conv2D` and CBN (and an
optional activation) in one layer.

Wiring CBN in a model builder
-----------------------------
`get_norm_act_layer("cbn", ...)` returns a `CrossIterationBatchNormalization`: a layer
that holds the CBN arguments but cannot run on its own (building it raises). A builder
that writes "convolution, then norm" must pass both layers through `conv_norm_layers`:

```python
conv = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")
norm = make_norm(activation="relu", name=f"{name}_norm")   # resolve_norm_act(norm_name)
for layer in tfpn.layers.conv_norm_layers(conv, norm):
    x = layer(x)
```

For every other norm `conv_norm_layers` returns `[conv, norm]` unchanged. For CBN it
returns `[norm.bind_conv(conv)]`, one `CBNConv2D` with the conv's arguments and name and
the norm's CBN arguments (the conv must be a plain, unbuilt `keras.layers.Conv2D` with no
activation, and the norm's `axis` must match its `data_format`). CBN therefore fits
post-activation blocks (conv -> norm), not pre-activation ones whose norm reads a sum of
branches; a builder should refuse `"cbn"` there.

Choices
-------
- Invalid compensated statistics follow the paper's rule `nu <- max(nu, mu^2)` (a
  compensated variance below 0 is clamped to 0), not the official code's rule of
  discarding the window entry; the result is never a negative variance.
- The statistics are stored as mean and variance (with d mean/dW, d var/dW), the
  equivalent `nu = var + mu^2`, `d nu = d var + 2 mu d mu` parameterization of the
  paper's (mu, nu) that keeps float32 precision for inputs with a large mean.
- d var/dW comes from the backend's autodiff on the layer's own convolution (one extra
  backward-filter convolution per training step): a `tf.GradientTape` on the forward
  conv on TensorFlow, `jax.grad` of the statistics on JAX (which traces the forward
  conv again), `torch.autograd.grad` on PyTorch. d mean_c/dW[..., c] is the mean input patch, the same for every filter of
  a conv group: it comes from a probe convolution with one filter per group and is
  stored at that size. Both are skipped during burn-in.
- Backends: TensorFlow and JAX (eager and compiled), PyTorch (eager). On the backends
  without autodiff (Keras' numpy, openvino), `window_size > 1` raises a
  `NotImplementedError` at construction; `window_size=1` is BatchNorm in `keras.ops` and
  runs anywhere.
- Burn-in as the official code: plain BN with batch statistics for the first
  `burnin_steps` training steps, then the window grows from 1 to `window_size`.
- Normalization as Keras BN (biased variance, epsilon inside the square root) in every
  phase; the official code divides by `std + eps` and uses the unbiased variance in burn-in.
- A conv bias, if any, is compensated exactly (`d mean/d b = 1`, `d var/d b = 0`).
"""

import keras
import tensorflow as tf
from keras import ops

from tf_proxynorm import _backend
from tf_proxynorm.layers._args import check_bool, check_int
from tf_proxynorm.layers.affine import AffineAct
from tf_proxynorm.layers.moving_statistics import MovingStatistics
from tf_proxynorm.ops import norm_act as norm_act_ops
from tf_proxynorm.ops.stats import moments, stats_dtype

CBN_WINDOW_SIZE = 4
CBN_EPSILON = 1e-5
CBN_MOMENTUM = 0.9

_register = keras.saving.register_keras_serializable(package="tf_proxynorm")


def _check_cbn_arguments(window_size, rho, burnin_steps, momentum, epsilon):
    """Checks the CBN arguments; returns `(window_size, burnin_steps)` as Python ints."""
    window_size = check_int(
        "window_size", window_size, lambda w: w >= 1,
        "an int >= 1 (the current step and window_size - 1 previous ones)")
    backend = keras.backend.backend()
    if window_size > 1 and backend not in _backend.GRADIENT_BACKENDS:
        raise NotImplementedError(
            "CBN with window_size > 1 takes the gradient of its convolution's statistics "
            "with respect to the kernel, which is implemented for the TensorFlow, JAX and "
            f"PyTorch backends only. Received: backend={backend!r}, window_size={window_size}. "
            "Use KERAS_BACKEND=tensorflow, jax or torch, or window_size=1 (plain BatchNorm).")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or rho < 0:
        raise ValueError(f"`rho` must be a number >= 0. Received: rho={rho!r}")
    burnin_steps = check_int("burnin_steps", burnin_steps, lambda b: b >= 0, "an int >= 0")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"`momentum` must be in [0, 1]. Received: momentum={momentum}")
    if not epsilon > 0:
        raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon}")
    return window_size, burnin_steps


@_register
class CBNConv2D(keras.layers.Conv2D):
    """2D convolution followed by Cross-Iteration Batch Normalization and an activation.

    In training (`training=True` and the layer `trainable`), the convolution output `x` is
    normalized with statistics pooled over the current batch and the previous
    `window_size - 1` training steps. Each previous mean `mu` and second moment `nu` is
    moved to the current kernel `W` by a first-order Taylor step with the derivatives
    stored at its own step. Gradients flow only through the current step's statistics:
    the buffers, the old kernels and the compensation are constants. In inference the
    moving averages of the current batch statistics are used, exactly as BatchNorm.

    ```python
    mu_t, var_t = moments of x = conv(inputs, W_t) over (batch, positions), per channel
    for the previous steps tau (valid ones only):
        d_mu  = rho * <d mu_tau / dW, W_t - W_tau>     (+ rho * (b_t - b_tau) with a bias)
        d_var = rho * <d var_tau / dW, W_t - W_tau>
        mu_tau' = mu_tau + d_mu;   var_tau' = max(var_tau + d_var - d_mu^2, 0)
    mu_bar  = mean(mu_t, mu_tau')
    var_bar = mean(var_t, var_tau') + mean((mu - mu_bar)^2)      # = mean(max(nu, mu^2)) - mu_bar^2
    out = activation(gamma * (x - mu_bar) / sqrt(var_bar + epsilon) + beta)
    moving = momentum * moving + (1 - momentum) * (mu_t, var_t)  # current batch only
    ```

    See the module docstring for the choices made where the paper and the official code
    differ, and for wiring CBN through the norm factory (`"cbn"`).

    Args:
        filters, kernel_size, strides, padding, data_format, dilation_rate, groups,
            kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer,
            activity_regularizer, kernel_constraint, bias_constraint: as
            `keras.layers.Conv2D`.
        use_bias: defaults to False (a bias before a normalization is redundant; when
            used, its changes are compensated exactly).
        activation: applied after the normalization and affine (not after the conv).
            Defaults to None.
        window_size: number of steps `k` pooled (current + `k - 1` previous). 1 is BN.
            Defaults to 4. `k > 1` needs the TensorFlow or JAX backend (the kernel
            gradient of the statistics is taken with the backend's autodiff).
        rho: scale of the Taylor compensation; 0 is the uncompensated ("naive") CBN.
            Defaults to 1.
        burnin_steps: training steps of plain BN before pooling starts. Defaults to 0.
        momentum: momentum of the moving averages. Defaults to 0.9.
        epsilon: added to the variance. Defaults to 1e-5.
        center, scale: whether the layer owns `beta` / `gamma`.
        {beta,gamma,moving_mean,moving_variance}_initializer: zeros, ones, zeros, ones.
        {beta,gamma}_regularizer, {beta,gamma}_constraint: optional.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: a 4D tensor, as `keras.layers.Conv2D`.
        training: whether to use the cross-iteration statistics (and update the
            moving averages, the buffers and the step counter).

    Returns:
        The normalized convolution output in the layer's compute dtype.

    State (non-trainable weights, saved in checkpoints and `.keras` files): `moving_mean`,
    `moving_variance`, and when `window_size > 1`: `step`, `buffer_mean`,
    `buffer_variance`, `buffer_bias` (with a bias) `(k - 1, filters)`,
    `buffer_variance_grad`, `buffer_kernel` `(k - 1, *kernel.shape)`, and
    `buffer_mean_grad` `(k - 1, kh, kw, C_in / groups, groups)` (the mean input patch).

    Reference:
        - [Yao et al., 2021](https://arxiv.org/abs/2002.05712), Cross-Iteration Batch
          Normalization.

    Example:

    >>> layer = CBNConv2D(16, 3, padding="same", activation="relu", window_size=4)
    >>> layer(np.random.normal(size=(2, 8, 8, 3)), training=True).shape
    TensorShape([2, 8, 8, 16])
    """

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", data_format=None,
                 dilation_rate=(1, 1), groups=1, activation=None, use_bias=False,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, activity_regularizer=None,
                 kernel_constraint=None, bias_constraint=None,
                 window_size=CBN_WINDOW_SIZE, rho=1.0, burnin_steps=0, momentum=CBN_MOMENTUM,
                 epsilon=CBN_EPSILON, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None,
                 beta_constraint=None, gamma_constraint=None, **kwargs):
        groups = check_int("groups", groups, lambda g: g >= 1, "a positive int")
        use_bias = check_bool("use_bias", use_bias)
        super().__init__(
            filters, kernel_size, strides=strides, padding=padding, data_format=data_format,
            dilation_rate=dilation_rate, groups=groups, activation=None, use_bias=use_bias,
            kernel_initializer=kernel_initializer, bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer, bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer, kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint, **kwargs)
        window_size, burnin_steps = _check_cbn_arguments(
            window_size, rho, burnin_steps, momentum, epsilon)
        self.window_size = window_size
        self.rho = float(rho)
        self.burnin_steps = burnin_steps
        self.moving_statistics = MovingStatistics(self, momentum=momentum, initializers={
            "moving_mean": moving_mean_initializer,
            "moving_variance": moving_variance_initializer})
        self.epsilon = float(epsilon)
        # The norm's affine and activation (Conv2D's own `activation` stays None).
        self.affine = AffineAct(
            self, activation=activation, center=center, scale=scale,
            beta_initializer=beta_initializer, gamma_initializer=gamma_initializer,
            beta_regularizer=beta_regularizer, gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint, gamma_constraint=gamma_constraint)

    def add_weight(self, *args, **kwargs):
        # The compensation needs the float32 kernel and bias (their changes are small).
        if kwargs.get("name") in ("kernel", "bias"):
            kwargs["autocast"] = False
        return super().add_weight(*args, **kwargs)

    def build(self, input_shape):
        super().build(input_shape)
        state = dict(trainable=False, autocast=False)
        channels = (self.filters,)
        self.affine.build(self.filters)
        self.moving_statistics.build(channels)
        if self.window_size == 1:
            return
        previous, dtype = self.window_size - 1, stats_dtype(self.variable_dtype)
        kernel_shape = (previous,) + tuple(self.kernel.shape)
        self._probe_shape = tuple(self.kernel.shape[:-1]) + (self.groups,)
        # "int": int64 on TensorFlow, int32 on JAX (no int64 without x64), as Keras' optimizer.
        self.step = self.add_weight(name="step", shape=(), dtype="int", initializer="zeros",
                                    **state)
        for name, shape in (("buffer_mean", (previous,) + channels),
                            ("buffer_variance", (previous,) + channels),
                            ("buffer_mean_grad", (previous,) + self._probe_shape),
                            ("buffer_variance_grad", kernel_shape),
                            ("buffer_kernel", kernel_shape)) + (
                (("buffer_bias", (previous,) + channels),) if self.use_bias else ()):
            setattr(self, name, self.add_weight(name=name, shape=shape, dtype=dtype,
                                                initializer="zeros", **state))

    # keras' Conv saves only kernel and bias: the statistics and buffers are state too.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)

    @property
    def axis(self):
        """The channel axis of the output (`-1` channels-last, `1` channels-first)."""
        return -1 if self.data_format == "channels_last" else 1

    @property
    def momentum(self):
        return self.moving_statistics.momentum

    @property
    def norm_activation(self):
        """The activation after the normalization (the `activation` argument)."""
        return self.affine.activation

    @property
    def center(self):
        return self.affine.center

    @property
    def scale(self):
        return self.affine.scale

    @property
    def _reduce_axes(self):
        return [0, 1, 2] if self.axis == -1 else [0, 2, 3]

    def _conv(self, inputs, kernel):
        x = self.convolution_op(inputs, ops.cast(kernel, self.compute_dtype))
        if self.use_bias:
            shape = (1, 1, 1, self.filters) if self.axis == -1 else (1, self.filters, 1, 1)
            x = x + ops.reshape(ops.cast(self.bias, x.dtype), shape)
        return x

    def normalized_output(self, inputs, training=False):
        """The convolution output normalized, before the affine and activation.

        `inputs` is the conv's input. With `training=True` (and the layer `trainable`)
        the statistics are the current batch's alone (not the cross-iteration window);
        otherwise the moving averages. Nothing is updated.
        """
        x = self._conv(ops.convert_to_tensor(inputs), ops.convert_to_tensor(self.kernel))
        mean, var = self.moving_statistics.select(
            training, lambda: moments(x, self._reduce_axes), update=False)
        return self._standardize(x, mean, var)

    def call(self, inputs, training=None):
        if not self.moving_statistics.uses_batch(training):
            return self.affine.apply(self.normalized_output(inputs))
        if keras.backend.backend() == "tensorflow":
            # The tape of the forward conv gives d var / dW without a second forward pass.
            kernel = tf.convert_to_tensor(self.kernel)
            with tf.GradientTape() as tape:
                tape.watch(kernel)
                x = self._conv(inputs, kernel)
                mean, var = moments(x, self._reduce_axes)
            variance_grad = lambda: tape.gradient(var, kernel)  # noqa: E731
        else:
            kernel = ops.convert_to_tensor(self.kernel)
            x = self._conv(inputs, kernel)
            mean, var = moments(x, self._reduce_axes)
            variance_grad = lambda: _backend.gradient(  # noqa: E731
                lambda k: ops.sum(moments(self._conv(inputs, k), self._reduce_axes)[1]), kernel)
        self.moving_statistics.update((mean, var))   # the current batch only
        if self.window_size > 1:
            mean, var = self._window_statistics(inputs, variance_grad, kernel, mean, var)
        return self.affine.apply(self._standardize(x, mean, var))

    def _standardize(self, x, mean, var):
        return norm_act_ops.batch_norm_act(x, mean, var, axis=self.axis, epsilon=self.epsilon,
                                           activation=None)

    def _mean_patch(self, inputs):
        """d mean_c / dW[..., c]: the mean input patch of each conv group, (kh, kw, C_in/g, g).

        The mean is linear in the kernel, so the gradient at a zero probe kernel with one
        filter per group gives it for a 1/filters share of a backward-filter convolution.
        """
        def probe_mean(probe):
            out = self.convolution_op(inputs, ops.cast(probe, self.compute_dtype))
            return ops.sum(moments(out, self._reduce_axes)[0])

        return _backend.gradient(probe_mean, ops.zeros(self._probe_shape, self.variable_dtype))

    def _window_statistics(self, inputs, variance_grad, kernel, mean, var):
        """Pools the current statistics with the compensated buffers; updates the buffers.

        `variance_grad()` returns d (sum_c var_c) / dW at the current kernel.
        """
        previous, dtype = self.window_size - 1, mean.dtype
        since = ops.convert_to_tensor(self.step) - self.burnin_steps
        active = since >= 0
        count = ops.cast(ops.clip(since, 0, previous), dtype)  # valid previous entries

        # Compensation of the previous statistics to the current kernel (constants).
        kernel_now = ops.stop_gradient(ops.cast(kernel, dtype))
        delta = kernel_now[None] - ops.cast(self.buffer_kernel, dtype)
        kernel_axes = [1, 2, 3]
        d_var = ops.sum(ops.cast(self.buffer_variance_grad, dtype) * delta, kernel_axes)
        # Filters of group j (channels j * C/g ... ) share the mean patch j.
        per_group = tuple(delta.shape[1:-1]) + (self.groups, self.filters // self.groups)
        delta = ops.reshape(delta, (previous,) + per_group)
        d_mean = ops.sum(ops.cast(self.buffer_mean_grad, dtype)[..., None] * delta, kernel_axes)
        d_mean = ops.reshape(d_mean, (previous, self.filters))
        if self.use_bias:
            bias_now = ops.stop_gradient(ops.cast(ops.convert_to_tensor(self.bias), dtype))
            d_mean += bias_now[None] - ops.cast(self.buffer_bias, dtype)
        d_mean, d_var = self.rho * d_mean, self.rho * d_var
        old_mean = ops.cast(self.buffer_mean, dtype) + d_mean
        old_var = ops.maximum(
            ops.cast(self.buffer_variance, dtype) + d_var - ops.square(d_mean), 0.0)

        valid = ops.cast(ops.arange(previous, dtype=dtype) < count, dtype)[:, None]
        n = 1.0 + count
        mean_bar = (mean + ops.sum(valid * old_mean, 0)) / n
        spread = ops.square(mean - mean_bar) + ops.sum(
            valid * ops.square(old_mean - mean_bar), 0)
        var_bar = (var + ops.sum(valid * old_var, 0) + spread) / n

        # Store this step's statistics, derivatives and kernel in ring slot `since % (k-1)`.
        def derivatives():
            # The gradient of sum_c var_c holds every d var_c / d W[..., c] at once.
            return [ops.stop_gradient(self._mean_patch(inputs)),
                    ops.stop_gradient(variance_grad())]

        def skipped():
            return [ops.zeros(self._probe_shape, self.variable_dtype), ops.zeros_like(kernel)]

        grads = _backend.cond(active, derivatives, skipped) if self.burnin_steps else derivatives()
        slot = ops.reshape(ops.mod(ops.maximum(since, 0), previous), (1, 1))
        new = {"buffer_mean": mean, "buffer_variance": var, "buffer_mean_grad": grads[0],
               "buffer_variance_grad": grads[1], "buffer_kernel": kernel_now}
        if self.use_bias:
            new["buffer_bias"] = bias_now
        for name, value in new.items():
            buffer = getattr(self, name)
            current = ops.convert_to_tensor(buffer)
            value = ops.stop_gradient(ops.cast(value, current.dtype))
            updated = ops.scatter_update(current, slot, value[None])
            buffer.assign(ops.where(active, updated, current) if self.burnin_steps else updated)
        self.step.assign_add(1)
        return mean_bar, var_bar

    def get_config(self):
        config_ = super().get_config()
        config_.update({
            "window_size": self.window_size,
            "rho": self.rho,
            "burnin_steps": self.burnin_steps,
            "epsilon": self.epsilon,
            **self.moving_statistics.config(),
            **self.affine.config(),       # the norm's `activation` replaces Conv2D's
        })
        return config_


@_register
class CrossIterationBatchNormalization(keras.layers.Layer):
    """The CBN norm layer of the factory (`"cbn"`): CBN arguments waiting for their conv.

    CBN needs the kernel of the convolution that produced its input, so this layer does
    not run on its own: `bind_conv(conv)` (or `conv_norm_layers(conv, norm)`, which model
    builders call for every norm) turns a `keras.layers.Conv2D` and this layer into one
    `CBNConv2D`. Building or calling it directly raises a `ValueError` saying so.

    The bound layer computes (see `CBNConv2D` for the compensation of the previous steps):

    ```python
    x = conv(inputs, W_t)
    mu_bar  = mean over the window of the compensated mu_tau
    var_bar = mean over the window of max(nu_tau, mu_tau^2) - mu_bar^2
    out = activation(gamma * (x - mu_bar) / sqrt(var_bar + epsilon) + beta)
    ```

    Args:
        activation: applied after the normalization. Defaults to None, as every
            `...Normalization` layer (Keras' naming); the factory name `"cbn"` builds
            CBN + ReLU, as `"bn"` builds BN + ReLU.
        axis: the channel axis, checked against the conv's `data_format` when binding.
        window_size, rho, burnin_steps, momentum, epsilon, center, scale,
            initializers, regularizers, constraints: as `CBNConv2D`.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: not accepted: calling the unbound layer raises a `ValueError`.
        training: as `CBNConv2D`, once bound.

    Returns:
        Nothing on its own; `bind_conv(conv)` returns the `CBNConv2D` to call.

    Reference:
        - [Yao et al., 2021](https://arxiv.org/abs/2002.05712), Cross-Iteration Batch
          Normalization.

    Example:

    >>> norm = get_norm_act_layer("cbn", window_size=4)
    >>> conv = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)
    >>> layers = conv_norm_layers(conv, norm)        # [CBNConv2D]
    """

    def __init__(self, activation=None, axis=-1, window_size=CBN_WINDOW_SIZE, rho=1.0,
                 burnin_steps=0, momentum=CBN_MOMENTUM, epsilon=CBN_EPSILON, center=True,
                 scale=True, beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, **kwargs):
        super().__init__(**kwargs)
        window_size, burnin_steps = _check_cbn_arguments(
            window_size, rho, burnin_steps, momentum, epsilon)
        self.axis = check_int("axis", axis, lambda a: a in (-1, 1, 3),
                              "-1 or 3 (channels_last) or 1 (channels_first)")
        # The arguments of the bound CBNConv2D, parsed (errors raise here) and serialized
        # by the components it will own.
        affine = AffineAct(
            self, activation=activation, center=center, scale=scale,
            beta_initializer=beta_initializer, gamma_initializer=gamma_initializer,
            beta_regularizer=beta_regularizer, gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint, gamma_constraint=gamma_constraint)
        moving_statistics = MovingStatistics(self, momentum=momentum, initializers={
            "moving_mean": moving_mean_initializer,
            "moving_variance": moving_variance_initializer})
        self._cbn = {"window_size": window_size, "rho": rho, "burnin_steps": burnin_steps,
                     "epsilon": epsilon, **moving_statistics.config(), **affine.config()}

    def build(self, input_shape):
        raise ValueError(
            "CrossIterationBatchNormalization needs the kernel of the convolution that "
            "produced its input: combine the two with `conv_norm_layers(conv, norm)` or "
            "`norm.bind_conv(conv)`, or use `CBNConv2D` directly. "
            f"Received: input_shape={input_shape}")

    def call(self, inputs, training=None):
        self.build(inputs.shape)

    def bind_conv(self, conv):
        """Returns one `CBNConv2D` doing `conv` then this normalization.

        The new layer takes the conv's arguments and name and this layer's CBN arguments.

        Raises:
            ValueError: if `conv` is not an unbuilt `keras.layers.Conv2D` without
                activation, or its `data_format` does not match `axis`.
        """
        if type(conv) is not keras.layers.Conv2D:
            raise ValueError("CBN binds to a plain `keras.layers.Conv2D`. "
                             f"Received: conv={type(conv).__name__}")
        if conv.built:
            raise ValueError("Bind CBN to its conv before the conv is called (its weights "
                             f"would be lost). Received: conv={conv.name!r} (built)")
        config = conv.get_config()
        if config["activation"] not in (None, "linear"):
            raise ValueError(
                "The conv before CBN must have no activation (CBN applies its own after "
                f"normalizing). Received: activation={config['activation']!r}")
        expected = 1 if config["data_format"] == "channels_first" else -1
        if self.axis % 4 != expected % 4:
            raise ValueError(f"The norm's axis does not match the conv's data_format "
                             f"{config['data_format']!r}. Received: axis={self.axis}")
        config.update(self._cbn)
        config["trainable"] = conv.trainable and self.trainable
        return CBNConv2D.from_config(config)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, **self._cbn}


def conv_norm_layers(conv, norm):
    """The layers that apply `conv` then `norm`, for model builders.

    Returns `[conv, norm]`, or `[norm.bind_conv(conv)]` for a norm that needs the kernel
    of its convolution (CBN). Builders call this for every conv -> norm pair so that any
    registered norm name works.
    """
    bind = getattr(norm, "bind_conv", None)
    return [bind(conv)] if callable(bind) else [conv, norm]
