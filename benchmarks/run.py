#!/usr/bin/env python
"""What a GloRo Net costs next to the same network trained as a plain Keras model.

Every figure is a ratio measured side by side in one process (memory: also in
fresh subprocesses), on the same synthetic data, batch size, optimizer and
thread settings, with tracing excluded and the median of several repetitions
reported:

1. training: seconds per epoch, GloroNet over plain (target <= 1.15);
2. certification: examples per second of the frozen GloroNet's `predict` over
   the plain network's `predict` (target >= 0.95);
3. memory per instance during training and certification (target: GloroNet
   within 1.2x of plain);
4. Lipschitz upkeep: `refresh_lipschitz()` from a random and from a warm start,
   and `freeze_lipschitz()`;
5. the stale-weight check: `predict` of the GloroNet against the same GloroNet
   whose in-graph weight check is a constant True (target >= 0.95), and the
   Python-side `_ensure_frozen()` per `predict` call.

The networks are the GloRo paper's CNNs and a LiResNet (`--networks
liresnet`: depth 6, width 32 on 32x32x3 inputs), whose plain counterpart is
the same residual network written in plain Keras: each block
`conv(x; I + W) + b` becomes `x + conv(x; W) + b` (a `keras.layers.Conv2D`
and an `Add`), with the same weights.

Runs on the Keras backend of the process (KERAS_BACKEND=tensorflow, jax or
torch); all three feed tf.data pipelines. The TF allocator figures and the ablations are
TensorFlow-only.

Usage (from the repository root):

    python benchmarks/run.py --quick          # smoke check, under ~2 minutes
    python benchmarks/run.py                  # full run, writes benchmarks/results.json
    KERAS_BACKEND=jax python benchmarks/run.py   # writes benchmarks/results_jax.json
    KERAS_BACKEND=torch python benchmarks/run.py --sections train,certify,stale   # results_torch.json
    python benchmarks/run.py --ablations      # also: where the time goes (TensorFlow)
    python benchmarks/run.py --networks liresnet --sections train,memory --out benchmarks/liresnet.json

See BENCHMARKS.md for the method and the latest figures.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

NUM_CLASSES = 10
TRAIN_BATCH = 256
CERTIFY_BATCH = 512

# name -> input shape, training examples, certification examples, epsilon,
# and the options of gloro.architectures.get, if any.
NETWORKS = {
    "cnn_2C2F": {"input_shape": (28, 28, 1), "train_examples": 60_000, "certify_examples": 10_000, "epsilon": 0.3},
    "cnn_6C2F": {"input_shape": (32, 32, 3), "train_examples": 10_000, "certify_examples": 10_000, "epsilon": 36 / 255},
    "cnn_4C3F": {"input_shape": (28, 28, 1), "train_examples": 60_000, "certify_examples": 10_000, "epsilon": 1.58},
    "cnn_8C2F": {"input_shape": (64, 64, 3), "train_examples": 10_000, "certify_examples": 10_000, "epsilon": 36 / 255},
    "liresnet": {"input_shape": (32, 32, 3), "train_examples": 1_024, "certify_examples": 1_024, "epsilon": 36 / 255,
                 "options": {"depth": 6, "width": 32}},
    # LiResNet at depth 12: width 32 for counting kernels, and the paper's
    # width for a GPU.
    "liresnet12": {"input_shape": (32, 32, 3), "train_examples": 1_024, "certify_examples": 1_024,
                   "epsilon": 36 / 255, "architecture": "liresnet", "options": {"depth": 12, "width": 32}},
    "liresnet12_w256": {"input_shape": (32, 32, 3), "train_examples": 10_000, "certify_examples": 10_000,
                        "epsilon": 36 / 255, "architecture": "liresnet", "options": {"depth": 12, "width": 256}},
}
DEFAULT_NETWORKS = ("cnn_2C2F", "cnn_6C2F")
QUICK_EXAMPLES = {"cnn_2C2F": (6_144, 2_048), "cnn_6C2F": (768, 1_024),
                  "cnn_4C3F": (2_048, 2_048), "cnn_8C2F": (512, 1_024), "liresnet": (512, 512)}

SECTIONS = ("train", "certify", "batch", "stale", "memory", "lipschitz", "ablations")

TARGETS = {"train_ratio_max": 1.15, "certify_ratio_min": 0.95, "batch_ratio_max": 1.05, "stale_check_ratio_min": 0.95,
           "memory_ratio_max": 1.2}

MB = 1024.0 * 1024.0

# RSS is noisy at the MB level: its per-instance slope is taken between B and 4B.
RSS_BATCH_FACTOR = 4

# ------------------------------------------------------------ measurement


def _proc_stat_busy():
    """Busy and total jiffies of the whole machine (all cores), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    return sum(fields[:8]) - idle


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Clock:
    """Wall time, this process's CPU time (all threads) and the CPU time the
    rest of the machine used meanwhile (`background`, in cores)."""

    def start(self):
        self._busy = _proc_stat_busy()
        self._cpu = time.process_time()
        self._wall = time.perf_counter()
        return self

    def stop(self):
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        busy = _proc_stat_busy()
        background = None
        if busy is not None and self._busy is not None and wall > 0:
            background = max(0.0, ((busy - self._busy) / _CLK_TCK - cpu) / wall)
        return {"wall": wall, "cpu": cpu, "background": background}


def timed(fn):
    clock = Clock().start()
    result = fn()
    return clock.stop(), result


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def summarize(samples):
    """Median (and range) of wall, CPU and background load of timing samples."""
    walls = [s["wall"] for s in samples]
    return {
        "wall_median": median(walls),
        "wall_min": min(walls) if walls else None,
        "wall_max": max(walls) if walls else None,
        "cpu_median": median([s["cpu"] for s in samples]),
        "background_median": median([s["background"] for s in samples]),
        "samples": samples,
    }


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


# ---------------------------------------------------------------- models


def _setup(args):
    """TensorFlow (imported on every backend: the input pipelines are tf.data),
    with its thread settings applied when it is also the Keras backend."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if args.intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
    if args.inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
    return tf


def _architecture(name, seed):
    """`gloro.architectures.get` for a network of NETWORKS."""
    from gloro import architectures

    spec = NETWORKS[name]
    return architectures.get(spec.get("architecture", name), spec["input_shape"], NUM_CLASSES, seed=seed,
                             **spec.get("options", {}))


def _plain_layer(layer):
    """keras.layers.Dense/Conv2D for the gloro layers (which add norm caches),
    the layer's own class otherwise; same configuration, new weights."""
    import keras
    from gloro import layers as gl

    if type(layer) is gl.Dense:
        return keras.layers.Dense.from_config(layer.get_config())
    if type(layer) is gl.Conv2D:
        return keras.layers.Conv2D.from_config(layer.get_config())
    return layer.__class__.from_config(layer.get_config())


def _plain_residual_copy(model):
    """A LiResNet chain as the plain residual network a Keras user would
    write: each `LiResNetBlock` (`conv(x; I + W) + b`) becomes
    `Add()([x, keras.layers.Conv2D(...)(x)])` with kernel `W` and bias `b`,
    the other layers as in `_plain_keras_copy`; same weights, so the same
    function."""
    import keras
    from gloro import layers as gl

    inputs = keras.Input(model.input_shape[1:])
    z = inputs
    for layer in model.layers[1:]:
        if isinstance(layer, gl.LiResNetBlock):
            new = keras.layers.Conv2D(layer.filters, layer.kernel_size, padding="same",
                                      use_bias=layer.use_bias, name=layer.name)
            z = keras.layers.Add()([z, new(z)])
        else:
            new = _plain_layer(layer)
            z = new(z)
        if isinstance(new, (keras.layers.Dense, keras.layers.Conv2D)):
            assert not isinstance(new, gl.SpectralNormCache)
            new.kernel.assign(layer.kernel)
            if new.use_bias:
                new.bias.assign(layer.bias)
    return keras.Model(inputs, z, name=f"plain_{model.name}")


def _plain_keras_copy(model):
    """The same network with keras.layers.Dense/Conv2D instead of the gloro
    layers (which add norm caches), and the same weights."""
    import keras
    from gloro import layers as gl

    plain = keras.models.clone_model(model, clone_function=_plain_layer)
    for old, new in zip(model.layers, plain.layers):
        if isinstance(new, (keras.layers.Dense, keras.layers.Conv2D)):
            assert not isinstance(new, gl.SpectralNormCache)
            new.kernel.assign(old.kernel)
            if new.use_bias:
                new.bias.assign(old.bias)
    return plain


def build_models(name, seed, baseline, jit, power_iterations=None):
    """`(plain, gloro)`: the same architecture and initial weights, compiled
    with Adam(1e-3); plain with sparse categorical cross-entropy from logits,
    GloroNet with gloro's "crossentropy" on the m + 1 logits."""
    import keras
    import gloro

    spec = NETWORKS[name]
    f_plain = _architecture(name, seed)
    if baseline == "keras":
        f_plain = _plain_residual_copy(f_plain) if spec.get("architecture", name) == "liresnet" else _plain_keras_copy(f_plain)
    plain = f_plain
    plain.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    f = _architecture(name, seed)
    # None keeps GloroNet's own default.
    extra = {} if power_iterations is None else {"power_iterations": power_iterations}
    g = gloro.GloroNet(model=f, epsilon=spec["epsilon"], **extra)
    g.compile(optimizer=keras.optimizers.Adam(1e-3), loss="crossentropy", jit_compile=jit)
    return plain, g


def synthetic_data(shape, n, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.random((n,) + tuple(shape), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    return x, y


def _callbacks():
    import keras
    import gloro

    class EpochTimer(keras.callbacks.Callback):
        """Times each epoch from on_epoch_begin to on_epoch_end (no per-batch hooks)."""

        def __init__(self):
            super().__init__()
            self.samples = []

        def on_epoch_begin(self, epoch, logs=None):
            self._clock = Clock().start()

        def on_epoch_end(self, epoch, logs=None):
            self.samples.append(self._clock.stop())

    class TimedRefresh(gloro.callbacks.LipschitzRefresh):
        """GloroNet.fit's end-of-training freeze, split and timed: the warm
        power-iteration refresh, then freeze_lipschitz (guaranteed bounds)."""

        def __init__(self):
            super().__init__()
            self.record = False
            self.refresh, self.freeze = [], []

        def on_train_end(self, logs=None):
            if not self.record:
                return super().on_train_end(logs)
            sample, _ = timed(self.model.refresh_lipschitz)
            self.refresh.append(sample)
            sample, _ = timed(self.model.freeze_lipschitz)
            self.freeze.append(sample)

    return EpochTimer, TimedRefresh


# ------------------------------------------------------------- 1 training


def make_dataset(tf, arrays, batch):
    """A batched tf.data pipeline with a fixed prefetch and tf.data autotuning
    off: with autotuning on, the end of an iteration now and then stalls for
    ~0.55 s on this machine (one fit epoch or predict call in three or so),
    which has nothing to do with the model and swamps short measurements."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.from_tensor_slices(arrays).batch(batch).prefetch(2).with_options(options)


def _fit_data(x, y, input_kind):
    """kwargs for fit: a dataset (x is then the dataset) or the numpy arrays."""
    if input_kind == "numpy":
        return {"x": x, "y": y, "batch_size": TRAIN_BATCH, "shuffle": True}
    return {"x": x, "shuffle": False}   # synthetic data: the order does not matter


def bench_training(plain, g, x, y, repeats, log, input_kind="dataset"):
    """Interleaved single-epoch fits (plain, gloro, gloro, plain, ...) after
    one untimed warm-up epoch each. `x` is a tf.data.Dataset of (inputs,
    labels) batches unless `input_kind` is "numpy"."""
    EpochTimer, TimedRefresh = _callbacks()
    timers = {"plain": EpochTimer(), "gloro": EpochTimer()}
    refresh = TimedRefresh()
    models = {"plain": plain, "gloro": g}
    first, losses = {}, {}

    def epoch(kind, timed_run):
        callbacks = [timers[kind]]
        if kind == "gloro":
            refresh.record = timed_run
            callbacks.append(refresh)
        history = models[kind].fit(**_fit_data(x, y, input_kind), epochs=1, verbose=0, callbacks=callbacks)
        losses[kind] = float(history.history["loss"][-1])
        if not timed_run:
            first[kind] = timers[kind].samples.pop()

    for kind in ("plain", "gloro"):
        epoch(kind, False)
        log(f"    warm-up epoch {kind}: {first[kind]['wall']:.2f} s (includes tracing)")
    for r in range(repeats):
        order = ("plain", "gloro") if r % 2 == 0 else ("gloro", "plain")
        for kind in order:
            epoch(kind, True)
        log("    repeat {}: plain {:.2f} s, gloro {:.2f} s (background load {:.2f} cores)".format(
            r + 1, timers["plain"].samples[-1]["wall"], timers["gloro"].samples[-1]["wall"],
            timers["gloro"].samples[-1]["background"] or 0.0))
    out = {k: summarize(t.samples) for k, t in timers.items()}
    for k in out:
        out[k]["first_epoch_wall"] = first[k]["wall"]
        out[k]["final_loss"] = losses[k]
    paired = [gs["wall"] / ps["wall"] for gs, ps in zip(timers["gloro"].samples, timers["plain"].samples)]
    out["ratio_wall"] = _ratio(out["gloro"]["wall_median"], out["plain"]["wall_median"])
    out["ratio_cpu"] = _ratio(out["gloro"]["cpu_median"], out["plain"]["cpu_median"])
    out["ratio_wall_paired_median"] = median(paired)
    # Contention only ever adds time, so the fastest epoch is the least disturbed one.
    out["ratio_wall_min"] = _ratio(out["gloro"]["wall_min"], out["plain"]["wall_min"])
    out["steps_per_epoch"] = len(x) if input_kind != "numpy" else -(-len(x) // TRAIN_BATCH)
    out["warm_refresh"] = summarize(refresh.refresh)
    out["warm_freeze"] = summarize(refresh.freeze)
    return out


# -------------------------------------------------------- 2 certification


def interleaved_predict(models, x, repeats, n_examples, input_kind="dataset"):
    """Throughput of `predict` for two models `{"base": ..., "other": ...}`:
    one untimed warm-up call each (traces), then interleaved timed calls.
    Returns the summaries, the ratios other / base (wall and CPU time) and
    the other model's last outputs. `x` is a tf.data.Dataset of input batches
    unless `input_kind` is "numpy"."""
    kwargs = {"batch_size": CERTIFY_BATCH} if input_kind == "numpy" else {}
    (base, _), (other, _) = models.items()
    for m in models.values():
        m.predict(x, verbose=0, **kwargs)
    samples = {k: [] for k in models}
    outputs = None
    for r in range(repeats):
        for kind in ((base, other) if r % 2 == 0 else (other, base)):
            sample, out = timed(lambda: models[kind].predict(x, verbose=0, **kwargs))
            samples[kind].append(sample)
            if kind == other:
                outputs = out
    res = {k: summarize(v) for k, v in samples.items()}
    for k in models:
        res[k]["examples_per_s"] = n_examples / res[k]["wall_median"]
        res[k]["examples_per_cpu_s"] = n_examples / res[k]["cpu_median"]
    res["ratio"] = _ratio(res[other]["examples_per_s"], res[base]["examples_per_s"])
    res["ratio_cpu"] = _ratio(res[other]["examples_per_cpu_s"], res[base]["examples_per_cpu_s"])
    return res, outputs


def bench_certification(plain, g, x, repeats, log, n_examples, input_kind="dataset"):
    """Frozen GloroNet `predict` against plain `predict`."""
    import numpy as np

    g.freeze_lipschitz()
    res, outputs = interleaved_predict({"plain": plain, "gloro": g}, x, repeats, n_examples, input_kind)
    res["rejection_rate"] = float(np.mean(np.argmax(outputs, axis=1) == NUM_CLASSES))
    log("    predict {} examples: plain {:.0f}/s, gloro {:.0f}/s, ratio {:.3f} (cpu {:.3f})".format(
        n_examples, res["plain"]["examples_per_s"], res["gloro"]["examples_per_s"], res["ratio"], res["ratio_cpu"]))
    return res


def bench_batch(plain, g, x, repeats, log, calls=10):
    """One batch at a time, as a serving loop or a custom evaluation loop
    certifies: `predict_on_batch(x)` and the direct call `model(x)` on a
    tensor, for the frozen GloroNet and the plain network; on torch also
    the direct call under `torch.no_grad()`, as a PyTorch serving loop
    makes it (`call` there records an autograd graph).

    The two run call by call in pairs (`repeats * calls` pairs, the order
    alternating), and the figure is the median of the pairs' ratios, with a
    bootstrap 95% interval: the two calls of a pair see the same state of a
    noisy machine, which samples seconds apart do not (medians of samples
    of 10 calls moved by up to 0.13 between runs here).

    Returns:
        per path: each model's timing summary, `ratio` (median of the paired
        wall-time ratios), `ratio_interval`, `ratio_of_medians` and
        `ratio_cpu` (of the CPU-time medians).
    """
    import keras
    import numpy as np
    from keras import ops

    g.freeze_lipschitz()
    batch = x[:CERTIFY_BATCH]
    tensor = ops.convert_to_tensor(batch)
    paths = {
        "predict_on_batch": lambda m: m.predict_on_batch(batch),
        "call": lambda m: ops.convert_to_numpy(m(tensor, training=False)),
    }
    if keras.backend.backend() == "torch":
        import torch

        # How a PyTorch serving loop calls a model: without recording a graph.
        def call_no_grad(m):
            with torch.no_grad():
                return ops.convert_to_numpy(m(tensor, training=False))

        paths["call_no_grad"] = call_no_grad
    resample = np.random.default_rng(0)
    res = {}
    for path, run_once in paths.items():
        for m in (plain, g):
            run_once(m)
        samples = {"plain": [], "gloro": []}
        ratios = []
        for r in range(repeats * calls):
            pair = {}
            for kind in (("plain", "gloro") if r % 2 == 0 else ("gloro", "plain")):
                model = plain if kind == "plain" else g
                pair[kind], _ = timed(lambda: run_once(model))
                samples[kind].append(pair[kind])
            ratios.append(pair["gloro"]["wall"] / pair["plain"]["wall"])
        res[path] = {k: summarize(v) for k, v in samples.items()}
        res[path]["ratio"] = float(np.median(ratios))
        boot = np.median(resample.choice(ratios, (1000, len(ratios))), axis=1)
        res[path]["ratio_interval"] = [float(q) for q in np.quantile(boot, [0.025, 0.975])]
        res[path]["ratio_of_medians"] = _ratio(res[path]["gloro"]["wall_median"], res[path]["plain"]["wall_median"])
        res[path]["ratio_cpu"] = _ratio(res[path]["gloro"]["cpu_median"], res[path]["plain"]["cpu_median"])
        log("    {} ({} examples): plain {:.2f} ms, gloro {:.2f} ms, paired ratio {:.3f} [{:.3f}, {:.3f}] "
            "(ratio of medians {:.3f}, cpu {:.3f})".format(
                path, len(batch), res[path]["plain"]["wall_median"] * 1e3, res[path]["gloro"]["wall_median"] * 1e3,
                res[path]["ratio"], *res[path]["ratio_interval"], res[path]["ratio_of_medians"],
                res[path]["ratio_cpu"]))
    return res


def bench_stale_check(g, x, repeats, log, n_examples, input_kind="dataset"):
    """What the stale-weight protection costs `predict`: `g` against a second
    GloroNet on the same `f` (same weights, same frozen constants) whose
    in-graph check `_weights_are_certified()` is a constant True, which also
    makes its Python-side `_ensure_frozen()` free; it still holds the weight
    copies, unread. Then `_ensure_frozen()` alone, per call."""
    import numpy as np
    import gloro
    from keras import ops

    class Unchecked(gloro.GloroNet):
        def _weights_are_certified(self, weights, copies):
            return ops.convert_to_tensor(True)

    unchecked = Unchecked(model=g.f, epsilon=g.epsilon, power_iterations=g.power_iterations)
    if unchecked.f is not g.f:
        raise RuntimeError("the unchecked GloroNet does not share g's network")
    unchecked._margin_lipschitz.assign(g.freeze_lipschitz())
    res, _ = interleaved_predict({"unchecked": unchecked, "checked": g}, x, repeats, n_examples, input_kind)
    sample_batch = np.asarray(next(iter(x)) if input_kind != "numpy" else x[:CERTIFY_BATCH])
    if not np.array_equal(g.predict_on_batch(sample_batch), unchecked.predict_on_batch(sample_batch)):
        raise RuntimeError("the checked and unchecked GloroNets disagree")

    calls, per_call = 50, []
    for _ in range(5):
        sample, _ = timed(lambda: [g._ensure_frozen() for _ in range(calls)])
        per_call.append({k: (v / calls if k != "background" else v) for k, v in sample.items()})
    res["ensure_frozen"] = summarize(per_call)
    res["ensure_frozen_ms"] = res["ensure_frozen"]["wall_median"] * 1e3
    res["ensure_frozen_share_of_predict"] = res["ensure_frozen"]["wall_median"] / res["checked"]["wall_median"]
    log("    predict {} examples: checked {:.0f}/s, unchecked {:.0f}/s, ratio {:.3f} (cpu {:.3f}); "
        "_ensure_frozen() {:.2f} ms per call".format(
            n_examples, res["checked"]["examples_per_s"], res["unchecked"]["examples_per_s"], res["ratio"],
            res["ratio_cpu"], res["ensure_frozen_ms"]))
    return res


# ------------------------------------------------ 3 memory (TF allocator)


def _allocator_peak(tf, fn):
    """Peak bytes held by TF's CPU allocator while `fn` runs, above what it
    held before (tensors only: activations, gradients, temporaries)."""
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    fn()
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def bench_memory_allocator(tf, plain, g, x, y, jit, marginal=True):
    """Per-instance peak of one training step (train_on_batch) and one
    certification batch (predict_on_batch), at the benchmark batch size B and
    (unless `marginal` is False) at 2B: gross = peak(B) / B,
    marginal = (peak(2B) - peak(B)) / B."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return {"note": "not measured: the TF allocator only sees TensorFlow's tensors; see rss"}
    if jit:
        return {"note": "not measured: under jit_compile XLA's buffers bypass the TF allocator; see rss"}
    try:
        tf.config.experimental.get_memory_info("CPU:0")
    except Exception as e:  # noqa: BLE001 - report, don't fail the benchmark
        return {"note": f"TF allocator statistics unavailable: {e}"}
    res = {}
    for phase, batch in (("train", TRAIN_BATCH), ("certify", CERTIFY_BATCH)):
        res[phase] = {}
        for kind, model in (("plain", plain), ("gloro", g)):
            if phase == "certify" and kind == "gloro":
                g.freeze_lipschitz()
            peaks, samples = {}, {}
            for b in ((batch, 2 * batch) if marginal else (batch,)):
                xb, yb = x[:b], y[:b]
                if phase == "train":
                    fn = lambda: model.train_on_batch(xb, yb)   # noqa: E731
                else:
                    fn = lambda: model.predict_on_batch(xb)     # noqa: E731
                fn()   # warm-up: traces this batch shape
                # The peak depends on the order in which the executor's threads
                # run independent ops (+-10% on cnn_2C2F): median of several.
                samples[b] = [_allocator_peak(tf, fn) for _ in range(7 if marginal else 3)]
                peaks[b] = median(samples[b])
            res[phase][kind] = {
                "batch": batch,
                "peak_mb": peaks[batch] / MB,
                "peak_samples_mb": [v / MB for v in samples[batch]],
                "gross_mb_per_instance": peaks[batch] / batch / MB,
            }
            if marginal:
                res[phase][kind]["peak_2x_batch_mb"] = peaks[2 * batch] / MB
                res[phase][kind]["marginal_mb_per_instance"] = (peaks[2 * batch] - peaks[batch]) / batch / MB
        for key in (("gross_mb_per_instance", "marginal_mb_per_instance") if marginal else ("gross_mb_per_instance",)):
            res[phase]["ratio_" + key.replace("_mb_per_instance", "")] = _ratio(
                res[phase]["gloro"][key], res[phase]["plain"][key])
    return res


# ------------------------------------------------ 3 memory (RSS, workers)


def rss_worker(spec):
    """Fresh process: build, then peak RSS (VmHWM, reset after setup) of one
    phase above the RSS after setup. Prints one JSON line."""
    args = argparse.Namespace(intra_op=spec["intra_op"], inter_op=spec["inter_op"])
    tf = _setup(args)
    import keras
    import gloro

    name, kind, phase, batch = spec["network"], spec["kind"], spec["phase"], spec["batch"]
    keras.utils.set_random_seed(spec["seed"])
    plain, g = build_models(name, spec["seed"], spec["baseline"], spec["jit"], spec["power_iterations"])
    model = g if kind == "gloro" else plain
    n = batch * spec["steps"]
    x, y = synthetic_data(NETWORKS[name]["input_shape"], n, spec["seed"])
    xt, yt = tf.constant(x), tf.constant(y)
    del x, y
    if phase == "train":
        data = make_dataset(tf, (xt, yt), batch)

        class NoFreeze(gloro.callbacks.LipschitzRefresh):
            def on_train_end(self, logs=None):
                pass   # the final freeze is measured as phase "freeze"

        def run():
            model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=[NoFreeze()] if kind == "gloro" else [])
    elif phase == "certify":
        data = make_dataset(tf, xt, batch)
        if kind == "gloro":
            _mark_frozen(g)

        def run():
            model.predict(data, verbose=0)
    elif phase == "freeze":
        def run():
            g.freeze_lipschitz()
    else:
        raise ValueError(phase)
    # Settle the baseline: the eager runtime keeps the temporary of the last
    # conversion (here a full copy of the data) until the next eager op, and
    # would free it inside the measured phase for one model and not the other.
    (tf.zeros(1) + 1.0).numpy()
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)   # free heap pages back to the OS
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    rss0 = _status_kb("VmRSS")
    sample, _ = timed(run)
    hwm = _status_kb("VmHWM")
    import resource

    print("RSS_RESULT " + json.dumps({
        "rss_after_setup_mb": rss0 / 1024, "peak_rss_mb": hwm / 1024,
        "delta_mb": (hwm - rss0) / 1024, "hwm_reset": reset,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall": sample["wall"],
    }), flush=True)


def _mark_frozen(g):
    """Puts `g` on its certification path (frozen constants, no power
    iteration) without running freeze_lipschitz: its float64 operator
    matrices leave up to ~200 MB resident in the process (outside TF's
    allocator), which predict then reuses, hiding its own memory. The
    constants' values do not change what predict costs. Falls back to
    freeze_lipschitz if GloroNet's internals change."""
    import numpy as np
    from keras import ops

    try:
        g._margin_lipschitz.assign(np.ones((g.num_classes, g.num_classes), np.float32))
        for copy, weight in zip(g._certified_copies, g._certified_for):
            copy.assign(ops.convert_to_numpy(weight))
        assert g.lipschitz_frozen
    except (AttributeError, AssertionError):
        g.freeze_lipschitz()


def bench_memory_rss(args, name, log):
    """Fresh subprocess per (model, phase, batch): peak RSS above the RSS after
    model construction, compile and data creation; at B and 4B
    (marginal = slope between them)."""
    res = {}
    jobs = [("train", TRAIN_BATCH), ("certify", CERTIFY_BATCH)]
    for phase, batch in jobs:
        res[phase] = {}
        for kind in ("plain", "gloro"):
            deltas = {}
            for b in (batch, RSS_BATCH_FACTOR * batch):
                deltas[b] = _run_worker(args, name, kind, phase, b, steps=args.rss_steps)
            big = RSS_BATCH_FACTOR * batch
            res[phase][kind] = {
                "batch": batch,
                "delta_mb": deltas[batch]["delta_mb"],
                f"delta_{RSS_BATCH_FACTOR}x_batch_mb": deltas[big]["delta_mb"],
                "rss_after_setup_mb": deltas[batch]["rss_after_setup_mb"],
                "gross_mb_per_instance": deltas[batch]["delta_mb"] / batch,
                "marginal_mb_per_instance": (deltas[big]["delta_mb"] - deltas[batch]["delta_mb"]) / (big - batch),
            }
        for key in ("gross_mb_per_instance", "marginal_mb_per_instance"):
            res[phase]["ratio_" + key.replace("_mb_per_instance", "")] = _ratio(
                res[phase]["gloro"][key], res[phase]["plain"][key])
        log("    RSS {}: plain {:.1f} MB, gloro {:.1f} MB above setup at batch {}".format(
            phase, res[phase]["plain"]["delta_mb"], res[phase]["gloro"]["delta_mb"], batch))
    freeze = _run_worker(args, name, "gloro", "freeze", TRAIN_BATCH, steps=1)
    res["freeze"] = {"delta_mb": freeze["delta_mb"], "wall": freeze["wall"]}
    log("    RSS freeze_lipschitz (fresh model): {:.1f} MB above setup".format(freeze["delta_mb"]))
    return res


def _run_worker(args, name, kind, phase, batch, steps):
    spec = {"network": name, "kind": kind, "phase": phase, "batch": batch, "steps": steps,
            "seed": args.seed, "baseline": args.baseline, "jit": args.jit, "power_iterations": args.power_iterations,
            "intra_op": args.intra_op, "inter_op": args.inter_op}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RSS_RESULT "):
            return json.loads(line[len("RSS_RESULT "):])
    raise RuntimeError(f"RSS worker {spec} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


# --------------------------------------------------------- 4 Lipschitz


def bench_lipschitz(g, name, training, repeats, seed, log):
    """refresh_lipschitz() from random power vectors, on freshly built
    GloroNets and on the trained `g`; the warm refresh and freeze timed at the
    end of each timed training fit (see `bench_training`); freeze_lipschitz()
    right after a converged refresh (the guaranteed bounds)."""
    import numpy as np
    import gloro

    spec = NETWORKS[name]
    fresh_refresh, fresh_freeze, trained_refresh = [], [], []
    for r in range(repeats):
        f = _architecture(name, seed + 1000 + r)
        fresh = gloro.GloroNet(model=f, epsilon=spec["epsilon"])
        sample, _ = timed(fresh.refresh_lipschitz)
        fresh_refresh.append(sample)
        sample, _ = timed(fresh.freeze_lipschitz)
        fresh_freeze.append(sample)
    rng = np.random.default_rng(seed)
    for r in range(repeats):
        # random start on the trained weights: separates the start from the
        # spectrum (trained kernels converge at their own rate)
        for layer in g._spectral:
            layer.power_vector.assign(rng.standard_normal(layer.power_vector.shape).astype("float32"))
        sample, _ = timed(g.refresh_lipschitz)
        trained_refresh.append(sample)
    res = {
        "refresh_random": median([s["wall"] for s in fresh_refresh]),
        "refresh_random_trained_weights": median([s["wall"] for s in trained_refresh]),
        "refresh_warm": None, "fit_end_freeze": None,
        "freeze": median([s["wall"] for s in fresh_freeze]),
        "samples": {"refresh_random": summarize(fresh_refresh), "freeze_after_random_refresh": summarize(fresh_freeze),
                    "refresh_random_trained_weights": summarize(trained_refresh)},
        "note": "refresh_random: refresh_lipschitz() on a freshly built GloroNet; refresh_random_trained_weights: "
                "the same on the trained model with re-randomised power vectors; refresh_warm: "
                "refresh_lipschitz() right after a training epoch; freeze: freeze_lipschitz() right after a "
                "converged refresh (guaranteed bounds); fit_end_freeze: refresh_warm + that freeze, what "
                "GloroNet.fit's LipschitzRefresh costs when fit returns",
    }
    if training:
        warm, freeze = training["warm_refresh"]["samples"], training["warm_freeze"]["samples"]
        res["refresh_warm"] = median([s["wall"] for s in warm])
        res["fit_end_freeze"] = median([a["wall"] + b["wall"] for a, b in zip(warm, freeze)])
        res["freeze"] = median([s["wall"] for s in freeze + fresh_freeze])
    log("    refresh: random start {:.2f} s (trained weights {:.2f} s), warm {} s; freeze {:.2f} s".format(
        res["refresh_random"], res["refresh_random_trained_weights"], _fmt(res["refresh_warm"], ".2f"),
        res["freeze"]))
    return res


# -------------------------------------------------------------- ablations


def bench_ablations(tf, name, seed, jit, steps, repeats, log):
    """Where the training time goes: ms per training step (the compiled
    train function on one fixed batch, no fit loop) of variants that each
    remove one part of GloroNet's step; then a per-layer profile of
    freeze_lipschitz."""
    import keras
    import numpy as np
    import gloro
    from gloro import certificates  # noqa: F401

    spec = NETWORKS[name]

    class ConstantBottom(gloro.GloroNet):
        """GloroNet's loss and wrapper, but ⊥ = 0: no Lipschitz or certificate math."""

        def call(self, x, training=False):
            logits = self.f(x, training=training)
            return keras.ops.concatenate([logits, keras.ops.zeros_like(logits[:, :1])], axis=1)

    def variant(label, kind, jit_v=jit, power_iterations=None):
        keras.utils.set_random_seed(seed)
        plain, g = build_models(name, seed, "keras" if kind != "plain_gloro_layers" else "gloro-layers", jit_v)
        if kind.startswith("plain"):
            return label, plain
        if kind == "constant_bottom":
            f = _architecture(name, seed)
            g = ConstantBottom(model=f, epsilon=spec["epsilon"])
            g.compile(optimizer=keras.optimizers.Adam(1e-3), loss="crossentropy", jit_compile=jit_v)
        if power_iterations is not None:
            # 0 is below GloroNet's validated minimum: sigma = ||A v|| from
            # the cached vector, no iteration (only for measuring).
            g.power_iterations = power_iterations
        return label, g

    variants = [
        variant("plain (keras layers)", "plain"),
        variant("plain (gloro layers)", "plain_gloro_layers"),
        variant("gloro", "gloro"),
        variant("gloro, power_iterations=0", "gloro", power_iterations=0),
        variant("gloro, power_iterations=3", "gloro", power_iterations=3),
        variant("gloro, constant ⊥ (no bound math)", "constant_bottom"),
        variant(f"plain, jit_compile={not jit}", "plain", jit_v=not jit),
        variant(f"gloro, jit_compile={not jit}", "gloro", jit_v=not jit),
    ]
    x, y = synthetic_data(spec["input_shape"], TRAIN_BATCH, seed)
    runners = []
    for label, model in variants:
        model.make_train_function()
        iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
        for _ in range(3):
            model.train_function(iterator)   # traces
        runners.append((label, model, iterator))
    samples = {label: [] for label, _, _ in runners}
    for r in range(repeats):
        for label, model, iterator in (runners if r % 2 == 0 else runners[::-1]):
            def run():
                for _ in range(steps):
                    logs = model.train_function(iterator)
                float(logs["loss"])
            sample, _ = timed(run)
            samples[label].append({k: (v / steps * 1e3 if k != "background" else v) for k, v in sample.items()})
    base = summarize(samples[runners[0][0]])
    steps_out = {}
    for label in samples:
        s = summarize(samples[label])
        steps_out[label] = {
            "ms_per_step_wall": s["wall_median"], "ms_per_step_cpu": s["cpu_median"],
            "ratio_wall": _ratio(s["wall_median"], base["wall_median"]),
            "ratio_cpu": _ratio(s["cpu_median"], base["cpu_median"]),
            "background_median": s["background_median"],
        }
        log("    {:38s} {:8.2f} ms/step wall ({:.3f})  {:8.2f} ms/step cpu ({:.3f})".format(
            label, s["wall_median"], steps_out[label]["ratio_wall"], s["cpu_median"], steps_out[label]["ratio_cpu"]))
    # fit-level: the per-batch Python callback a schedule adds (epsilon assigned every batch)
    # A per-batch callback costs a fixed time per step: visible on the smallest network only.
    fit_cmp = _ablation_schedule_callback(tf, name, seed, jit, repeats, log) if name == "cnn_2C2F" else None
    return {"steps_per_sample": steps, "train_step": steps_out,
            "epsilon_scheduler": fit_cmp,
            "freeze_profile": _freeze_profile(name, seed, log)}


def _ablation_schedule_callback(tf, name, seed, jit, repeats, log):
    import gloro

    spec = NETWORKS[name]
    n = min(spec["train_examples"], 40 * TRAIN_BATCH)
    x, y = synthetic_data(spec["input_shape"], n, seed)
    data = make_dataset(tf, (x, y), TRAIN_BATCH)
    _, g = build_models(name, seed, "keras", jit)
    EpochTimer, _ = _callbacks()

    class NoFreeze(gloro.callbacks.LipschitzRefresh):
        def on_train_end(self, logs=None):
            pass

    timers = {"without": EpochTimer(), "with": EpochTimer()}

    def epoch(label):
        callbacks = [timers[label], NoFreeze()]
        if label == "with":
            callbacks.append(gloro.callbacks.EpsilonScheduler("[0.01]-log-[100%:1.0]", spec["epsilon"]))
        g.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)

    for label in timers:
        epoch(label)
        timers[label].samples.clear()
    for r in range(repeats):
        for label in (("without", "with") if r % 2 == 0 else ("with", "without")):
            epoch(label)
    res = {k: summarize(t.samples) for k, t in timers.items()}
    res["ratio_wall"] = _ratio(res["with"]["wall_median"], res["without"]["wall_median"])
    res["ratio_cpu"] = _ratio(res["with"]["cpu_median"], res["without"]["cpu_median"])
    res["examples"] = n
    log("    EpsilonScheduler (per-batch assign): epoch {:.2f} s vs {:.2f} s without (cpu ratio {:.3f})".format(
        res["with"]["wall_median"], res["without"]["wall_median"], res["ratio_cpu"]))
    return res


def _freeze_profile(name, seed, log):
    """Times the parts of refresh/freeze on a fresh model by wrapping
    gloro.lipschitz's functions for the duration of the measurement."""
    import gloro
    from gloro import lipschitz

    spec = NETWORKS[name]
    g = gloro.GloroNet(model=_architecture(name, seed + 7), epsilon=spec["epsilon"])
    events = []
    names = ["power_converge", "circular_conv_bound", "conv_matrix", "_matrix_norm", "dense_bound",
             "pairwise_column_distances"]
    originals = {n: getattr(lipschitz, n) for n in names}

    def wrap(label, fn):
        def wrapper(*a, **k):
            sample, out = timed(lambda: fn(*a, **k))
            events.append((label, sample["wall"], sample["cpu"]))
            return out
        return wrapper

    try:
        for n in names:
            setattr(lipschitz, n, wrap(n, originals[n]))
        profile = {}
        for stage, fn in (("refresh_random", g.refresh_lipschitz), ("freeze_after_refresh", g.freeze_lipschitz),
                          ("freeze_again", g.freeze_lipschitz)):
            events.clear()
            sample, _ = timed(fn)
            parts = {}
            for label, wall, cpu in events:
                p = parts.setdefault(label, {"calls": 0, "wall": 0.0, "cpu": 0.0})
                p["calls"] += 1
                p["wall"] += wall
                p["cpu"] += cpu
            profile[stage] = {"wall": sample["wall"], "cpu": sample["cpu"], "parts": parts}
            log("    {:22s} {:6.2f} s: {}".format(stage, sample["wall"], ", ".join(
                f"{k} {v['calls']}x {v['wall']:.2f}s" for k, v in parts.items())))
    finally:
        for n, fn in originals.items():
            setattr(lipschitz, n, fn)
    return profile


# ---------------------------------------------------------------- report


def machine_info():
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["logical_cpus"] = os.cpu_count()
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return info


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def _check(value, limit, kind):
    if value is None:
        return "n/a"
    ok = value <= limit if kind == "max" else value >= limit
    return "ok" if ok else "MISSED"


def print_report(results):
    nets = results["networks"]
    s = results["settings"]
    print()
    print(f"GloRo Net vs plain Keras on {results['backend']} ({s['baseline']} baseline), "
          f"jit_compile={s['jit_compile']}, power_iterations={s.get('power_iterations')}, "
          f"{s['repeats']} repeats, median; {results['machine'].get('cpu_model', '?')}, "
          f"{results['machine'].get('usable_cpus')} cores")
    if any("training" in r for r in nets.values()):
        print()
        print("1. Training, seconds per epoch (batch 256, Adam). ratio: median gloro / median plain; "
              "paired: median of adjacent-epoch ratios;\n   best: fastest / fastest; cpu: process CPU time; "
              "bg load: cores used by other processes meanwhile")
        print(f"  {'network':10s} {'examples':>8s} {'plain s':>8s} {'gloro s':>8s} {'ratio':>7s} "
              f"{'paired':>7s} {'best':>7s} {'cpu':>7s} {'bg load':>7s}  target <= {TARGETS['train_ratio_max']}")
        for name, r in nets.items():
            t = r.get("training")
            if not t:
                continue
            print(f"  {name:10s} {r['train_examples']:8d} {_fmt(t['plain']['wall_median'], '8.2f')} "
                  f"{_fmt(t['gloro']['wall_median'], '8.2f')} {_fmt(t['ratio_wall'], '7.3f')} "
                  f"{_fmt(t['ratio_wall_paired_median'], '7.3f')} {_fmt(t['ratio_wall_min'], '7.3f')} "
                  f"{_fmt(t['ratio_cpu'], '7.3f')} {_fmt(t['gloro']['background_median'], '7.2f')}  "
                  f"{_check(t['ratio_wall'], TARGETS['train_ratio_max'], 'max')}")
    if any("certification" in r for r in nets.values()):
        print()
        print("2. Certification, examples per second of predict (batch 512)")
        print(f"  {'network':10s} {'examples':>8s} {'plain/s':>9s} {'gloro/s':>9s} {'ratio':>7s} {'cpu':>7s} "
              f"{'bg load':>7s}  target >= {TARGETS['certify_ratio_min']}")
        for name, r in nets.items():
            c = r.get("certification")
            if not c:
                continue
            print(f"  {name:10s} {r['certify_examples']:8d} {c['plain']['examples_per_s']:9.0f} "
                  f"{c['gloro']['examples_per_s']:9.0f} {_fmt(c['ratio'], '7.3f')} {_fmt(c['ratio_cpu'], '7.3f')} "
                  f"{_fmt(c['gloro']['background_median'], '7.2f')}  "
                  f"{_check(c['ratio'], TARGETS['certify_ratio_min'], 'min')}")
    if any("stale_check" in r for r in nets.values()):
        print()
        print("2b. Stale-weight check, predict examples per second: GloroNet as is vs the same GloroNet with "
              "the check a constant True;\n    _ensure_frozen: its Python-side cost per predict call")
        print(f"  {'network':10s} {'unchecked/s':>11s} {'checked/s':>9s} {'ratio':>7s} {'cpu':>7s} {'bg load':>7s} "
              f"{'ensure ms':>9s}  target >= {TARGETS['stale_check_ratio_min']}")
        for name, r in nets.items():
            c = r.get("stale_check")
            if not c:
                continue
            print(f"  {name:10s} {c['unchecked']['examples_per_s']:11.0f} {c['checked']['examples_per_s']:9.0f} "
                  f"{_fmt(c['ratio'], '7.3f')} {_fmt(c['ratio_cpu'], '7.3f')} "
                  f"{_fmt(c['checked']['background_median'], '7.2f')} {c['ensure_frozen_ms']:9.2f}  "
                  f"{_check(c['ratio'], TARGETS['stale_check_ratio_min'], 'min')}")
    if any("memory" in r for r in nets.values()):
        print()
        print("3. Memory per instance, MB. gross: peak above the pre-phase level / B (B = 256 training, 512 "
              "certification);\n   marginal: slope of that peak against the batch size (allocator: B to 2B; "
              "RSS: B to 4B)")
        print(f"  {'network':10s} {'method':10s} {'phase':8s} {'plain':>8s} {'gloro':>8s} {'ratio':>7s} "
              f"{'marg. pl':>8s} {'marg. gl':>8s} {'ratio':>7s}  target <= {TARGETS['memory_ratio_max']}")
        for name, r in nets.items():
            for method in ("allocator", "rss"):
                m = r.get("memory", {}).get(method)
                if not m or "note" in m:
                    if m:
                        print(f"  {name:10s} {method:10s} {m['note']}")
                    continue
                for phase in ("train", "certify"):
                    p = m[phase]
                    print(f"  {name:10s} {method:10s} {phase:8s} {p['plain']['gross_mb_per_instance']:8.3f} "
                          f"{p['gloro']['gross_mb_per_instance']:8.3f} {_fmt(p['ratio_gross'], '7.3f')} "
                          f"{_fmt(p['plain'].get('marginal_mb_per_instance'), '8.3f')} "
                          f"{_fmt(p['gloro'].get('marginal_mb_per_instance'), '8.3f')} "
                          f"{_fmt(p.get('ratio_marginal'), '7.3f')}  "
                          f"{_check(p['ratio_gross'], TARGETS['memory_ratio_max'], 'max')}")
    if any("lipschitz" in r for r in nets.values()):
        print()
        print("4. Lipschitz upkeep, seconds (median). random: fresh model; random*: trained weights, "
              "random vectors;\n   warm: right after an epoch; freeze: after a converged refresh; "
              "fit-end: warm + freeze")
        print(f"  {'network':10s} {'random':>8s} {'random*':>8s} {'warm':>8s} {'freeze':>8s} {'fit-end':>8s}")
        for name, r in nets.items():
            lip = r.get("lipschitz")
            if not lip:
                continue
            print(f"  {name:10s} {_fmt(lip['refresh_random'], '8.2f')} "
                  f"{_fmt(lip['refresh_random_trained_weights'], '8.2f')} {_fmt(lip['refresh_warm'], '8.2f')} "
                  f"{_fmt(lip['freeze'], '8.2f')} {_fmt(lip['fit_end_freeze'], '8.2f')}")
    print()
    print(f"Total {results['total_seconds']:.0f} s; JSON: {results['out']}")


# ------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark GloroNet against the same network as a plain Keras model "
                    "(training, certification, memory per instance, Lipschitz refresh).")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: fewer examples and repeats, no RSS subprocesses (< ~2 min)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repetitions per figure; the median is reported (default 5, --quick 2)")
    p.add_argument("--networks", default=",".join(DEFAULT_NETWORKS),
                   help=f"comma-separated, among {', '.join(NETWORKS)} (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="JSON output path (default: benchmarks/results.json, benchmarks/results_jax.json on JAX)")
    p.add_argument("--jit", action="store_true",
                   help="jit_compile=True (XLA) for both models on TensorFlow (default False, Keras' own "
                        "default on CPU); JAX always compiles")
    p.add_argument("--power-iterations", type=int, default=None,
                   help="GloroNet's power-iteration steps per training step (default: GloroNet's default)")
    p.add_argument("--baseline", choices=["keras", "gloro-layers"], default="keras",
                   help="plain network built from keras.layers.Dense/Conv2D (default) or the gloro-layer model itself")
    p.add_argument("--input", choices=["dataset", "numpy"], default="dataset",
                   help="feed fit/predict a batched tf.data pipeline with autotuning off (default) or numpy "
                        "arrays (Keras' own pipeline, shuffled; autotuned, with its occasional ~0.5 s stall)")
    p.add_argument("--train-examples", type=int, default=None, help="override the training set size of every network")
    p.add_argument("--certify-examples", type=int, default=None, help="override the certification set size")
    p.add_argument("--rss", dest="rss", action="store_true", default=None,
                   help="also measure peak RSS in fresh subprocesses (default on, off with --quick)")
    p.add_argument("--no-rss", dest="rss", action="store_false")
    p.add_argument("--rss-steps", type=int, default=8, help="batches per RSS subprocess phase")
    p.add_argument("--ablations", action="store_true",
                   help="also time variants of the training step and profile freeze_lipschitz")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of {', '.join(SECTIONS)} (default: all but ablations; "
                        "--ablations adds it)")
    p.add_argument("--intra-op", type=int, default=0, help="TF intra-op threads (0: TF default; TensorFlow only)")
    p.add_argument("--inter-op", type=int, default=0, help="TF inter-op threads (0: TF default; TensorFlow only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    args.networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = [n for n in args.networks if n not in NETWORKS]
    if unknown or not args.networks:
        p.error(f"unknown network(s) {unknown}; choose among {', '.join(NETWORKS)}")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.power_iterations is not None and args.power_iterations < 1:
        p.error("--power-iterations must be >= 1")
    if args.rss is None:
        args.rss = not args.quick
    sections = args.sections.split(",") if args.sections else [x for x in SECTIONS if x != "ablations"]
    sections = [x.strip() for x in sections if x.strip()]
    if [x for x in sections if x not in SECTIONS] or not sections:
        p.error(f"--sections: choose among {', '.join(SECTIONS)}")
    if args.ablations and "ablations" not in sections:
        sections.append("ablations")
    args.sections = sections
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return rss_worker(json.loads(args.worker))
    start = time.perf_counter()
    started = datetime.datetime.now().astimezone()

    def log(msg):
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    tf = _setup(args)
    import keras
    import numpy as np
    from keras import ops

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if args.intra_op or args.inter_op:
            raise SystemExit("--intra-op/--inter-op set TensorFlow's thread pools; XLA on JAX has its own")
        # Keras' own choice on JAX: every step is compiled.
        args.jit = True
        versions = {"jax": jax.__version__, "tensorflow (tf.data only)": tf.__version__}
    elif backend == "torch":
        import torch

        if args.intra_op or args.inter_op:
            raise SystemExit("--intra-op/--inter-op set TensorFlow's thread pools; torch has its own")
        if args.jit:
            raise SystemExit("--jit is XLA on TensorFlow; Keras runs torch eagerly by default, as measured here")
        versions = {"torch": torch.__version__, "tensorflow (tf.data only)": tf.__version__}
    else:
        versions = {"tensorflow": tf.__version__}
    if args.out is None:
        args.out = os.path.join("benchmarks", "results.json" if backend == "tensorflow" else f"results_{backend}.json")
    if backend != "tensorflow" and "ablations" in args.sections:
        args.sections.remove("ablations")
        log("ablations skipped: they drive TensorFlow's train function directly")

    results = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv else "run.py"] + sys.argv[1:]),
        "backend": backend,
        "machine": {**machine_info(), **versions, "keras": keras.__version__,
                    "numpy": np.__version__, "loadavg_start": os.getloadavg()},
        "settings": {
            "quick": args.quick, "repeats": args.repeats, "jit_compile": args.jit, "baseline": args.baseline,
            "train_batch": TRAIN_BATCH, "certify_batch": CERTIFY_BATCH, "optimizer": "Adam(1e-3)",
            "plain_loss": "SparseCategoricalCrossentropy(from_logits=True)", "gloro_loss": "crossentropy",
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or f"{backend} default",
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or f"{backend} default",
            "rss": args.rss, "seed": args.seed, "sections": args.sections, "input": args.input, "data": "synthetic: uniform [0, 1) inputs, uniform labels",
        },
        "targets": TARGETS,
        "networks": {},
    }
    log(f"backend {backend} ({', '.join(f'{k} {v}' for k, v in versions.items())}), Keras {keras.__version__}, "
        f"jit_compile={args.jit}, repeats={args.repeats}")
    for name in args.networks:
        spec = NETWORKS[name]
        n_train, n_cert = spec["train_examples"], spec["certify_examples"]
        if args.quick:
            n_train, n_cert = QUICK_EXAMPLES[name]
        n_train = args.train_examples or n_train
        n_cert = args.certify_examples or n_cert
        log(f"{name}: input {spec['input_shape']}, {n_train} training / {n_cert} certification examples")
        keras.utils.set_random_seed(args.seed)
        x, y = synthetic_data(spec["input_shape"], n_train, args.seed)
        xc, _ = synthetic_data(spec["input_shape"], n_cert, args.seed + 1)
        plain, g = build_models(name, args.seed, args.baseline, args.jit, args.power_iterations)
        results["settings"]["power_iterations"] = g.power_iterations
        same = np.allclose(ops.convert_to_numpy(plain(x[:16])), ops.convert_to_numpy(g.f(x[:16])), atol=1e-5)
        if not same:
            raise RuntimeError("plain and GloroNet networks do not compute the same logits at start")
        net = {"input_shape": list(spec["input_shape"]), "train_examples": n_train, "certify_examples": n_cert,
               "epsilon": spec["epsilon"], "parameters": int(plain.count_params())}

        if "train" in args.sections:
            log("  training")
            if args.input == "numpy":
                net["training"] = bench_training(plain, g, x, y, args.repeats, log, "numpy")
            else:
                net["training"] = bench_training(plain, g, make_dataset(tf, (x, y), TRAIN_BATCH), None,
                                                 args.repeats, log)
        data = xc if args.input == "numpy" else make_dataset(tf, xc, CERTIFY_BATCH)
        if "certify" in args.sections:
            log("  certification")
            net["certification"] = bench_certification(plain, g, data, max(5, args.repeats), log, len(xc), args.input)
        if "batch" in args.sections:
            log("  certification one batch at a time")
            net["batch"] = bench_batch(plain, g, xc, max(5, args.repeats), log)
        if "stale" in args.sections:
            log("  stale-weight check: predict with the check vs with a constant True")
            net["stale_check"] = bench_stale_check(g, data, max(5, args.repeats), log, len(xc), args.input)
        if "memory" in args.sections:
            log("  memory (TF allocator)")
            net["memory"] = {"allocator": bench_memory_allocator(tf, plain, g, x, y, args.jit, marginal=not args.quick)}
            if args.rss:
                log("  memory (peak RSS, fresh subprocesses)")
                net["memory"]["rss"] = bench_memory_rss(args, name, log)
        if "lipschitz" in args.sections:
            log("  Lipschitz refresh / freeze from a random start")
            net["lipschitz"] = bench_lipschitz(g, name, net.get("training"), 1 if args.quick else 3, args.seed, log)
        if "ablations" in args.sections:
            log("  ablations (ms per training step)")
            net["ablations"] = bench_ablations(
                tf, name, args.seed, args.jit, steps=60 if name == "cnn_2C2F" else 8,
                repeats=max(3, args.repeats) if not args.quick else 2, log=log)
        net["figures"] = figures = {
            "train_ratio": net.get("training", {}).get("ratio_wall"),
            "train_ratio_cpu": net.get("training", {}).get("ratio_cpu"),
            "certify_ratio": net.get("certification", {}).get("ratio"),
            "certify_ratio_cpu": net.get("certification", {}).get("ratio_cpu"),
            "batch_predict_on_batch_ratio": net.get("batch", {}).get("predict_on_batch", {}).get("ratio"),
            "batch_call_ratio": net.get("batch", {}).get("call", {}).get("ratio"),
            "batch_call_no_grad_ratio": net.get("batch", {}).get("call_no_grad", {}).get("ratio"),
            "stale_check_ratio": net.get("stale_check", {}).get("ratio"),
            "stale_check_ratio_cpu": net.get("stale_check", {}).get("ratio_cpu"),
            "memory_train_ratio": net.get("memory", {}).get("allocator", {}).get("train", {}).get("ratio_gross"),
            "memory_certify_ratio": net.get("memory", {}).get("allocator", {}).get("certify", {}).get("ratio_gross"),
        }
        for method in ("allocator", "rss"):
            for phase in ("train", "certify"):
                for kind in ("gross", "marginal"):
                    value = net.get("memory", {}).get(method, {}).get(phase, {}).get("ratio_" + kind)
                    if value is not None:
                        figures[f"memory_{phase}_ratio_{method}_{kind}"] = value
        net["targets_met"] = {
            "train": None if figures["train_ratio"] is None else figures["train_ratio"] <= TARGETS["train_ratio_max"],
            "certify": None if figures["certify_ratio"] is None else figures["certify_ratio"] >= TARGETS["certify_ratio_min"],
            "batch": None if figures["batch_call_ratio"] is None else max(
                figures["batch_call_ratio"], figures["batch_predict_on_batch_ratio"]) <= TARGETS["batch_ratio_max"],
            "stale_check": None if figures["stale_check_ratio"] is None
            else figures["stale_check_ratio"] >= TARGETS["stale_check_ratio_min"],
            "memory": None if figures["memory_train_ratio"] is None else all(
                v is not None and v <= TARGETS["memory_ratio_max"]
                for v in (figures["memory_train_ratio"], figures["memory_certify_ratio"])),
        }
        results["networks"][name] = net
        log(f"  {name} done: train ratio {_fmt(figures['train_ratio'])} (cpu {_fmt(figures['train_ratio_cpu'])}), "
            f"certify ratio {_fmt(figures['certify_ratio'])} (cpu {_fmt(figures['certify_ratio_cpu'])})")
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["total_seconds"] = time.perf_counter() - start
    results["out"] = args.out
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=float)
    print_report(results)
    return results


if __name__ == "__main__":
    main()
