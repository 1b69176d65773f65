"""Power plots of the Proxy Normalization paper (Labatie et al. 2021, Fig. 2), at initialization.

A random network of `depth` blocks "3x3 convolution with periodic padding -> norm -> affine
-> ReLU (-> proxy norm)" with beta ~ N(0, 0.2^2) and gamma ~ N(1, 0.2^2), fed N(0, 1)
images, is built for each normalization; at every depth the power of the normalized output
y (before the affine) is split into (1) the channel-wise constant part, (2) the variability
of the instance means and (3) the within-instance variation, with the same streaming
statistics as `tf_proxynorm.callbacks.FailureModeMonitor`. The batch is the data set:
BatchNorm uses its statistics (training mode; the model is left unchanged).

    python examples/power_plots.py                      # width 128, depth 50 (CPU, ~2 min)
    python examples/power_plots.py --width=1024         # the paper's width (GPU)

Writes `<out_dir>/power_plots_random_net.png` (stacked decomposition against depth, one
panel per normalization), `<out_dir>/power_profiles_random_net.png` (ratios against depth)
and prints a Markdown table of the ratios at a few depths.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import tf_proxynorm as tfpn  # noqa: E402
from tf_proxynorm.callbacks import _output  # noqa: E402
from tf_proxynorm.layers.weight_standardization import WSConv2D  # noqa: E402

NORMS = ("bn", "in", "ln", "gn", "ln+pn", "gn+pn", "ln+ws")
LABELS = {"bn": "BN", "in": "IN", "ln": "LN", "gn": "GN", "ln+pn": "LN+PN", "gn+pn": "GN+PN",
          "ln+ws": "LN+WS"}

FLAGS = flags.FLAGS
flags.DEFINE_integer("width", 128, "Channels of every layer (the paper: 1024).")
flags.DEFINE_integer("depth", 50, "Number of conv -> norm -> ReLU blocks.")
flags.DEFINE_integer("batch", 32, "Number of input images (the data set).")
flags.DEFINE_integer("size", 16, "Height and width of the images.")
flags.DEFINE_integer("groups", 32, "Groups of GroupNorm.")
flags.DEFINE_float("param_std", 0.2, "Standard deviation of beta and gamma around 0 and 1.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and of the inputs.")
flags.DEFINE_list("norms", list(NORMS), f"Normalizations among {NORMS}.")
flags.DEFINE_list("report_depths", ["1", "5", "10", "25", "50"], "Depths in the table.")
flags.DEFINE_string("out_dir", "docs/images", "Folder of the PNG files.")


@keras.saving.register_keras_serializable(package="examples")
class WrapPad2D(keras.layers.Layer):
    """Periodic (circular) padding of one pixel on each side of H and W (channels-last)."""

    def call(self, x):
        x = tf.concat([x[:, -1:], x, x[:, :1]], axis=1)
        return tf.concat([x[:, :, -1:], x, x[:, :, :1]], axis=2)

    def compute_output_shape(self, shape):
        grow = lambda d: None if d is None else d + 2  # noqa: E731
        return (shape[0], grow(shape[1]), grow(shape[2]), shape[3])


def random_network(norm, width, depth, size, groups, param_std, seed):
    """The paper's random network for one normalization name (`NORMS`)."""
    rng = np.random.default_rng(seed)
    inputs = keras.Input((size, size, width))
    h = inputs
    norm_name, ws = (norm[:-3], True) if norm.endswith("+ws") else (norm, False)
    for i in range(depth):
        h = WrapPad2D()(h)
        conv_class = WSConv2D if ws else keras.layers.Conv2D
        conv = conv_class(width, 3, padding="valid", use_bias=False,
                          kernel_initializer=keras.initializers.HeNormal(seed + i))
        h = conv(h)
        kwargs = {"groups": groups} if norm_name.startswith("gn") else {}
        layer = tfpn.get_norm_act_layer(norm_name, activation="relu", name=f"norm_{i + 1}",
                                        **kwargs)
        h = layer(h)
        layer.gamma.assign(rng.normal(1.0, param_std, width).astype("float32"))
        layer.beta.assign(rng.normal(0.0, param_std, width).astype("float32"))
    return keras.Model(inputs, h, name=f"random_{norm.replace('+', '_')}")


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    unknown = sorted(set(FLAGS.norms) - set(NORMS))
    if unknown:
        raise ValueError(f"Unknown --norms {unknown}; expected among {NORMS}. "
                         f"Received: norms={FLAGS.norms}")
    x = np.random.default_rng(FLAGS.seed + 12345).standard_normal(
        (FLAGS.batch, FLAGS.size, FLAGS.size, FLAGS.width)).astype("float32")
    results = {}
    for norm in FLAGS.norms:
        model = random_network(norm, FLAGS.width, FLAGS.depth, FLAGS.size, FLAGS.groups,
                               FLAGS.param_std, FLAGS.seed)
        results[norm] = tfpn.callbacks.power_decomposition(model, x, training=True,
                                                           batch_size=FLAGS.batch)
        last = results[norm][-1]
        print(f"{LABELS[norm]:6s} depth {FLAGS.depth}: collapse {last['collapse']:.3f}  "
              f"mean_var {last['mean_var']:.3f}  scale_var {last['scale_var']:.3f}", flush=True)

    title = f"width {FLAGS.width}, {FLAGS.batch} images {FLAGS.size}x{FLAGS.size}"
    panels = [(f"{LABELS[n]} ({title})", layers) for n, layers in results.items()]
    stacked = _output.save_power_plot(
        panels, os.path.join(FLAGS.out_dir, "power_plots_random_net.png"), cols=4)
    profiles = _output.save_depth_profiles(
        [("collapse ratio (1)/P", "layers", "collapse", False),
         ("instance-mean variability (2)/P", "layers", "mean_var", False),
         ("instance-scale variability", "layers", "scale_var", False)],
        [{"label": LABELS[n], "layers": layers} for n, layers in results.items()],
        os.path.join(FLAGS.out_dir, "power_profiles_random_net.png"), categorical=True)
    print(f"\nwrote {stacked} and {profiles}\n")

    depths = [d for d in (int(v) for v in FLAGS.report_depths) if 1 <= d <= FLAGS.depth]
    print("| norm | metric | " + " | ".join(f"depth {d}" for d in depths) + " |")
    print("|---|---|" + "---|" * len(depths))
    for norm, layers in results.items():
        for metric, name in (("collapse", "(1)/P collapse"), ("mean_var", "(2)/P inst. mean"),
                             ("scale_var", "inst. scale var")):
            cells = " | ".join(f"{layers[d - 1][metric]:.3f}" for d in depths)
            print(f"| {LABELS[norm]} | {name} | {cells} |")


if __name__ == "__main__":
    app.run(main)
