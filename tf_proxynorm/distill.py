"""Distillation after calibration: the norm parameters refined on the BN model's outputs.

`convert_model(model, "gn+pn", calibration_data=x, calibration_steps=n)` calls `distill`
after the layer-wise least-squares fit of `calibrate.py`. That fit leaves a structural
residual (GN normalizes each example by its own statistics, BN by the population's: an
image's own contrast and per-group mean vanish at the first norm), and each layer is fitted
alone. Distillation fits them together: the converted model's outputs are regressed on the
BN model's outputs on the calibration inputs (mean squared error; no labels), training only
what calibration set (each new norm's `gamma`/`beta`/proxy parameters and the
`ChannelAffine` layers that undo Proxy Norm's affine) with Adam and a cosine learning rate,
every other weight frozen and every layer in inference mode. On the fine-tuning study's
CIFAR ResNet-20 (docs/finetune.md, 3 seeds, 256 images, 800 steps): the logits' relative
error from 0.52-0.56 to 0.07-0.08, task-A accuracy from 85.4% to 89.4%, the BN models' own.
"""

import keras
import numpy as np

from tf_proxynorm.calibrate import BATCH_SIZE

LEARNING_RATE = 3e-3
SEED = 0


def _outputs(model, x):
    """The model's outputs on `x` (inference mode), flattened per example into one float32
    matrix (several outputs side by side)."""
    outputs = keras.tree.flatten(model(x, training=False))
    return keras.ops.concatenate(
        [keras.ops.reshape(keras.ops.cast(o, "float32"), (keras.ops.shape(o)[0], -1))
         for o in outputs], axis=-1)


class _Student(keras.Model):
    """The converted model in inference mode, its outputs as `_outputs` gives them."""

    def __init__(self, model):
        super().__init__(name=f"{model.name}_distilled")
        self.converted = model

    def call(self, x):
        return _outputs(self.converted, x)


class _Batches(keras.utils.PyDataset):
    """`steps` shuffled batches of `(x, target)`, epoch after epoch."""

    def __init__(self, x, targets, steps, batch_size):
        super().__init__()
        self.x, self.targets, self.steps = x, targets, steps
        self.batch_size = min(batch_size, len(x))
        rng = np.random.default_rng(SEED)
        need = steps * self.batch_size
        self.order = np.concatenate([rng.permutation(len(x))
                                     for _ in range(-(-need // len(x)))])[:need]

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        index = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        return self.x[index], self.targets[index]


def _walk(model):
    """`(containers, leaves)`: the nested models of `model` (itself first) and the other
    layers, outer before inner. Not `_backend.all_layers`: that also lists the sublayers of
    a layer, which must follow their layer's flag, not get one of their own."""
    containers, leaves = [model], []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            inner, inner_leaves = _walk(layer)
            containers += inner
            leaves += inner_leaves
        else:
            leaves.append(layer)
    return containers, leaves


def trained_layers(pairs):
    """What distillation trains: the new norms and the `ChannelAffine` layers that undo
    Proxy Norm's output affine (`calibrate.Pair`s)."""
    return [layer for pair in pairs for layer in (pair.new, pair.shift, pair.inverse)
            if layer is not None]


def distill(old_model, new_model, pairs, batches, steps):
    """Trains `trained_layers(pairs)` of `new_model` for `steps` steps so that its outputs
    match `old_model`'s on the calibration `batches` (NumPy arrays), whatever their
    trainable flags; every other weight is frozen. The trainable flags of `new_model` and
    its layers are restored afterwards."""
    x = np.concatenate(batches)
    targets = np.concatenate([keras.ops.convert_to_numpy(_outputs(old_model, b))
                              for b in batches])
    containers, leaves = _walk(new_model)
    trained = {id(layer) for layer in trained_layers(pairs)}
    saved = [(layer, layer.trainable) for layer in containers + leaves]
    try:
        for layer in containers:
            layer.trainable = True
        for layer in leaves:
            layer.trainable = id(layer) in trained
        student = _Student(new_model)
        schedule = keras.optimizers.schedules.CosineDecay(LEARNING_RATE, steps)
        student.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")
        student.fit(_Batches(x, targets, steps, BATCH_SIZE), epochs=1, shuffle=False,
                    verbose=0)            # _Batches shuffles
    finally:
        for layer, trainable in saved:          # outer first: inner flags win
            layer.trainable = trainable
