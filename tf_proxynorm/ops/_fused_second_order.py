"""The second derivative of the fused op, registered with TensorFlow on import.

`tf_proxynorm.fused` registers the fused op's gradient (its backward kernel); the gradient
of that backward op is the reference path's, which lives here in `ops`, so it is
registered here: `tf_proxynorm.ops` imports this module for that side effect, and `fused`
never imports `ops`. TensorFlow only (the fused op is a TensorFlow op).
"""

import tensorflow as tf

from tf_proxynorm import fused
from tf_proxynorm.ops.group_norm import group_norm_act_reference


@tf.RegisterGradient(fused.GRAD_OP_NAME)
def _fused_second_order(op, *upstream):
    """Second derivative of the fused op (e.g. gradient penalties): the gradient of the
    backward op is that of the reference path's first gradient, recomputed here in
    TensorFlow ops. `mean` / `inv_std` get no gradient: the reference recomputes them from
    x, so their dependence on x is included."""
    attrs = fused.op_attrs(op)
    dy, x, gamma, beta, proxy_mean, proxy_inv_std = op.inputs[:6]
    inputs = [dy, x, gamma, beta, proxy_mean, proxy_inv_std]
    use_proxy = attrs["use_proxy"]
    with tf.GradientTape() as outer:
        outer.watch(inputs)
        with tf.GradientTape() as inner:
            inner.watch(inputs[1:])
            y = group_norm_act_reference(
                x, gamma, beta, groups=attrs["groups"], axis=-1 if attrs["channels_last"] else 1,
                epsilon=attrs["epsilon"], activation=attrs["activation"],
                proxy_mean=proxy_mean if use_proxy else None,
                proxy_inv_std=proxy_inv_std if use_proxy else None)
        first = inner.gradient(y, inputs[1:], output_gradients=tf.cast(dy, y.dtype),
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)
        total = tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32) * tf.cast(u, tf.float32))
                          for g, u in zip(first, upstream) if u is not None] or [tf.constant(0.0)])
    return outer.gradient(total, inputs) + [None, None]
