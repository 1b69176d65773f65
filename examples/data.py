"""Image classification data for the examples and tests: sources and `tf.data` pipelines.

It serves the scripts of this folder (`import data`; run them from the repository root, as
`python examples/train.py`) and is not part of the installed package (formerly `tfpn.data`:
see the README's Changelog).

Three sources, all returned as `(train, test, info)` where `train` / `test` are unbatched
`tf.data.Dataset`s of `(image uint8 HWC, label int)` and `info` is a `DatasetInfo`:

- `"fashion_mnist"`: the four IDX files (gzipped or not) of Fashion-MNIST, read from
  `data_dir` or from `/usr/share/datasets/fashion-mnist/` (Debian's
  `dataset-fashion-mnist` package). Nothing is downloaded.
- any TFDS name (`"cifar10"`, `"tfds:cifar10"`, ...): a dataset already prepared in
  `data_dir` (`download=False, try_gcs=False`).
- `"synthetic"`: random class prototypes plus noise, deterministic and learnable, for
  smoke tests.

`pipeline()` turns a source into batches: shuffling, pad + random crop + horizontal flip
for training, float32 pixels in [0, 255], one-hot labels, prefetching. Its random ops are
stateless and seeded per example, so `deterministic=True` reproduces every batch.
"""

import dataclasses
import gzip
import os

import numpy as np
import tensorflow as tf

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
# IDX element types (third byte of the magic number) -> numpy dtype (big-endian).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a dataset.

    Attributes:
        name: the dataset's name.
        image_shape: `(height, width, channels)` of one image.
        num_classes: number of classes.
        num_train, num_test: number of examples of the splits.
        mean, std: per-channel pixel mean and standard deviation of the training images
            (in [0, 255]), for a `keras.layers.Normalization` at the model's input.
    """

    name: str
    image_shape: tuple
    num_classes: int
    num_train: int
    num_test: int
    mean: tuple
    std: tuple


def read_idx(path):
    """Reads an IDX file (the MNIST format), gzipped or not, into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"Not an IDX file (bad magic number). Received: path={path!r}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"IDX file {path!r} holds {data.size} values, its header says "
                         f"shape {shape}. Received: path={path!r}")
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(data_dir, stem):
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    return None


def fashion_mnist_available(data_dir=None):
    """Whether the four Fashion-MNIST IDX files are in `data_dir` (or the default folder)."""
    data_dir = data_dir or FASHION_MNIST_DIR
    return all(_find_idx(data_dir, stem) for pair in _FASHION_MNIST_FILES.values()
               for stem in pair)


def load_fashion_mnist(data_dir=None):
    """Fashion-MNIST as numpy arrays: `{"train": (x, y), "test": (x, y)}`.

    Images are uint8 of shape (N, 28, 28, 1), labels int64 in [0, 10).

    Args:
        data_dir: folder with `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
            `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]`. Defaults to
            `/usr/share/datasets/fashion-mnist`.

    Raises:
        FileNotFoundError: when a file is missing, saying how to get them.
    """
    data_dir = data_dir or FASHION_MNIST_DIR
    out = {}
    for split, (images, labels) in _FASHION_MNIST_FILES.items():
        paths = [_find_idx(data_dir, stem) for stem in (images, labels)]
        if None in paths:
            missing = [s for s, p in zip((images, labels), paths) if p is None]
            raise FileNotFoundError(
                f"Fashion-MNIST file(s) {missing} (optionally .gz) not found in {data_dir!r}. "
                "On Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` (files go to "
                f"{FASHION_MNIST_DIR}); otherwise download the four IDX files from "
                "https://github.com/zalandoresearch/fashion-mnist and pass their folder as "
                f"`data_dir`. Received: data_dir={data_dir!r}")
        x, y = (read_idx(p) for p in paths)
        out[split] = (x[..., None], y.astype("int64"))
    return out


def synthetic_arrays(num_examples, image_shape=(28, 28, 1), num_classes=10, seed=0):
    """A learnable synthetic dataset: a random prototype per class plus noise, uint8."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 255, (num_classes,) + tuple(image_shape))
    labels = rng.integers(0, num_classes, num_examples)
    noise = rng.normal(0, 48, (num_examples,) + tuple(image_shape))
    images = np.clip(0.6 * prototypes[labels] + 0.4 * 127.5 + noise, 0, 255).astype("uint8")
    return images, labels.astype("int64")


def _channel_stats(images):
    x = np.asarray(images, "float64").reshape(-1, images.shape[-1])
    return tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in x.std(0))


def _from_arrays(name, splits, num_classes):
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    mean, std = _channel_stats(x_train)
    info = DatasetInfo(name, tuple(x_train.shape[1:]), num_classes, len(x_train), len(x_test),
                       mean, std)
    make = lambda x, y: tf.data.Dataset.from_tensor_slices((x, y))  # noqa: E731
    return make(x_train, y_train), make(x_test, y_test), info


def _load_tfds(name, data_dir, image_size):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except Exception as e:  # tfds raises its own DatasetNotFoundError subclasses.
        raise ValueError(f"Unknown dataset (neither built in nor in TFDS). "
                         f"Received: dataset={name!r}") from e
    test_split = "test" if "test" in builder.info.splits or not builder.info.splits else (
        "validation")
    try:
        train, test = (tfds.load(name, split=s, data_dir=data_dir, as_supervised=True,
                                 download=False, try_gcs=False) for s in ("train", test_split))
    except AssertionError as e:  # tfds' "could not find data" when not prepared.
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}. Prepare it once "
            f"with `tfds build {name} --data_dir=<dir>` on a machine with network access, "
            f"then pass that folder as `data_dir`. Received: data_dir={data_dir!r}") from e
    shape = tuple(builder.info.features["image"].shape)
    if image_size:
        shape = (image_size, image_size, shape[-1])
        resize = lambda x, y: (tf.cast(tf.clip_by_value(tf.round(  # noqa: E731
            tf.image.resize(x, shape[:2])), 0, 255), tf.uint8), y)
        train, test = train.map(resize), test.map(resize)
    elif None in shape:
        raise ValueError(f"TFDS dataset {name!r} has images of varying size {shape}: pass "
                         f"`image_size`. Received: image_size={image_size!r}")
    sample = np.stack([x for x, _ in tfds.as_numpy(train.take(1000))])
    mean, std = _channel_stats(sample)
    sizes = [int(ds.cardinality()) if ds.cardinality() >= 0 else
             builder.info.splits[s].num_examples for ds, s in ((train, "train"), (test, test_split))]
    info = DatasetInfo(name, shape, builder.info.features["label"].num_classes, *sizes,
                       mean, std)
    return train, test, info


def load(name, data_dir=None, *, image_size=None, synthetic_examples=(1024, 256),
         synthetic_shape=(28, 28, 1), num_classes=10, seed=0):
    """Returns `(train, test, info)`: unbatched datasets of `(uint8 image, int64 label)`.

    Args:
        name: `"fashion_mnist"`, `"synthetic"`, or a TFDS name (optionally `"tfds:name"`).
            `"fashion_mnist"` reads the IDX files; when they are missing and a TFDS
            `fashion_mnist` is prepared in `data_dir`, that one is used.
        data_dir: where the data is (see the module docstring).
        image_size: resize TFDS images to this square size (needed for datasets whose
            images vary in size).
        synthetic_examples: `(train, test)` sizes of the synthetic dataset.
        synthetic_shape, num_classes, seed: shape, classes and seed of the synthetic dataset.

    Raises:
        FileNotFoundError: when the data is not there, with how to get it.
        ValueError: for an unknown dataset name.
    """
    key = name.strip().lower()
    if key == "synthetic":
        n_train, n_test = synthetic_examples
        x, y = synthetic_arrays(n_train + n_test, synthetic_shape, num_classes, seed)
        splits = {"train": (x[:n_train], y[:n_train]), "test": (x[n_train:], y[n_train:])}
        return _from_arrays("synthetic", splits, num_classes)
    if key == "fashion_mnist" and (fashion_mnist_available(data_dir) or not _tfds_prepared(
            "fashion_mnist", data_dir)):
        return _from_arrays("fashion_mnist", load_fashion_mnist(data_dir), 10)
    return _load_tfds(key.removeprefix("tfds:"), data_dir, image_size)


def _tfds_prepared(name, data_dir):
    if not data_dir:
        return False
    try:
        import tensorflow_datasets as tfds
        return tfds.builder(name, data_dir=data_dir, try_gcs=False).is_prepared()
    except Exception:  # not installed, or not a TFDS folder: fall back to the IDX reader.
        return False


def _augment(image, seed, pad):
    """Pad + random crop + horizontal flip with stateless ops seeded per example."""
    height, width = image.shape[0], image.shape[1]
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.stateless_random_crop(padded, tf.shape(image), seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return tf.ensure_shape(image, (height, width, image.shape[-1]))


def pipeline(dataset, info, batch_size, *, training, augment=True, pad=4, seed=0,
             deterministic=False, repeat=None, drop_remainder=None,
             data_format="channels_last", shuffle_buffer=10_000, input_context=None):
    """Batches a source of `(uint8 image, label)` for training or evaluation.

    Yields `(images, one_hot_labels)`: float32 pixels in [0, 255] (normalization belongs
    to the model, so exported models take raw pixels) and float32 one-hot labels.

    Args:
        dataset: an unbatched `tf.data.Dataset` from `load`.
        info: its `DatasetInfo`.
        batch_size: the (global) batch size.
        training: shuffle, augment, repeat and drop the last partial batch.
        augment: pad by `pad` pixels, random crop back, random horizontal flip.
        seed: seed of the shuffling and of the augmentation.
        deterministic: reproducible element order with parallel maps (evaluation
            pipelines always keep the order of the source).
        repeat, drop_remainder: override the training defaults.
        data_format: `"channels_first"` transposes images to CHW.
        shuffle_buffer: size of the shuffle buffer.
        input_context: the `tf.distribute.InputContext` that
            `strategy.distribute_datasets_from_function` passes: this input pipeline then
            reads its own shard of the examples (`dataset.shard(num_input_pipelines,
            input_pipeline_id)`, before shuffling), augments it with its own seeds, and
            makes per-replica batches of `batch_size / num_replicas_in_sync` examples.

    Returns:
        A prefetched `tf.data.Dataset`.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
    if input_context is not None:
        replicas = input_context.num_replicas_in_sync
        if batch_size % replicas:
            raise ValueError(f"`batch_size` (the global batch) must be a multiple of the "
                             f"{replicas} replicas. Received: batch_size={batch_size}")
        batch_size = input_context.get_per_replica_batch_size(batch_size)
        if input_context.num_input_pipelines > 1:
            dataset = dataset.shard(input_context.num_input_pipelines,
                                    input_context.input_pipeline_id)
            seed += 1_000_003 * input_context.input_pipeline_id
    repeat = training if repeat is None else repeat
    drop_remainder = training if drop_remainder is None else drop_remainder
    deterministic = bool(deterministic) or not training
    options = tf.data.Options()
    options.deterministic = deterministic
    ds = dataset.with_options(options)
    if training:
        ds = ds.cache().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if training and augment:
        seeds = tf.data.Dataset.random(seed=seed).batch(2).map(
            lambda s: tf.cast(s, tf.int64))
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: (_augment(xy[0], s, pad), xy[1]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    num_classes = info.num_classes

    def finish(x, y):
        x = tf.cast(x, tf.float32)
        if data_format == "channels_first":
            x = tf.transpose(x, (0, 3, 1, 2))
        return x, tf.one_hot(tf.cast(y, tf.int32), num_classes)

    ds = ds.batch(batch_size, drop_remainder=drop_remainder).map(
        finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    return ds.prefetch(tf.data.AUTOTUNE)
