r"""Trains a ResNet with a pluggable norm: real data, checkpoints, TensorBoard, export.

    python examples/train.py --model=cifar_resnet --depth=20 --norm=gn+pn \
        --norm_kwargs='{"groups": 8}' --dataset=fashion_mnist --epochs=30 \
        --model_dir=/tmp/fmnist_gnpn --export_dir=/tmp/fmnist_gnpn/saved_model

Rerunning the same command resumes from the last epoch checkpointed in `--model_dir`.
Several GPUs: `--strategy=mirrored`; several machines: `--strategy=multi_worker` with
`TF_CONFIG` set on each (the `--batch_size` is global; every worker reads its own shard of
the data, worker 0 writes the outputs); TPU: `--strategy=tpu --tpu=<address>` (wired, not
tested here). See the README's "Training" section.
"""

import json
import math
import os
import time

import keras
import tensorflow as tf
from absl import app, flags, logging
from keras import ops

import tf_proxynorm as tfpn

import data  # examples/data.py: the datasets and their tf.data pipelines

FLAGS = flags.FLAGS
MODELS = ("cifar_resnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
          "resnext50_32x4d")

flags.DEFINE_enum("model", "cifar_resnet", MODELS, "Architecture.")
flags.DEFINE_enum("version", "v1.5", ["v1.5", "v2"], "ImageNet ResNets: v1.5 or pre-activation v2.")
flags.DEFINE_integer("depth", 20, "cifar_resnet: depth 6n+2 (20, 56, 110, ...).")
flags.DEFINE_integer("width", 1, "cifar_resnet: channel multiplier.")
flags.DEFINE_string("norm", "gn+pn", "Norm + activation name (tf_proxynorm.available_norm_acts()).")
flags.DEFINE_string("norm_kwargs", "{}", 'JSON arguments of every norm layer, e.g. \'{"groups": 8}\'.')
flags.DEFINE_string("activation", "relu", "Activation of the network.")
flags.DEFINE_bool("weight_standardization", False, "Weight-standardized convs (GN+WS, LN+WS).")
flags.DEFINE_bool("sync_bn", False, "With --norm=bn: batch statistics over all replicas.")
flags.DEFINE_string("dataset", "fashion_mnist",
                    "'fashion_mnist' (IDX files), 'synthetic', or a TFDS name prepared in --data_dir.")
flags.DEFINE_string("data_dir", None, "Where the dataset is (default for Fashion-MNIST: "
                    "/usr/share/datasets/fashion-mnist).")
flags.DEFINE_integer("image_size", None, "TFDS: resize images to this square size.")
flags.DEFINE_bool("augment", True, "Pad + random crop + horizontal flip of the training images.")
flags.DEFINE_integer("batch_size", 128, "Global batch size (split over the replicas).")
flags.DEFINE_integer("epochs", 10, "Number of epochs.")
flags.DEFINE_integer("steps_per_epoch", None, "Cap on the training steps of an epoch.")
flags.DEFINE_integer("eval_steps", None, "Cap on the evaluation steps (default: the whole test set).")
flags.DEFINE_bool("validate", True, "Evaluate on the test split after every epoch.")
flags.DEFINE_enum("optimizer", "momentum", ["sgd", "momentum", "adamw"], "Optimizer.")
flags.DEFINE_float("learning_rate", None, "Peak learning rate (default: 0.1 * batch_size / 128 "
                   "for sgd/momentum, 1e-3 for adamw).")
flags.DEFINE_float("momentum", 0.9, "Momentum of --optimizer=momentum.")
flags.DEFINE_enum("lr_schedule", "cosine", ["cosine", "step", "constant"], "Schedule after warmup.")
flags.DEFINE_float("warmup_epochs", 0.0, "Linear warmup length, in epochs.")
flags.DEFINE_list("lr_decay_epochs", [], "step: epochs where the rate is multiplied by 0.1 "
                  "(default: 50% and 75% of --epochs).")
flags.DEFINE_float("weight_decay", 5e-4, "Decay of conv/dense kernels and of proxy_beta/"
                   "proxy_gamma; never of gamma, beta or biases.")
flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing of the cross-entropy.")
flags.DEFINE_bool("mixed_precision", False, "mixed_float16 on GPU, mixed_bfloat16 on CPU/TPU.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker", "tpu"],
                  "tf.distribute strategy.")
flags.DEFINE_string("tpu", "", "--strategy=tpu: TPU name or address ('' for a TPU VM).")
flags.DEFINE_integer("cpu_devices", 0, "Split the CPU into this many logical devices (to run "
                     "--strategy=mirrored without GPUs, e.g. in tests).")
flags.DEFINE_string("model_dir", None, "Checkpoints (every epoch), TensorBoard logs and "
                    "metrics.json. Rerunning with the same directory resumes.")
flags.DEFINE_string("export_dir", None, "Where to export a portable SavedModel at the end.")
flags.DEFINE_integer("seed", 0, "Seed of the initialization, the data order and augmentation.")
flags.DEFINE_bool("jit_compile", False, "Compile the training step with XLA.")
flags.DEFINE_bool("deterministic", False, "Deterministic ops and data order (slower).")
flags.DEFINE_integer("verbose", 1, "Keras verbosity: 1 progress bar, 2 one line per epoch.")

# Kept among the decayed variables: conv/dense kernels and PN's proxy parameters (the paper
# decays only the proxy parameters among the norm's: pulling the proxy back to N(0, 1)).
DECAYED_VARIABLES = ("kernel", "proxy_beta", "proxy_gamma")


# -- distribution -----------------------------------------------------------------------------
class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`tf.distribute.MultiWorkerMirroredStrategy` whose `reduce` accepts what Keras gives it.

    Keras 3's `fit`/`evaluate` call `strategy.reduce` on two things the stock strategy
    rejects once it spans several workers (keras-team/keras#20585): the first distributed
    batch, an `(images, labels)` tuple (to build the model symbolically), and the scalar
    metric results of every step, with `axis=0`. This `reduce` reduces each element of a
    nest, and reduces scalars across replicas only (a scalar has no axis 0).
    """

    def reduce(self, reduce_op, value, axis):
        parent = super(MultiWorkerMirroredStrategy, self)

        def reduce_one(v):
            shape = getattr(self.experimental_local_results(v)[0], "shape", None)
            scalar = shape is not None and shape.rank == 0
            return parent.reduce(reduce_op, v, axis=None if scalar else axis)

        return tf.nest.map_structure(reduce_one, value)


def make_strategy(name, tpu="", cpu_devices=0):
    """Creates the strategy; must run before any other TensorFlow op."""
    if cpu_devices:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    if name == "mirrored":
        devices = None if tf.config.list_logical_devices("GPU") else [
            d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                             "(cluster and task of this worker). Received: TF_CONFIG unset")
        return MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def worker_info(strategy):
    """`(is_chief, task_id)` of this process (chief: the one that writes the outputs)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", 0) or 0
    if task_type in (None, "chief"):
        return True, task_id
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief, task_id


# -- model, optimizer ---------------------------------------------------------------------------
def build_model(cfg, info):
    """The builder's network after a fixed `Normalization` of the pixels (so the exported
    model takes raw pixels in [0, 255])."""
    norm_kwargs = json.loads(cfg.norm_kwargs)
    if cfg.sync_bn:
        if cfg.norm != "bn":
            raise ValueError(f"--sync_bn needs --norm=bn. Received: norm={cfg.norm!r}")
        norm_kwargs["synchronized"] = True
    common = dict(norm=cfg.norm, norm_kwargs=norm_kwargs, activation=cfg.activation,
                  weight_standardization=cfg.weight_standardization,
                  num_classes=info.num_classes, input_shape=info.image_shape,
                  classifier_activation=None)
    if cfg.model == "cifar_resnet":
        backbone = tfpn.models.cifar_resnet(cfg.depth, cfg.width, **common)
    else:
        backbone = getattr(tfpn.models, cfg.model)(version=cfg.version, **common)
    inputs = keras.Input(info.image_shape, name="pixels")
    x = keras.layers.Normalization(mean=list(info.mean), variance=[s * s for s in info.std],
                                   name="standardize")(inputs)
    return keras.Model(inputs, backbone(x), name=backbone.name)


@keras.saving.register_keras_serializable(package="tf_proxynorm_examples")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then cosine decay to 0, steps of x0.1 at `boundaries`
    (kind "step"), or constant."""

    def __init__(self, peak, total_steps, warmup_steps=0, kind="cosine", boundaries=()):
        self.peak, self.total_steps, self.warmup_steps = peak, total_steps, warmup_steps
        self.kind, self.boundaries = kind, tuple(boundaries)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = self.peak * (step + 1.0) / max(self.warmup_steps, 1)
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            main = 0.5 * self.peak * (1.0 + ops.cos(math.pi * progress))
        else:
            drops = sum((ops.cast(step >= b, "float32") for b in self.boundaries), 0.0 * step)
            main = self.peak * ops.power(0.1, drops)
        return ops.where(step < self.warmup_steps, warm, main)

    def get_config(self):
        return dict(peak=self.peak, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                    kind=self.kind, boundaries=list(self.boundaries))


def make_optimizer(cfg, model, steps_per_epoch):
    """The optimizer, with weight decay on `DECAYED_VARIABLES` only.

    sgd/momentum: coupled decay as in PyTorch (gradient += weight_decay * w), i.e. an L2
    loss `weight_decay / 2 * ||w||^2` set as the variables' regularizers. adamw: decoupled
    decay with every other variable excluded.
    """
    lr = cfg.learning_rate or (1e-3 if cfg.optimizer == "adamw" else 0.1 * cfg.batch_size / 128)
    total = cfg.epochs * steps_per_epoch
    decay_epochs = [float(e) for e in cfg.lr_decay_epochs] or [0.5 * cfg.epochs, 0.75 * cfg.epochs]
    boundaries = ([int(e * steps_per_epoch) for e in decay_epochs]
                  if cfg.lr_schedule == "step" else [])
    schedule = WarmupSchedule(lr, total, int(cfg.warmup_epochs * steps_per_epoch),
                              cfg.lr_schedule, boundaries)
    decayed = [v for v in model.trainable_variables if v.name in DECAYED_VARIABLES]
    if cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
        decayed_ids = {id(v) for v in decayed}
        optimizer.exclude_from_weight_decay(
            var_list=[v for v in model.trainable_variables if id(v) not in decayed_ids])
        return optimizer
    if cfg.weight_decay:
        for v in decayed:
            v.regularizer = keras.regularizers.L2(cfg.weight_decay / 2)
    momentum = cfg.momentum if cfg.optimizer == "momentum" else 0.0
    return keras.optimizers.SGD(schedule, momentum=momentum)


# -- checkpoints ---------------------------------------------------------------------------------
def restore_and_callback(model, read_dir, write_dir, is_chief):
    """Restores the latest checkpoint of `read_dir` into `model` (weights, optimizer state,
    epoch); returns `(initial_epoch, callback saving a checkpoint to `write_dir` after every
    epoch)`. Every worker saves (saving may involve collectives); non-chiefs keep one."""
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch)
    latest = tf.train.latest_checkpoint(read_dir)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        print(f"Resumed from {latest} (epoch {int(epoch.numpy())}).", flush=True)
    manager = tf.train.CheckpointManager(checkpoint, write_dir, max_to_keep=3 if is_chief else 1)

    class EpochCheckpoint(keras.callbacks.Callback):
        def on_epoch_end(self, index, logs=None):
            epoch.assign(index + 1)
            manager.save(checkpoint_number=index + 1)

    return int(epoch.numpy()), EpochCheckpoint()


# -- training -----------------------------------------------------------------------------------
def make_train_dataset(cfg, strategy, source, info):
    """The training batches. Under a distribution strategy every input pipeline (one per
    worker) reads its own shard of the examples and makes per-replica batches, so no
    worker reads, augments and discards the others' examples."""
    def make(input_context=None):
        return data.pipeline(source, info, cfg.batch_size, training=True, augment=cfg.augment,
                             seed=cfg.seed, deterministic=cfg.deterministic,
                             input_context=input_context)

    if cfg.strategy == "default":
        return make()
    return strategy.distribute_datasets_from_function(make)


def run(cfg):
    """Trains as `cfg` (the flags) says.

    Returns:
        `(model, metrics, test_ds)`: the trained model, the metrics written to
        `metrics.json`, and the batched test split.
    """
    strategy = make_strategy(cfg.strategy, cfg.tpu, cfg.cpu_devices)
    is_chief, task_id = worker_info(strategy)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    if cfg.mixed_precision:
        on_gpu = bool(tf.config.list_logical_devices("GPU")) and cfg.strategy != "tpu"
        keras.mixed_precision.set_global_policy("mixed_float16" if on_gpu else "mixed_bfloat16")

    train_src, test_src, info = data.load(cfg.dataset, cfg.data_dir, image_size=cfg.image_size,
                                          seed=cfg.seed)
    steps_per_epoch = max(info.num_train // cfg.batch_size, 1)
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    # TPUs need static shapes: they evaluate full batches only.
    static = cfg.strategy == "tpu"
    full_batches = (math.floor if static else math.ceil)(info.num_test / cfg.batch_size)
    eval_steps = min(cfg.eval_steps or full_batches, full_batches)
    train_ds = make_train_dataset(cfg, strategy, train_src, info)
    test_ds = data.pipeline(test_src, info, cfg.batch_size, training=False,
                            deterministic=cfg.deterministic,
                            drop_remainder=static).take(eval_steps)
    # Keras splits every evaluation batch between the replicas (and the workers).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    test_ds = test_ds.with_options(options)

    with strategy.scope():
        model = build_model(cfg, info)
        optimizer = make_optimizer(cfg, model, steps_per_epoch)
        model.compile(
            optimizer=optimizer, jit_compile=cfg.jit_compile,
            loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                      label_smoothing=cfg.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
        model.optimizer.build(model.trainable_variables)

    callbacks, initial_epoch, out_dir = [], 0, None
    if cfg.model_dir:
        out_dir = cfg.model_dir if is_chief else os.path.join(cfg.model_dir, f"worker_{task_id}")
        initial_epoch, checkpointer = restore_and_callback(
            model, os.path.join(cfg.model_dir, "checkpoints"),
            os.path.join(out_dir, "checkpoints"), is_chief)
        callbacks.append(checkpointer)
        if is_chief and _tensorboard_available():
            callbacks.append(keras.callbacks.TensorBoard(os.path.join(cfg.model_dir, "logs")))

    print(f"{model.name}: {model.count_params():,} parameters, norm={cfg.norm}, "
          f"{strategy.num_replicas_in_sync} replica(s), global batch {cfg.batch_size}, "
          f"{steps_per_epoch} steps/epoch, epochs {initial_epoch + 1}..{cfg.epochs}", flush=True)
    start = time.time()
    history = model.fit(train_ds, epochs=cfg.epochs, initial_epoch=initial_epoch,
                        steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                        validation_data=test_ds if cfg.validate else None, shuffle=False,
                        verbose=cfg.verbose)
    train_seconds = time.time() - start
    test_loss, test_accuracy = model.evaluate(test_ds, verbose=0)

    metrics = {
        "model": model.name, "norm": cfg.norm, "dataset": info.name,
        "parameters": int(model.count_params()), "strategy": cfg.strategy,
        "replicas": int(strategy.num_replicas_in_sync), "global_batch_size": cfg.batch_size,
        "steps_per_epoch": steps_per_epoch, "epochs": cfg.epochs, "initial_epoch": initial_epoch,
        "optimizer_steps": int(model.optimizer.iterations.numpy()),
        "train_seconds": round(train_seconds, 2),
        "test_loss": float(test_loss), "test_accuracy": float(test_accuracy),
        "test_examples": min(info.num_test, eval_steps * cfg.batch_size),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }
    if cfg.export_dir:
        export_to = cfg.export_dir if is_chief else os.path.join(out_dir or cfg.export_dir,
                                                                  f"export_worker_{task_id}")
        # Portable: the reference path is traced, PN folded, never the fused op.
        tfpn.export_saved_model(model, export_to)
        metrics["export_dir"] = export_to
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    print(f"test accuracy {test_accuracy:.4f} ({metrics['test_examples']} examples), "
          f"test loss {test_loss:.4f}, {train_seconds:.0f} s of training", flush=True)
    return model, metrics, test_ds


def _tensorboard_available():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        logging.warning("tensorboard is not installed: no TensorBoard logs.")
        return False
    return True


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    run(FLAGS)


if __name__ == "__main__":
    app.run(main)
