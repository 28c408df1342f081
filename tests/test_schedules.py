import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import gloro
from gloro import layers, schedules



def _lin(v0, v1, u):
    return v0 + (v1 - v0) * u


def _log(v0, v1, u):
    return v0 * (v1 / v0) ** u


def _cos(v0, v1, u):
    return v1 + (v0 - v1) * (1 + math.cos(math.pi * u)) / 2


@pytest.mark.backend_neutral
@pytest.mark.parametrize(
    "spec, t, expected",
    [
        # lin between 0% and 50%, then hold.
        ("[0]-lin-[50%:2]", 0.0, 0.0),
        ("[0]-lin-[50%:2]", 0.1, _lin(0, 2, 0.2)),
        ("[0]-lin-[50%:2]", 0.3, _lin(0, 2, 0.6)),
        ("[0]-lin-[50%:2]", 0.5, 2.0),
        ("[0]-lin-[50%:2]", 0.9, 2.0),
        # log over the whole run, with scientific notation.
        ("[1e-3]-log-[1]", 0.0, 1e-3),
        ("[1e-3]-log-[1]", 0.25, _log(1e-3, 1, 0.25)),
        ("[1e-3]-log-[1]", 0.7, _log(1e-3, 1, 0.7)),
        ("[1e-3]-log-[1]", 1.0, 1.0),
        ("[0.01]-log-[50%:1.1]", 0.0, 0.01),
        ("[0.01]-log-[50%:1.1]", 0.2, _log(0.01, 1.1, 0.4)),
        ("[0.01]-log-[50%:1.1]", 0.5, 1.1),
        ("[0.01]-log-[50%:1.1]", 0.75, 1.1),
        # cos between explicit positions, with holds on both sides.
        ("[20%:4]-cos-[60%:1]", 0.0, 4.0),
        ("[20%:4]-cos-[60%:1]", 0.2, 4.0),
        ("[20%:4]-cos-[60%:1]", 0.3, _cos(4, 1, 0.25)),
        ("[20%:4]-cos-[60%:1]", 0.4, _cos(4, 1, 0.5)),
        ("[20%:4]-cos-[60%:1]", 0.5, _cos(4, 1, 0.75)),
        ("[20%:4]-cos-[60%:1]", 0.6, 1.0),
        ("[20%:4]-cos-[60%:1]", 1.0, 1.0),
        # No interpolation: hold, then step at the next point.
        ("[1]-[50%:0.1]", 0.0, 1.0),
        ("[1]-[50%:0.1]", 0.49, 1.0),
        ("[1]-[50%:0.1]", 0.5, 0.1),
        ("[1]-[50%:0.1]", 1.0, 0.1),
        ("[1]-[50%:0.1]-[0.01]", 0.99, 0.1),
        ("[1]-[50%:0.1]-[0.01]", 1.0, 0.01),
        # Equal positions: an instantaneous jump, even with an interpolation.
        ("[0]-lin-[50%:1]-[50%:3]-lin-[5]", 0.25, 0.5),
        ("[0]-lin-[50%:1]-[50%:3]-lin-[5]", 0.5, 3.0),
        ("[0]-lin-[50%:1]-[50%:3]-lin-[5]", 0.75, 4.0),
        ("[0]-lin-[50%:1]-lin-[50%:3]", 0.5, 3.0),
        # Several segments.
        ("[1.]-[50%:1.]-cos-[0.001]", 0.25, 1.0),
        ("[1.]-[50%:1.]-cos-[0.001]", 0.75, _cos(1, 0.001, 0.5)),
        ("[1.]-[50%:1.]-cos-[0.001]", 1.0, 0.001),
        ("[0]-lin-[25%:1]-[75%:1]-lin-[0.1]", 0.125, 0.5),
        ("[0]-lin-[25%:1]-[75%:1]-lin-[0.1]", 0.5, 1.0),
        ("[0]-lin-[25%:1]-[75%:1]-lin-[0.1]", 0.875, _lin(1, 0.1, 0.5)),
        ("[0]-lin-[25%:1]-[75%:1]-lin-[0.1]", 1.0, 0.1),
        ("[2.5]", 0.0, 2.5),
        ("[2.5]", 1.0, 2.5),
        ("[50%:2.5]", 0.0, 2.5),
        # Whitespace is tolerated.
        (" [ 0 ] - lin - [ 50 % : 1 ] ", 0.25, 0.5),
    ],
)
def test_values(spec, t, expected):
    value = schedules.parse(spec)(t)
    assert type(value) is float
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.backend_neutral
@pytest.mark.parametrize(
    "keyword, equivalent",
    [
        ("fixed", "[1.]"),
        ("linear", "[0.]-lin-[50%:1.]"),
        ("logarithmic", "[0.01]-log-[50%:1.]"),
        ("cosine", "[1.]-cos-[0.]"),
    ],
)
def test_keywords(keyword, equivalent):
    s, e = schedules.parse(keyword), schedules.parse(equivalent)
    for t in [i / 20 for i in range(21)]:
        assert s(t) == e(t)


@pytest.mark.backend_neutral
def test_keyword_values():
    assert schedules.parse("fixed")(0.3) == 1.0
    assert schedules.parse("linear")(0.25) == pytest.approx(0.5)
    assert schedules.parse("linear")(0.8) == 1.0
    assert schedules.parse("logarithmic")(0.25) == pytest.approx(0.1)
    assert schedules.parse("cosine")(0.5) == pytest.approx(0.5)
    assert schedules.parse("cosine")(1.0) == 0.0


@pytest.mark.backend_neutral
@pytest.mark.parametrize("t, clamped", [(-1.0, 0.0), (2.0, 1.0), (-math.inf, 0.0)])
def test_clamps_t(t, clamped):
    s = schedules.parse("[0]-lin-[1]")
    assert s(t) == s(clamped) == clamped


@pytest.mark.backend_neutral
def test_spec_str_repr():
    spec = "[0.01]-log-[50%:1.1]"
    s = schedules.parse(spec)
    assert s.spec == spec
    assert str(s) == spec
    assert repr(s) == f"Schedule(spec={spec!r})"


@pytest.mark.backend_neutral
def test_parse_is_idempotent():
    s = schedules.parse("linear")
    assert schedules.parse(s) is s
    assert isinstance(s, schedules.Schedule)


@pytest.mark.backend_neutral
def test_equality_and_hash():
    assert schedules.parse("[0]-lin-[1]") == schedules.parse("[0]-lin-[1]")
    assert hash(schedules.parse("cosine")) == hash(schedules.parse("cosine"))
    assert schedules.parse("[0]-lin-[1]") != schedules.parse("[0]-lin-[100%:1]")
    assert schedules.parse("fixed") != "fixed"


@pytest.mark.backend_neutral
def test_is_immutable():
    s = schedules.parse("fixed")
    with pytest.raises(AttributeError):
        s.spec = "linear"


@pytest.mark.backend_neutral
@pytest.mark.parametrize(
    "args, t",
    [
        ((0, 0, 10, 100), 0.0),
        ((1, 50, 4, 100), 1.5 / 4),
        ((3, 99, 4, 100), (3 + 0.99) / 4),
        ((2, 37, 4, None), 0.5),
        ((4, 0, 4, None), 1.0),
    ],
)
def test_at(args, t):
    s = schedules.parse("[0]-lin-[1]")
    assert s.at(*args) == pytest.approx(t)


@pytest.mark.backend_neutral
def test_at_keywords():
    s = schedules.parse("[0]-lin-[1]")
    assert s.at(1, 5, epochs=2, steps_per_epoch=10) == pytest.approx(0.75)
    assert s.at(1, 5, epochs=2) == pytest.approx(0.5)


@pytest.mark.backend_neutral
def test_at_rejects_no_epochs():
    with pytest.raises(ValueError, match="epochs"):
        schedules.parse("fixed").at(0, 0, 0)


@pytest.mark.backend_neutral
@pytest.mark.parametrize(
    "spec, reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("constant", "unknown keyword 'constant'"),
        ("log", "unknown keyword 'log'"),
        ("Linear", "unknown keyword 'Linear'"),
        ("fixed-[1]", "expected a point"),
        ("[0]-foo-[1]", "unknown interpolation 'foo'"),
        ("[x]", "bad number 'x'"),
        ("[]", "bad number ''"),
        ("[1.2.3]", "bad number '1.2.3'"),
        ("[50%:]", "bad number ''"),
        ("[nan]", "bad number 'nan'"),
        ("[1e999]", "too large"),
        ("[0]-[1]-[2]", "point 2 needs a position"),
        ("[0]-lin-[1]-lin-[2]", "point 2 needs a position"),
        ("[50%:1]-[25%:2]", "positions must not decrease"),
        ("[0]-lin-[60%:1]-[40%:2]-[3]", "positions must not decrease"),
        ("[0]-log-[1]", "'log' needs values > 0"),
        ("[1]-log-[0.]", "'log' needs values > 0"),
        ("[0]-", "trailing '-'"),
        ("[0]-lin-", "trailing '-'"),
        ("[0]-lin", "trailing 'lin'"),
        ("-[0]", "expected a point"),
        ("[0]--[1]", "expected a point"),
        ("[0]-lin-lin-[1]", "expected a point"),
        ("[0][1]", "expected '-'"),
        ("[0]-lin[1]", "expected '-'"),
        ("[150%:1]", "over 100%"),
        ("[100.5%:1]", "over 100%"),
        ("[-1]", "negative value"),
        ("[-5%:1]", "negative position"),
        ("[0]-lin-[-1]", "negative value"),
        ("[50:1]", "must be a percentage"),
        ("[1%:2:3]", "more than one ':'"),
        ("[0", "unbalanced '['"),
        ("[0]]", "unbalanced ']'"),
        ("0.5", "unexpected character '0'"),
        ("[0]+[1]", "unexpected character '+'"),
    ],
)
def test_malformed(spec, reason):
    with pytest.raises(ValueError) as info:
        schedules.parse(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert reason in message


@pytest.mark.backend_neutral
@pytest.mark.parametrize("spec", [None, 1.0, ["fixed"], b"fixed"])
def test_wrong_type(spec):
    with pytest.raises(TypeError):
        schedules.parse(spec)


# tests/test_backends.py runs the core, schedules included, with TensorFlow
# made unimportable in the JAX and torch passes; this subprocess check of the
# module alone is in the long tier.
@pytest.mark.slow
@pytest.mark.backend_neutral
def test_no_tensorflow_on_jax():
    # With the JAX backend the schedules (ScheduledLearningRate included)
    # must work where TensorFlow is not installed. The file is loaded on its
    # own, so that only its own imports count.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('s', {schedules.__file__!r})\n"
        "schedules = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(schedules)\n"
        "lr = schedules.ScheduledLearningRate('cosine', 1.0, 10)\n"
        "assert abs(float(lr(5)) - 0.5) < 1e-6\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ------------------------------------------------------ ScheduledLearningRate

# Every interpolation, holds before and after, jumps (also between equal
# positions) and a lone point.
LR_SPECS = [
    "[0.01]-log-[50%:1.1]",
    "[1.]-[50%:1.]-cos-[0.001]",
    "[0]-lin-[25%:1]-[75%:1]-lin-[0.1]",
    "[20%:4]-cos-[60%:1]",
    "[1]-[50%:0.1]-[0.01]",
    "[0]-lin-[50%:1]-[50%:3]-lin-[5]",
    "[0]-lin-[50%:1]-lin-[50%:3]",
    "[1e-3]-log-[1]",
    "[2.5]",
    "fixed",
    "cosine",
]


@pytest.mark.parametrize("spec", LR_SPECS)
def test_scheduled_learning_rate_matches_schedule(spec):
    total = 1000
    lr = schedules.ScheduledLearningRate(spec, 3e-3, total)
    steps = np.concatenate([np.arange(-20, 1200, 7), [0, 200, 250, 500, 600, 750, 999, 1000]])
    expected = np.array([3e-3 * schedules.parse(spec)(s / total) for s in steps])
    # float32 progress: a relative error of a few ulps in the multiplier.
    tolerance = {"rtol": 1e-5, "atol": 3e-3 * 1e-7}
    # One call on the whole vector: the evaluation is elementwise.
    vector = keras.ops.convert_to_numpy(lr(np.asarray(steps, "int32")))
    np.testing.assert_allclose(vector, expected, **tolerance)
    for s, e in zip(steps[::9], expected[::9]):
        np.testing.assert_allclose(float(keras.ops.convert_to_numpy(lr(int(s)))), e, **tolerance)


def test_scheduled_learning_rate_config_round_trip():
    lr = schedules.ScheduledLearningRate(schedules.parse("cosine"), 0.1, 40)
    config = lr.get_config()
    assert config == {"schedule": "cosine", "initial_learning_rate": 0.1, "total_steps": 40}
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(lr))
    assert type(clone) is schedules.ScheduledLearningRate
    assert clone.get_config() == config


@pytest.mark.parametrize("kwargs, match", [
    ({"initial_learning_rate": -1.0}, "initial_learning_rate"),
    ({"initial_learning_rate": float("nan")}, "initial_learning_rate"),
    ({"initial_learning_rate": True}, "initial_learning_rate"),
    ({"total_steps": 0}, "total_steps"),
    ({"total_steps": 10.0}, "total_steps"),
])
def test_scheduled_learning_rate_rejects_bad_arguments(kwargs, match):
    args = {"schedule": "cosine", "initial_learning_rate": 0.1, "total_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        schedules.ScheduledLearningRate(**args)


def test_scheduled_learning_rate_rejects_bad_schedule():
    with pytest.raises(ValueError, match=r"\[0\]-foo-\[1\]"):
        schedules.ScheduledLearningRate("[0]-foo-[1]", 0.1, 10)


def _plain_model():
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")(inputs))


def test_scheduled_learning_rate_drives_fit():
    # SGD on a linear model with zero data except one coordinate: each step
    # moves the weight by exactly lr * gradient, so the weight trajectory
    # reveals the rate used at every step.
    spec = "[1.]-[50%:1.]-cos-[0.1]"
    total = 12
    lr = schedules.ScheduledLearningRate(spec, 0.01, total)
    model = _plain_model()
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    x = np.array([[1.0, 0.0, 0.0]], "float32")
    # With the target far away the gradient of (w - y)^2 is 2 (w - y); record
    # w after every step and recover each step's rate from the update.
    y = np.array([[1000.0]], "float32")
    weights = []

    class Weights(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            weights.append(float(keras.ops.convert_to_numpy(self.model.weights[0])[0, 0]))

    model.fit(x, y, epochs=total, batch_size=1, verbose=0, callbacks=[Weights()])
    previous = np.array([0.0] + weights[:-1])
    used = (np.array(weights) - previous) / (2 * (1000.0 - previous))
    expected = [0.01 * schedules.parse(spec)(s / total) for s in range(total)]
    np.testing.assert_allclose(used, expected, rtol=1e-3)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == total


def test_scheduled_learning_rate_saved_with_optimizer(tmp_path):
    lr = schedules.ScheduledLearningRate("[1.]-cos-[0.01]", 0.05, 20)
    model = _plain_model()
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse")
    x = np.ones((8, 3), "float32")
    model.fit(x, np.ones((8, 1), "float32"), epochs=1, batch_size=2, verbose=0)
    path = str(tmp_path / "plain.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    restored = keras.saving.deserialize_keras_object(loaded.optimizer.get_config()["learning_rate"])
    assert type(restored) is schedules.ScheduledLearningRate
    assert restored.get_config() == lr.get_config()
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == 4
    # The optimizer's current rate is the schedule's at the restored step.
    current = float(keras.ops.convert_to_numpy(loaded.optimizer.learning_rate))
    assert current == pytest.approx(0.05 * schedules.parse("[1.]-cos-[0.01]")(4 / 20), rel=1e-5)


@pytest.mark.slow
def test_scheduled_learning_rate_saved_in_a_gloronet(tmp_path, rng):
    spec = "[1.]-cos-[0.01]"
    inputs = keras.Input((4,))
    g = gloro.GloroNet(inputs, layers.Dense(3)(layers.MinMax()(layers.Dense(8)(inputs))), epsilon=0.3)
    g.compile(optimizer=keras.optimizers.Adam(schedules.ScheduledLearningRate(spec, 1e-3, 10)),
              loss="sparse_crossentropy")
    x = rng.normal(size=(12, 4)).astype("float32")
    y = rng.integers(0, 3, 12)
    g.fit(x, y, epochs=1, batch_size=4, verbose=0)
    path = str(tmp_path / "g.keras")
    g.save(path)
    loaded = gloro.load_model(path)
    restored = keras.saving.deserialize_keras_object(loaded.optimizer.get_config()["learning_rate"])
    assert type(restored) is schedules.ScheduledLearningRate
    assert restored.get_config() == {"schedule": spec, "initial_learning_rate": 1e-3, "total_steps": 10}
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == 3
    current = float(keras.ops.convert_to_numpy(loaded.optimizer.learning_rate))
    assert current == pytest.approx(1e-3 * schedules.parse(spec)(3 / 10), rel=1e-5)
    # Training goes on from the restored step.
    loaded.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == 6
