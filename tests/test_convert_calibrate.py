"""convert_model(..., calibration_data=...): the converted model reproduces the BN model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as R
from calibration_cases import (exact_case, exact_model, random_resnet, relative_error,
                               set_statistics)
import tf_proxynorm as tfpn
from tf_proxynorm._backend import all_layers
from tf_proxynorm.layers.channel_affine import ChannelAffine

L = keras.layers


def test_exact_case_every_absorption(rng):
    model, x, held_out = exact_case(rng, 64, 16)
    new, report = tfpn.convert_model(model, "in+pn", calibration_data=x)
    # b1/b2/b4: IN+PN; b5 linear keeps its shift (calibration reproduces the BN's beta).
    assert new.get_layer("b5").center and not new.get_layer("b5").proxy_norm
    assert new.get_layer("c2").use_bias                          # the shift went there
    assert not new.get_layer("c1").use_bias
    assert isinstance(new.get_layer("b2_calibration_shift"), ChannelAffine)
    assert isinstance(new.get_layer("b4_calibration_affine"), ChannelAffine)
    actions = {(s.old, s.new): s.action for s in report}
    assert "shift into bias" in actions[("b1", "c2")]
    assert "'b2_calibration_shift'" in actions[("b2", "c3")]
    assert "no single linear layer" in actions[("b4", "b4_calibration_affine")]
    errors = {s.old: s.error for s in report if s.error is not None}
    assert set(errors) == {"b1", "b2", "b4", "b5", "exact"}
    assert max(errors.values()) < 1e-4, errors
    assert relative_error(new(held_out), model(held_out)) < 1e-4
    plain, _ = tfpn.convert_model(model, "in+pn")
    assert relative_error(plain(held_out), model(held_out)) > 0.1


@pytest.fixture(scope="module")
def resnet_case():
    model, x = random_resnet(1, 16, 160, statistics_of=128)
    new, report = tfpn.convert_model(model, "gn+pn", groups=4, calibration_data=x[:128])
    return model, new, report, x


def test_resnet_calibrated_far_better_than_plain_on_held_out_data(resnet_case):
    model, new, report, x = resnet_case
    held_out = x[128:]
    ref = model(held_out)
    plain, _ = tfpn.convert_model(model, "gn+pn", groups=4)
    plain_error = relative_error(plain(held_out), ref)
    calibrated_error = relative_error(new(held_out), ref)
    # Plain conversion computes another function (relative error 0.9-1.0); calibration
    # leaves what GN's per-example statistics cannot express: on this random-weight
    # ResNet-8 (4 groups, Gaussian inputs), 0.19 with this seed, 0.14-0.23 over three
    # initializations; the bounds leave that margin. Trained networks: docs/finetune.md.
    print(f"held-out relative error of the logits: plain {plain_error:.3f}, calibrated "
          f"{calibrated_error:.3f}, calibrated on the calibration data {report[-1].error:.3f}")
    assert plain_error > 0.5
    assert calibrated_error < 0.3
    assert calibrated_error < plain_error / 3
    # On held-out data as on the calibration data.
    assert calibrated_error < 2 * report[-1].error + 0.02


def test_first_layer_fit_matches_float64_lstsq(resnet_case):
    model, new, _, x = resnet_case
    calibration = x[:128]
    # The first norm's input is the stem conv's output in both models.
    h = keras.Model(model.inputs, model.get_layer("stem_conv").output)(calibration)
    h = np.asarray(keras.ops.convert_to_numpy(h), np.float64)
    bn, norm = model.get_layer("stage1_block1_norm1"), new.get_layer("stage1_block1_norm1")
    y = R.group_normalize(h, 4).reshape(-1, h.shape[-1])
    scale = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    t = (h.reshape(-1, h.shape[-1]) - bn.moving_mean.numpy()) * scale + bn.beta.numpy()
    for c in range(h.shape[-1]):
        (g, b), *_ = np.linalg.lstsq(np.stack([y[:, c], np.ones(len(y))], 1), t[:, c],
                                     rcond=None)
        np.testing.assert_allclose([norm.gamma.numpy()[c], norm.beta.numpy()[c]], [g, b],
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(norm.proxy_beta.numpy(), y.mean(0), atol=1e-5)
    np.testing.assert_allclose(norm.proxy_gamma.numpy(), y.std(0) - 1.0, atol=1e-4)


def test_report_has_each_layers_error(resnet_case):
    model, new, report, x = resnet_case
    bn_steps = [s for s in report if s.action.startswith("BatchNormAct ->")]
    assert len(bn_steps) == 7 and all(0 <= s.error < 0.5 for s in bn_steps)
    assert all(s.error is None for s in report[:-1] if s not in bn_steps)
    assert report[-1].action.startswith("calibrated on 128 inputs")
    assert report[-1].error == pytest.approx(
        relative_error(new(x[:128]), model(x[:128])), rel=1e-3)


@pytest.fixture(scope="module")
def small_case():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 4, 4, 3)).astype("float32")
    inputs = keras.Input((4, 4, 3))
    y = L.Activation("relu", name="a")(L.BatchNormalization(name="bn")(
        L.Conv2D(4, 1, name="c")(inputs)))
    model = keras.Model(inputs, L.Dense(2, name="fc")(L.GlobalAveragePooling2D()(y)))
    set_statistics(model, x, rng)
    return model, x


def _generator(x):
    for i in range(0, len(x), 3):
        yield x[i:i + 3], np.zeros(len(x[i:i + 3]))


@pytest.mark.parametrize("wrap", [
    lambda x: tf.data.Dataset.from_tensor_slices(x).batch(3),
    lambda x: tf.data.Dataset.from_tensor_slices((x, np.zeros(len(x)))).batch(2),
    _generator,
    lambda x: [x[:1], x[1:]],
    tf.constant,
])
def test_input_types_give_the_array_result(small_case, wrap):
    model, x = small_case
    ref, _ = tfpn.convert_model(model, "gn+pn", groups=2, calibration_data=x)
    new, report = tfpn.convert_model(model, "gn+pn", groups=2, calibration_data=wrap(x))
    assert report[-1].action.startswith("calibrated on 4 inputs")
    for a, b in zip(ref.weights, new.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("data, match", [
    ("images", r"must be an array.*Received: calibration_data='images'"),
    ({"x": 1}, r"must be an array.*Received: calibration_data=\{'x': 1\}"),
    (3.0, r"must be an array.*Received: calibration_data=3.0"),
    (object(), r"must be an array.*Received: calibration_data=<object"),
    (np.zeros((0, 4, 4, 3), "float32"), r"is empty.*Received: calibration_data=<ndarray of "
                                        r"shape \(0, 4, 4, 3\)"),
    ([], r"is empty.*Received: calibration_data=\[\]"),
    (np.zeros((2, 5, 4, 3), "float32"), r"input shape \(None, 4, 4, 3\); found an element of "
                                        r"shape \(2, 5, 4, 3\)"),
    (tf.data.Dataset.from_tensor_slices(np.zeros((2, 4, 4, 3), "float32")),
     r"with \.batch\(n\).*Received: calibration_data=<_TensorSliceDataset"),
    (np.array([["a"]]), r"must hold numbers.*dtype <U1"),
    ([np.zeros((1, 4, 4, 3)), "x"], "must hold numbers; found an element of dtype <U1"),
    ([([[1.0], [1.0, 2.0]], 0)], r"holds an element that is not an array: \[\[1.0\], \[1.0, 2"),
])
def test_bad_calibration_data(small_case, data, match):
    model, _ = small_case
    with pytest.raises(ValueError, match=match):
        tfpn.convert_model(model, "gn+pn", groups=2, calibration_data=data)


def test_calibration_needs_a_group_norm(small_case):
    model, x = small_case
    with pytest.raises(ValueError, match="GroupNormAct.*Received: norm='evonorm_s0'"):
        tfpn.convert_model(model, "evonorm_s0", calibration_data=x)


def test_nested_model_is_calibrated(small_case, rng):
    model, x = small_case
    outer = keras.Sequential([keras.Input((4, 4, 3)), L.Rescaling(2.0), model,
                              L.Dense(1, name="head")], name="outer")
    new, report = tfpn.convert_model(outer, "gn+pn", groups=2, calibration_data=x)
    inner_steps = [s for s in report if s.old == s.new == f"{model.name}/bn"]
    assert len(inner_steps) == 1 and 0 < inner_steps[0].error < 0.5   # 4 images, 2 groups
    plain, _ = tfpn.convert_model(outer, "gn+pn", groups=2)
    assert report[-1].error < relative_error(plain(x), outer(x))
    twice_in = keras.Input((4, 4, 3))
    twice = keras.Model(twice_in, L.Add()([model(twice_in), model(twice_in * 2.0)]))
    with pytest.raises(ValueError, match="called 2 times"):
        tfpn.convert_model(twice, "gn+pn", groups=2, calibration_data=x)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ResNet50", "ResNet50V2", "MobileNetV2", "EfficientNetB0"])
def test_keras_applications(name):
    rng = np.random.default_rng(3)
    model = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=4,
                                              classifier_activation=None)
    x = rng.standard_normal((8, 32, 32, 3)).astype("float32") * 30 + 100
    set_statistics(model, x, rng)
    # Distillation on one of them (a training step's compile costs 20-40 s on 2 cores):
    # EfficientNet, whose squeeze-excitation multiplications take `ChannelAffine` inverses.
    steps = 2 if name == "EfficientNetB0" else 0
    new, report = tfpn.convert_model(model, "gn+pn", groups=8, calibration_data=x,
                                     calibration_steps=steps)
    errors = [s.error for s in report if s.error is not None]
    n_bn = sum(isinstance(l, L.BatchNormalization) for l in all_layers(model))
    assert len(errors) == n_bn + 1 + bool(steps) and all(np.isfinite(errors))
    if steps:
        assert report[-1].action.startswith("distilled 2 steps on 8 inputs")
        assert report[-1].error == pytest.approx(relative_error(new(x), model(x)), rel=1e-3)
    plain, _ = tfpn.convert_model(model, "gn+pn", groups=8)
    # Random weights and 1x1 deep feature maps: GN is far from BN there; still closer.
    assert relative_error(new(x), model(x)) < relative_error(plain(x), model(x))


def test_keras_hub_resnet_backbone():
    """KerasHub's ResNetBackbone, built from a config (nothing downloaded)."""
    keras_hub = pytest.importorskip("keras_hub")
    rng = np.random.default_rng(4)
    keras.utils.set_random_seed(4)
    model = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(16, 16, 3))
    x = rng.standard_normal((24, 16, 16, 3)).astype("float32")
    set_statistics(model, x[:16], rng)
    new, report = tfpn.convert_model(model, "gn+pn", groups=8, calibration_data=x[:16])
    assert not any(isinstance(l, L.BatchNormalization) for l in all_layers(new))
    plain, _ = tfpn.convert_model(model, "gn+pn", groups=8)
    held_out = x[16:]
    assert (relative_error(new(held_out), model(held_out))
            < relative_error(plain(held_out), model(held_out)) / 3)


def _fold_places(report):
    """{(PN layer, absorbing layer or "affine"): bias exact} from fold_for_inference's report."""
    out = {}
    for s in report:
        if "no single linear layer absorbs it" in s.action:
            out[(s.old, "affine")] = None
        elif "affine folded" in s.action:
            out[(s.old, s.new)] = "shift into bias" in s.action
    return out


def _calibration_places(report):
    out = {}
    for s in report:
        if s.action.startswith("calibration: PN's output affine undone"):
            if s.new.endswith("_calibration_affine"):
                out[(s.old, "affine")] = None
            else:
                out[(s.old, s.new)] = "shift into bias" in s.action
    return out


@pytest.mark.parametrize("case", ["exact", "resnet", "mobilenet"])
def test_affine_undone_where_fold_for_inference_folds_it(case, resnet_case, rng):
    if case == "exact":
        model, norm, kwargs, x = exact_model(), "in+pn", {}, rng.standard_normal((4, 6, 6, 4))
    elif case == "resnet":
        model, _, _, x = resnet_case
        norm, kwargs, x = "gn+pn", {"groups": 4}, x[:4]
    else:
        model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3),
                                               classes=3, alpha=0.35)
        norm, kwargs, x = "gn+pn", {"groups": 4}, rng.standard_normal((2, 32, 32, 3))
    plain, _ = tfpn.convert_model(model, norm, **kwargs)
    _, fold_report = tfpn.fold_for_inference(plain, return_report=True, inference_layers=False)
    _, report = tfpn.convert_model(model, norm, calibration_data=x.astype("float32"), **kwargs)
    places = _calibration_places(report)
    assert places and places == _fold_places(fold_report)


def test_epsilon_search_picks_the_least_squares_best_epsilon(resnet_case, monkeypatch):
    """`calibrate.EPSILON_FACTORS`: each layer's epsilon is the candidate (its own, or a
    factor times the median group variance of the first calibration batch) whose per-channel
    least-squares fit of BN's pre-activation leaves the smallest residual (float64 lstsq)."""
    from tf_proxynorm import calibrate

    model, _, _, x = resnet_case
    factors = (0.1, 1.0, 100.0)
    monkeypatch.setattr(calibrate, "EPSILON_FACTORS", factors)
    new, _ = tfpn.convert_model(model, "gn+pn", groups=4, calibration_data=x[:128])
    h = keras.Model(model.inputs, model.get_layer("stem_conv").output)(x[:128])
    h = np.asarray(keras.ops.convert_to_numpy(h), np.float64)
    bn = model.get_layer("stage1_block1_norm1")
    scale = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    t = (h.reshape(-1, h.shape[-1]) - bn.moving_mean.numpy()) * scale + bn.beta.numpy()
    g = h[:calibrate.BATCH_SIZE].reshape(calibrate.BATCH_SIZE, -1, 4, h.shape[-1] // 4)
    variance = np.median(g.var(axis=(1, 3)))
    candidates = [1e-3] + [f * variance for f in factors]

    def residual(eps):
        y = R.group_normalize(h, 4, epsilon=eps).reshape(-1, h.shape[-1])
        total = 0.0
        for c in range(h.shape[-1]):
            a = np.stack([y[:, c], np.ones(len(y))], 1)
            coef, *_ = np.linalg.lstsq(a, t[:, c], rcond=None)
            total += float(((a @ coef - t[:, c]) ** 2).sum())
        return total

    residuals = [residual(eps) for eps in candidates]
    best = candidates[int(np.argmin(residuals))]
    chosen = new.get_layer("stage1_block1_norm1").epsilon
    np.testing.assert_allclose(chosen, best, rtol=1e-4)
    assert residual(chosen) <= residual(1e-3)
    # The setting is kept in the layer's config (a saved model reloads with it).
    assert new.get_layer("stage1_block1_norm1").get_config()["epsilon"] == chosen
