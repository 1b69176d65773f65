"""Inference speed of ResNet-50 v2: GN+PN, GN+PN folded, and plain GN + activation.

Three models of the same architecture (`tfpn.models.resnet50(version="v2")`) are timed side
by side: GN+PN as trained (the proxy statistics are recomputed at every call), GN+PN after
`tfpn.fold_for_inference` (PN's affine folded into the next convs; 16 per-channel shifts
remain in front of the 3x3 'same' convs), and plain GN + ReLU. A fourth, an identical copy
of the GN+act model ("GN+act twin"), shows how far apart two identical models measure (the
A/A noise floor). Each model runs as a `tf.function` (training=False). The rounds are
interleaved in a rotating order (A B C D, B C D A, ...) so that load on the shared machine
hits all models alike. Each ratio is the median over rounds of the per-round time ratio (its
interquartile range shows the noise); on a loaded machine the ratio of the fastest rounds
("min vs min", each model's least disturbed round) is steadier. The target is folded GN+PN
within 1.05x of plain GN+act.

    python benchmarks/bench_fold.py                                  # both batch sizes
    python benchmarks/bench_fold.py --implementation=reference       # pure-TF path
    python benchmarks/bench_fold.py --clock=cpu --threads=1          # on a busy machine
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import tf_proxynorm as tfpn  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["1x224", "32x128"], "Batch x image size of each measurement.")
flags.DEFINE_integer("rounds", 7, "Interleaved rounds per configuration.")
flags.DEFINE_integer("calls", 3, "Calls per model per round (timed together).")
flags.DEFINE_integer("groups", 32, "GroupNorm groups.")
flags.DEFINE_enum("implementation", "auto", ["auto", "reference"],
                  "Global implementation of the norm layers (auto: the fused op when built).")
flags.DEFINE_enum("clock", "wall", ["wall", "cpu"],
                  "wall: elapsed time; cpu: CPU time of this process (all its threads), "
                  "steadier when other jobs share the cores.")
flags.DEFINE_integer("threads", 0, "TensorFlow intra- and inter-op threads (0: its default).")


def build(norm, size):
    return tfpn.models.resnet50(version="v2", norm=norm, norm_kwargs={"groups": FLAGS.groups},
                                num_classes=1000, input_shape=(size, size, 3))


def time_calls(fn, x, calls):
    clock = time.process_time if FLAGS.clock == "cpu" else time.perf_counter
    start = clock()
    for _ in range(calls):
        fn(x).numpy()
    return (clock() - start) / calls


def measure(batch, size):
    gnpn = build("gn+pn", size)
    gn = build("gn", size)
    # A second, identical GN+act model: its ratio to the first is the noise floor (A/A test).
    twin = build("gn", size)
    twin.set_weights(gn.get_weights())
    models = {"GN+PN": gnpn, "GN+PN folded": tfpn.fold_for_inference(gnpn, inference_layers=False), "GN+act": gn,
              "GN+act twin": twin}
    x = tf.constant(np.random.default_rng(0).standard_normal((batch, size, size, 3)), tf.float32)
    fns = {name: tf.function(lambda t, m=m: m(t, training=False)) for name, m in models.items()}
    for fn in fns.values():           # trace and warm up
        time_calls(fn, x, 2)
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(FLAGS.rounds):     # rotate the order so that no model always follows another
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_calls(fns[name], x, FLAGS.calls))
    base = np.array(times["GN+act"])
    print(f"\nbatch {batch}, {size}x{size}, implementation={FLAGS.implementation}, "
          f"{FLAGS.rounds} rounds x {FLAGS.calls} calls")
    print(f"{'model':<14}{'median ms':>11}{'vs GN+act':>11}{'ratio IQR':>14}"
          f"{'min ms':>9}{'min vs min':>12}")
    for name, t in times.items():
        low, ratio, high = np.percentile(np.array(t) / base, [25, 50, 75])
        print(f"{name:<14}{1e3 * np.median(t):>11.1f}{ratio:>10.3f}x"
              f"{f'{low:.3f}-{high:.3f}':>14}{1e3 * np.min(t):>9.1f}"
              f"{np.min(t) / base.min():>11.3f}x")


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")     # one tf.function per model: retracing is expected
    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    tfpn.set_implementation(FLAGS.implementation)
    print(f"TF {tf.__version__}, fused op available: {tfpn.fused_op_available()}, "
          f"CPU threads: {os.cpu_count()}, TF threads: {FLAGS.threads or 'default'}, "
          f"clock: {FLAGS.clock}, devices: "
          f"{[d.device_type for d in tf.config.list_logical_devices()]}")
    for config in FLAGS.configs:
        batch, size = (int(v) for v in config.split("x"))
        measure(batch, size)


if __name__ == "__main__":
    app.run(main)
