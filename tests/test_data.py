"""Data sources and pipelines: IDX reader, Fashion-MNIST, TFDS (mocked, never downloaded),
synthetic data, augmentation, determinism."""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
import data  # noqa: E402  (examples/data.py)
from helpers import write_idx  # noqa: E402


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_read_idx(tmp_path, rng, suffix, dtype):
    array = rng.integers(0, 200, (3, 5, 4)).astype(dtype)
    path = str(tmp_path / f"a-idx3{suffix}")
    write_idx(path, array, dtype)
    got = data.read_idx(path)
    assert got.shape == (3, 5, 4)
    np.testing.assert_array_equal(got, array)


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="Received: path="):
        data.read_idx(str(path))


def _fake_fashion_mnist(folder, rng, n_train=12, n_test=5):
    arrays = {}
    for split, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        x = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(str(folder / f"{split}-images-idx3-ubyte{ext}"), x)
        write_idx(str(folder / f"{split}-labels-idx1-ubyte{ext}"), y)
        arrays[split] = (x, y)
    return arrays


def test_fashion_mnist_from_a_folder_gzipped_or_not(tmp_path, rng):
    arrays = _fake_fashion_mnist(tmp_path, rng)
    splits = data.load_fashion_mnist(str(tmp_path))
    for split, key in (("train", "train"), ("test", "t10k")):
        x, y = splits[split]
        assert x.shape == (len(arrays[key][0]), 28, 28, 1) and x.dtype == np.uint8
        np.testing.assert_array_equal(x[..., 0], arrays[key][0])
        np.testing.assert_array_equal(y, arrays[key][1])
    train, test, info = data.load("fashion_mnist", str(tmp_path))
    assert (info.num_train, info.num_test, info.image_shape, info.num_classes) == (12, 5, (28, 28, 1), 10)
    x = arrays["train"][0].astype(np.float64)
    np.testing.assert_allclose(info.mean, [x.mean()], rtol=1e-12)
    np.testing.assert_allclose(info.std, [x.std()], rtol=1e-12)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion_mnist", str(tmp_path))


@pytest.mark.skipif(not data.fashion_mnist_available(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_has_6000_and_1000_images_per_class():
    splits = data.load_fashion_mnist()
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)


def test_synthetic_data_is_learnable_and_seeded():
    x, y = data.synthetic_arrays(600, (8, 8, 1), num_classes=4, seed=3)
    assert x.dtype == np.uint8 and x.shape == (600, 8, 8, 1) and set(np.unique(y)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(data.synthetic_arrays(600, (8, 8, 1), 4, seed=3)[0], x)
    # A nearest-class-mean classifier fit on 500 examples classifies the other 100.
    flat = x.reshape(600, -1).astype(np.float64)
    means = np.stack([flat[:500][y[:500] == c].mean(0) for c in range(4)])
    predicted = np.argmin(((flat[500:, None] - means) ** 2).sum(-1), axis=1)
    assert np.mean(predicted == y[500:]) > 0.95


def _source(rng, n=10, shape=(6, 5, 2)):
    x = rng.integers(0, 256, (n,) + shape).astype(np.uint8)
    y = np.arange(n) % 3
    info = data.DatasetInfo("t", shape, 3, n, n, (0.0, 0.0), (1.0, 1.0))
    return tf.data.Dataset.from_tensor_slices((x, y)), x, y, info


def test_eval_pipeline_keeps_order_pixels_and_the_last_batch(rng):
    ds, x, y, info = _source(rng)
    batches = list(data.pipeline(ds, info, 4, training=False))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    images = np.concatenate([b[0].numpy() for b in batches])
    assert images.dtype == np.float32
    np.testing.assert_array_equal(images, x.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([b[1].numpy() for b in batches]), np.eye(3)[y])
    first = next(iter(data.pipeline(ds, info, 4, training=False, data_format="channels_first")))
    np.testing.assert_array_equal(first[0].numpy(), np.transpose(x[:4], (0, 3, 1, 2)))


def test_training_augmentation_is_a_padded_crop_possibly_flipped(rng):
    ds, x, y, info = _source(rng)
    pad = 2
    batches = data.pipeline(ds, info, 5, training=True, pad=pad, seed=1, deterministic=True)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = x.shape[1:3]
    seen_flip = seen_shift = False
    for images, labels in batches.take(8):   # repeats: 4 epochs of 10 images
        assert images.shape == (5, height, width, 2)
        for image, label in zip(images.numpy(), labels.numpy().argmax(1)):
            matches = [(i, j, flip) for n in range(len(x)) if y[n] == label
                       for i in range(2 * pad + 1) for j in range(2 * pad + 1)
                       for flip in (False, True)
                       if np.array_equal(image, (lambda c: c[:, ::-1] if flip else c)(
                           padded[n, i:i + height, j:j + width]))]
            assert matches, "an augmented image is no padded crop of a same-class image"
            seen_flip |= any(flip for _, _, flip in matches) and not any(
                not flip for _, _, flip in matches)
            seen_shift |= (pad, pad) not in [(i, j) for i, j, _ in matches]
    assert seen_flip and seen_shift


def test_deterministic_pipelines_repeat_exactly_and_depend_on_the_seed(rng):
    ds, _, _, info = _source(rng, n=40)
    take = lambda seed: [b[0].numpy() for b in data.pipeline(  # noqa: E731
        ds, info, 8, training=True, seed=seed, deterministic=True).take(6)]
    a, b, c = take(0), take(0), take(1)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_input_pipelines_read_disjoint_shards_in_per_replica_batches(rng):
    ds, x, _, info = _source(rng, n=24)
    seen = []
    for pipeline_id in range(2):   # 2 workers with 2 replicas each, global batch 8
        context = tf.distribute.InputContext(num_input_pipelines=2,
                                             input_pipeline_id=pipeline_id,
                                             num_replicas_in_sync=4)
        batches = data.pipeline(ds, info, 8, training=True, augment=False, seed=3,
                                deterministic=True, input_context=context)
        images = [b[0].numpy() for b in batches.take(6)]   # 12 examples: one epoch of a shard
        assert all(len(b) == 2 for b in images)
        seen.append({image.tobytes() for batch in images for image in batch})
    expected = [{image.astype(np.float32).tobytes() for image in x[i::2]} for i in range(2)]
    assert seen == expected


def test_pipeline_errors(rng):
    ds, _, _, info = _source(rng)
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        data.pipeline(ds, info, 0, training=True)
    context = tf.distribute.InputContext(num_replicas_in_sync=4)
    with pytest.raises(ValueError, match="multiple of the 4 replicas. Received: batch_size=6"):
        data.pipeline(ds, info, 6, training=True, input_context=context)


def test_tfds_dataset_prepared_in_data_dir_mocked(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        train, test, info = data.load("tfds:cifar10", str(tmp_path))
        assert (info.image_shape, info.num_classes, info.num_train) == ((32, 32, 3), 10, 24)
        images, labels = next(iter(data.pipeline(train, info, 8, training=True)))
    assert images.shape == (8, 32, 32, 3) and labels.shape == (8, 10)


def test_tfds_dataset_not_prepared_is_never_downloaded(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
        data.load("cifar10", str(tmp_path))
    assert not any(tmp_path.rglob("*.tfrecord*"))
    with pytest.raises(ValueError, match="Received: dataset='no_such_dataset'"):
        data.load("no_such_dataset", str(tmp_path))
