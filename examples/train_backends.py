r"""Trains a GN+PN CIFAR ResNet on Fashion-MNIST with any Keras backend.

    KERAS_BACKEND=jax python examples/train_backends.py --epochs=10
    KERAS_BACKEND=tensorflow python examples/train_backends.py --epochs=10
    KERAS_BACKEND=jax python examples/train_backends.py --steps=3 --epochs=1   # smoke run

Only Keras APIs and NumPy: the images are NumPy arrays (read from the IDX files in
`--data_dir`, default `/usr/share/datasets/fashion-mnist`, Debian's
`dataset-fashion-mnist` package), the model is `tfpn.models.cifar_resnet` behind a
`Normalization` of the pixels and random horizontal flips (active in training only),
and `model.fit` compiles the training step with XLA (`--no-jit_compile` to run it
without; on PyTorch it runs eagerly unless `--jit_compile` asks for torch.compile).
The script prints the backend, one line per epoch, and the final test accuracy.
See examples/train.py for the TensorFlow-only trainer (tf.data, tf.distribute,
checkpoints, SavedModel export).
"""

import argparse
import json
import time

import keras
import numpy as np

import tf_proxynorm as tfpn

import data  # examples/data.py: the datasets and their tf.data pipelines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None,
                   help="folder of the four Fashion-MNIST IDX files (default: %s)"
                   % data.FASHION_MNIST_DIR)
    p.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth 6n+2.")
    p.add_argument("--width", type=int, default=1, help="channel multiplier.")
    p.add_argument("--norm", default="gn+pn",
                   help="norm + activation (tf_proxynorm.available_norm_acts()).")
    p.add_argument("--norm_kwargs", default='{"groups": 8}',
                   help="JSON arguments of every norm layer.")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=None,
                   help="train on a fixed random subset of steps * batch_size images "
                   "(default: the whole training set).")
    p.add_argument("--test_examples", type=int, default=None,
                   help="evaluate on the first N test images (default: all 10,000).")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=0.1,
                   help="peak of the cosine schedule (SGD with Nesterov momentum 0.9).")
    p.add_argument("--weight_decay", type=float, default=5e-4,
                   help="decoupled decay (w -= lr * weight_decay * w) of the kernels and "
                   "of PN's proxy parameters.")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips of the training images.")
    p.add_argument("--jit_compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the train / test steps with XLA (default: on, except on "
                        "the PyTorch backend, where Keras' jit_compile means torch.compile).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="write the trained model to this .keras file.")
    args = p.parse_args(argv)
    for name in ("epochs", "steps", "test_examples", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be a positive integer. Received: {name}={value}")
    return args


def load_data(data_dir, steps, batch_size, test_examples, seed):
    """Fashion-MNIST as float32 NumPy arrays (N, 28, 28, 1) and int labels; `steps` keeps
    `steps * batch_size` random training images (a fixed subset)."""
    splits = data.load_fashion_mnist(data_dir)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    if steps is not None:
        keep = np.random.default_rng(seed).permutation(len(x_train))[:steps * batch_size]
        x_train, y_train = x_train[keep], y_train[keep]
    if test_examples is not None:
        x_test, y_test = x_test[:test_examples], y_test[:test_examples]
    return (x_train.astype("float32"), y_train), (x_test.astype("float32"), y_test)


def build_model(args, x_train):
    """Pixel standardization (training-set statistics), augmentation, the CIFAR ResNet."""
    backbone = tfpn.models.cifar_resnet(
        args.depth, args.width, norm=args.norm, norm_kwargs=json.loads(args.norm_kwargs),
        num_classes=10, input_shape=x_train.shape[1:], classifier_activation=None)
    inputs = keras.Input(x_train.shape[1:], name="pixels")
    x = keras.layers.Normalization(mean=float(x_train.mean()), variance=float(x_train.var()),
                                   name="standardize")(inputs)
    if args.augment:
        # RandomFlip compiles with XLA; RandomTranslation / RandomCrop would not (or would
        # rescale the images at inference).
        x = keras.layers.RandomFlip("horizontal", seed=args.seed, name="flip")(x)
    return keras.Model(inputs, backbone(x), name=backbone.name)


# Decayed: conv / dense kernels and PN's proxy parameters (as examples/train.py); never
# the norms' gamma / beta or the biases.
DECAYED_VARIABLES = ("kernel", "proxy_beta", "proxy_gamma")


def make_optimizer(args, model, total_steps):
    """SGD, Nesterov momentum 0.9, cosine decay, decoupled weight decay of
    `DECAYED_VARIABLES` only."""
    schedule = keras.optimizers.schedules.CosineDecay(args.learning_rate, total_steps)
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True,
                                     weight_decay=args.weight_decay or None)
    optimizer.exclude_from_weight_decay(var_list=[
        v for v in model.trainable_variables if v.name not in DECAYED_VARIABLES])
    return optimizer


class EpochPrinter(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        print(f"epoch {epoch + 1}: loss {logs['loss']:.4f} accuracy {logs['accuracy']:.4f} "
              f"test_loss {logs['val_loss']:.4f} test_accuracy {logs['val_accuracy']:.4f} "
              f"({time.time() - self._start:.1f} s)", flush=True)


def main(argv=None):
    args = parse_args(argv)
    print(f"Keras backend: {keras.backend.backend()} (Keras {keras.__version__}, "
          f"tf_proxynorm {tfpn.__version__})", flush=True)
    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_data(
        args.data_dir, args.steps, args.batch_size, args.test_examples, args.seed)
    model = build_model(args, x_train)
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    jit_compile = args.jit_compile
    if jit_compile is None:
        jit_compile = keras.backend.backend() != "torch"
    model.compile(optimizer=make_optimizer(args, model, args.epochs * steps_per_epoch),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=jit_compile)
    print(f"{model.name} with {args.norm}: {model.count_params():,} parameters; "
          f"{len(x_train)} training images, {steps_per_epoch} steps per epoch, "
          f"jit_compile={model.jit_compile}", flush=True)
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
              validation_data=(x_test, y_test), callbacks=[EpochPrinter()], verbose=0)
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0)
    print(f"test accuracy: {accuracy:.4f} (loss {loss:.4f}, {len(x_test)} images)", flush=True)
    if args.save:
        model.save(args.save)
        print(f"saved {args.save}")
    return accuracy


if __name__ == "__main__":
    main()
