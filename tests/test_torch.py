"""What only the torch backend has: a GloroNet trained by a plain PyTorch
loop (the README's example) and `torch.utils.data` input. Runs in the
torch test process."""

import re

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="runs in the torch test process")

torch = pytest.importorskip("torch")

import gloro  # noqa: E402
from gloro import layers  # noqa: E402


def blobs(rng, n=512, classes=3, spread=0.15):
    centres = np.array([[np.cos(a), np.sin(a)] for a in 2 * np.pi * np.arange(classes) / classes])
    labels = rng.integers(0, classes, size=n)
    return (centres[labels] + spread * rng.normal(size=(n, 2))).astype("float32"), labels


def make_net(seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((2,))
    z = layers.MinMax()(layers.Dense(32)(x))
    z = layers.MinMax()(layers.Dense(32)(z))
    return gloro.GloroNet(x, layers.Dense(3)(z), epsilon=0.1)


@pytest.mark.parametrize("loss", ["crossentropy", "emma"])
def test_a_pytorch_loop_certifies_with_the_constants_of_its_weights(loss, rng):
    x_train, y_train = blobs(rng)
    g = make_net()
    g.freeze_lipschitz()
    frozen_before = g.lipschitz_constant()

    # The README's loop ("Backends", PyTorch).
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        batch_size=64, shuffle=True,
    )
    optimizer = torch.optim.Adam(g.parameters(), lr=1e-2)
    loss_fn = gloro.losses.Crossentropy()
    if loss == "emma":
        g.compile(loss="emma")
    for epoch in range(10):
        for xb, yb in loader:
            optimizer.zero_grad()
            out = g(xb, training=True)
            if loss == "emma":
                batch_loss = g.compute_loss(x=xb, y=yb, y_pred=out)
            else:
                batch_loss = loss_fn(yb, out)
            batch_loss.backward()
            optimizer.step()

    # The loop moved the weights, so the constants frozen before it no
    # longer certify anything...
    assert not g.lipschitz_frozen
    direct = keras.ops.convert_to_numpy(g(x_train, training=False))
    assert np.all(direct.argmax(axis=1) == 3)

    # ... and `predict` certifies with the constants of the new weights,
    # those a fresh GloroNet on them computes.
    out = g.predict(x_train, verbose=0)
    fresh = make_net(seed=1)
    fresh.f.set_weights(g.f.get_weights())
    expected = fresh.freeze_lipschitz()
    np.testing.assert_array_equal(g.lipschitz_constant(), expected)
    assert not np.array_equal(expected, frozen_before)
    np.testing.assert_array_equal(out, fresh.predict(x_train, verbose=0))
    # The loop trained a robust model: most training points certified.
    vra = np.mean(out.argmax(axis=1) == y_train)
    assert vra > 0.8, vra
    # Certified means certified at the new constants' radius.
    radius = g.certified_radius(x_train)
    np.testing.assert_array_equal(out.argmax(axis=1) < 3, radius > g.epsilon)


def test_the_optimizer_over_parameters_trains_exactly_the_trainable_weights():
    g = make_net()
    trainable = {id(v.value) for v in g.trainable_variables}
    with_grad = [p for p in g.parameters() if p.requires_grad]
    assert {id(p) for p in with_grad} == trainable
    # The caches, epsilon, constants and certified copies take no gradient.
    assert len(list(g.parameters())) == len(g.variables)


def test_fit_and_evaluate_take_a_dataloader(rng):
    x, y = blobs(rng, n=256)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=64
    )
    g = make_net()
    g.compile(optimizer=keras.optimizers.Adam(1e-2), loss="crossentropy", metrics=["vra"])
    history = g.fit(loader, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert g.lipschitz_frozen
    from_loader = g.evaluate(loader, verbose=0, return_dict=True)
    from_arrays = g.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    assert from_loader["vra"] == pytest.approx(from_arrays["vra"], abs=1e-6)


def _hook_sites(g):
    """Hook registrations that change what `g` computes, by where they run."""
    dense = g.f.layers[1]
    scale = lambda module, inputs, output: output * 1000.0  # noqa: E731
    return {
        f"layer '{dense.name}'": lambda: dense.register_forward_hook(scale),
        f"layer '{g.name}'": lambda: g.register_forward_hook(scale),
        "every module (a global hook)": lambda: torch.nn.modules.module.register_module_forward_hook(
            lambda module, inputs, output: scale(module, inputs, output) if module is dense else None
        ),
    }


@pytest.mark.parametrize("site", ["layer 'hidden'", "layer 'g'", "every module (a global hook)"])
def test_a_forward_hook_is_refused_where_it_would_change_the_certificate(site, rng):
    x, y = blobs(rng, n=128)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((2,))
    z = layers.MinMax()(layers.Dense(32, name="hidden")(inputs))
    g = gloro.GloroNet(model=keras.Model(inputs, layers.Dense(3)(z), name="f"), epsilon=0.1, name="g")
    g.compile(loss="crossentropy")
    before = g.predict(x, verbose=0)
    logits = keras.ops.convert_to_numpy(g.f(x))
    handle = _hook_sites(g)[site]()
    try:
        # The hook does change the network the bound was computed for.
        if site != "layer 'g'":
            assert not np.array_equal(keras.ops.convert_to_numpy(g.f(x)), logits)
        calls = {
            "call": lambda: g(x, training=False),
            "training call": lambda: g(x, training=True),
            "predict": lambda: g.predict(x, verbose=0),
            "predict_on_batch": lambda: g.predict_on_batch(x),
            "evaluate": lambda: g.evaluate(x, y, verbose=0),
            "fit": lambda: g.fit(x, y, epochs=1, verbose=0),
        }
        for name, call in calls.items():
            with pytest.raises(ValueError, match=re.escape(f"forward hook or pre-hook would run on {site}")) as error:
                call()
            assert "handle.remove()" in str(error.value), name
    finally:
        handle.remove()
    np.testing.assert_array_equal(g.predict(x, verbose=0), before)


def test_a_forward_hook_on_the_logits_model_does_not_reach_the_gloronet(rng):
    # A hook on `g.f` itself runs on direct calls `g.f(x)` only: the GloroNet
    # runs the graph of `g.f`'s layers, so it neither refuses the hook nor
    # computes with it.
    x, y = blobs(rng, n=128)
    g = make_net()
    g.compile(loss="crossentropy")
    before = {"predict": g.predict(x, verbose=0), "evaluate": g.evaluate(x, y, verbose=0)}
    logits = keras.ops.convert_to_numpy(g.f(x))
    handle = g.f.register_forward_pre_hook(lambda module, args: (args[0] * 0.0,))
    try:
        assert not np.array_equal(keras.ops.convert_to_numpy(g.f(x)), logits)
        np.testing.assert_array_equal(g.predict(x, verbose=0), before["predict"])
        np.testing.assert_array_equal(g.predict_on_batch(x), before["predict"])
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(g(x, training=False)), before["predict"])
        assert g.evaluate(x, y, verbose=0) == before["evaluate"]
        g.fit(x, y, epochs=1, verbose=0)
    finally:
        handle.remove()


def test_certificates_under_a_callers_autocast_come_from_float32_logits(rng):
    x, y = blobs(rng, n=256)
    g = make_net()
    g.compile(optimizer=keras.optimizers.Adam(1e-2), loss="crossentropy")
    g.fit(x, y, epochs=3, batch_size=64, verbose=0)
    tensor = torch.from_numpy(x)
    expected = {
        "predict": g.predict(x, verbose=0),
        "predict_on_batch": g.predict_on_batch(x),
        "call": keras.ops.convert_to_numpy(g(tensor, training=False)),
    }
    hidden = g.f.layers[1]
    outside = keras.ops.convert_to_numpy(hidden(tensor))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # The caller's autocast does round what a layer computes ...
        assert not np.array_equal(keras.ops.convert_to_numpy(hidden(tensor)), outside)
        got = {
            "predict": g.predict(x, verbose=0),
            "predict_on_batch": g.predict_on_batch(x),
            "call": keras.ops.convert_to_numpy(g(tensor, training=False)),
        }
        # ... and is still on after the certifying calls.
        assert torch.is_autocast_enabled("cpu")
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


PRECISION_SWITCHES = {
    "torch.backends": torch.backends,
    "cuda.matmul": torch.backends.cuda.matmul,
    "cudnn": torch.backends.cudnn,
    "cudnn.conv": torch.backends.cudnn.conv,
    "mkldnn": torch.backends.mkldnn,
    "mkldnn.matmul": torch.backends.mkldnn.matmul,
    "mkldnn.conv": torch.backends.mkldnn.conv,
}


def _precision_state():
    return {name: switch.fp32_precision for name, switch in PRECISION_SWITCHES.items()}


def _set_by_the_caller(setting):
    if setting == "set_float32_matmul_precision('medium')":
        torch.set_float32_matmul_precision("medium")
    elif setting == "fp32_precision tf32 / bf16":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.backends.mkldnn.conv.fp32_precision = "bf16"


@pytest.mark.parametrize("setting", ["defaults", "set_float32_matmul_precision('medium')", "fp32_precision tf32 / bf16"])
def test_the_certifying_pass_runs_in_full_float32_whatever_the_caller_set(setting, rng, monkeypatch):
    """The switches that torch's kernels read (the numbers only differ on
    GPUs and on CPUs with bfloat16 units, which this test cannot assume)."""
    x, _ = blobs(rng, n=64)
    g = make_net()
    expected = g.predict(x, verbose=0)
    seen = []
    min_max = gloro.backend.pair_min_max
    monkeypatch.setattr(gloro.backend, "pair_min_max", lambda z: (seen.append(_precision_state()), min_max(z))[1])
    saved = _precision_state()
    try:
        _set_by_the_caller(setting)
        callers = _precision_state()
        if setting != "defaults":
            assert "bf16" in callers.values() and "tf32" in callers.values()
        np.testing.assert_array_equal(g.predict(x, verbose=0), expected)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(g(x, training=False)), expected)
        # Every MinMax of the certifying passes ran with every switch at full float32 ...
        assert seen and all(set(state.values()) == {"ieee"} for state in seen), seen
        # ... and the caller gets back exactly what it set.
        assert _precision_state() == callers
        # A training pass is the caller's to make: its switches stay.
        seen.clear()
        g(x, training=True)
        assert seen and all(state == callers for state in seen), seen
    finally:
        for name, value in saved.items():
            PRECISION_SWITCHES[name].fp32_precision = value


def test_train_refuses_every_strategy_on_torch(tmp_path, monkeypatch):
    # tf.distribute is TensorFlow's and keras.distribution JAX's (Keras
    # 3.15 has no torch distribution): one device per process on torch.
    pytest.importorskip("tensorflow")
    import importlib.util
    from pathlib import Path

    from typer.testing import CliRunner

    path = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    spec = importlib.util.spec_from_file_location("_train_on_torch", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}}')
    for strategy, needed in (("mirrored", "tensorflow"), ("multiworker", "tensorflow"), ("data_parallel", "jax")):
        result = CliRunner().invoke(train.app, ["--strategy", strategy, "--out", str(tmp_path / "out")])
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code == 2, result.output
        assert len(errors) == 1 and "--strategy" in errors[0] and f"needs the {needed} backend" in errors[0], errors
    assert not (tmp_path / "out").exists()


# torch.compile takes about a minute here: the long tier.
@pytest.mark.slow
def test_torch_compile_certifies_what_the_eager_call_does(rng):
    """`jit_compile=True` (torch.compile, which a model saved on JAX brings
    along in its compile config) traces the certificate and gives what the
    eager call gives."""
    x, _ = blobs(rng, n=64)
    g = make_net()
    g.compile(optimizer="adam", loss="crossentropy", jit_compile=True)
    compiled = g.predict(x, verbose=0)
    eager = keras.ops.convert_to_numpy(g(x, training=False))
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    clear = np.abs(eager[:, :3].max(axis=1) - eager[:, 3]) > 1e-3
    assert clear.sum() > 32
    np.testing.assert_array_equal(compiled[clear].argmax(1), eager[clear].argmax(1))


def test_the_certifying_call_runs_under_torch_func_transforms(rng):
    """The ⊥ logit reads logits that need no gradient through NumPy; the
    tensors of `torch.func` transforms have no memory to read, so there it
    stays in torch: the outputs equal the plain call's and the input
    gradient equals autograd's."""
    x, _ = blobs(rng, n=16)
    g = make_net()
    g.freeze_lipschitz()
    t = torch.tensor(x)
    with torch.no_grad():
        eager = g(t, training=False)
    batched = torch.func.vmap(lambda row: g(row[None], training=False)[0])(t)
    np.testing.assert_array_equal(batched.detach().numpy(), eager.numpy())

    def bottom_sum(inputs):
        return g(inputs, training=False)[:, -1].sum()

    leaf = t.clone().requires_grad_(True)
    bottom_sum(leaf).backward()
    np.testing.assert_allclose(torch.func.grad(bottom_sum)(t).detach().numpy(), leaf.grad.numpy(), rtol=1e-6, atol=1e-7)
    assert leaf.grad.abs().sum() > 0


def test_backward_hooks_run_in_a_certifying_call(rng):
    """Outside training the GloroNet calls most layers' `call` directly;
    a layer carrying a torch backward hook (which only its `__call__` runs)
    is called through `__call__`, so the hook sees the gradient."""
    x, _ = blobs(rng, n=8)
    g = make_net()
    g.freeze_lipschitz()
    seen = []
    layer = g.f.layers[1]
    handle = layer.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0].shape))
    try:
        g(torch.tensor(x), training=False)[:, :-1].sum().backward()
    finally:
        handle.remove()
    assert seen and seen[0][0] == len(x)
