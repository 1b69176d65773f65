r"""`make demo`: a GN+PN CIFAR ResNet-20 trained on Fashion-MNIST in a few CPU minutes.

It runs `train.py` with the defaults below (any of its flags can be given to override
them), then saves a `.keras` file, reloads it and the exported SavedModel, and checks that
both give the trained model's outputs on the test set.

    python examples/demo.py --data_dir /usr/share/datasets/fashion-mnist

Everything goes into `--model_dir`, by default a new folder
`/tmp/tf_proxynorm_demo/run-<date>-<time>/`; the demo prints it first and last
(`make demo DEMO_DIR=path` passes `--model_dir=path`).
"""

import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

import train

FLAGS = flags.FLAGS
# The default output folder: a new one per run under this one.
DEFAULT_PARENT = "/tmp/tf_proxynorm_demo"
DEFAULTS = dict(model="cifar_resnet", depth=20, width=1, norm="gn+pn",
                norm_kwargs='{"groups": 8}', dataset="fashion_mnist", batch_size=128, epochs=3,
                steps_per_epoch=100, validate=False, warmup_epochs=0.2, jit_compile=True,
                verbose=2, model_dir=os.path.join(
                    DEFAULT_PARENT, time.strftime("run-%Y%m%d-%H%M%S")))
for name, value in DEFAULTS.items():
    FLAGS.set_default(name, value)

# Largest acceptable |difference| between the trained model's logits and a reloaded copy's.
RELOAD_ATOL = 1e-4


def _max_difference(reference, other):
    return float(np.max(np.abs(np.asarray(reference) - np.asarray(other))))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if not FLAGS.export_dir:
        FLAGS.export_dir = os.path.join(FLAGS.model_dir, "saved_model")
    print(f"Writing checkpoints, logs, metrics and the exported models to {FLAGS.model_dir} "
          "(--model_dir; `make demo DEMO_DIR=...`).", flush=True)
    model, metrics, test_ds = train.run(FLAGS)

    keras_path = os.path.join(FLAGS.model_dir, "model.keras")
    model.save(keras_path)
    images = np.concatenate([x.numpy() for x, _ in test_ds.take(4)])
    expected = model.predict(images, verbose=0)
    reloaded = keras.saving.load_model(keras_path, compile=False).predict(images, verbose=0)
    saved_model = tf.saved_model.load(FLAGS.export_dir)
    served = saved_model.serve(tf.constant(images)).numpy()
    differences = {"model.keras": _max_difference(expected, reloaded),
                   "SavedModel": _max_difference(expected, served)}

    print(f"\nTest accuracy on the {metrics['test_examples']} Fashion-MNIST test images: "
          f"{metrics['test_accuracy']:.4f} after {metrics['optimizer_steps']} steps "
          f"({metrics['train_seconds']:.0f} s of training).")
    for what, diff in differences.items():
        print(f"Reloaded {what}: max |logit difference| {diff:.2e} on {len(images)} images.")
    print(f"Outputs in {FLAGS.model_dir}:\n"
          f"  checkpoints/   one per epoch (rerun with --model_dir={FLAGS.model_dir} to resume)\n"
          f"  logs/          TensorBoard: tensorboard --logdir {FLAGS.model_dir}/logs\n"
          f"  metrics.json   final metrics and the training history\n"
          f"  model.keras    keras.saving.load_model(path)\n"
          f"  saved_model/   tf.saved_model.load(path).serve(pixels in [0, 255]); "
          "needs no tf_proxynorm")
    if max(differences.values()) > RELOAD_ATOL:
        print(f"FAILED: a reloaded model differs from the trained one by more than {RELOAD_ATOL}.")
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
