#!/usr/bin/env python
"""The original GloRo library's side of the power-iteration comparison.

Runs in its own virtual environment (Python 3.11, TensorFlow 2.15, the
original library from PyPI), not in gloro's:

    python3.11 -m venv /work/venv-orig
    /work/venv-orig/bin/pip install tensorflow==2.15.1 gloro==1.1.1
    /work/venv-orig/bin/python benchmarks/original_gloro.py --out benchmarks/original_gloro.json

Same network, data and recipe as `benchmarks/power_iterations.py`, with the
original library's defaults: `GloroNet(..., epsilon=0.3)` (its default number
of power iterations per step), `loss="sparse_crossentropy"`, its `fit` (which
adds its iterate-refreshing callback), then its `vra` / `clean_acc` metrics
from `evaluate` on the test subset, cross-checked with `predict` (argmax over
the m + 1 outputs, ⊥ last). Writes JSON in the same shape as
`power_iterations.py`, under the configuration name `original-<n>`.
"""

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _subset  # noqa: E402


def _ints(text):
    return [int(t) for t in text.split(",") if t.strip()]


def _build(tf, kind, metrics, num_iterations=None):
    """cnn_2C2F with orthogonal kernels: the original GloroNet, or the same
    layers as a plain Keras model (the original's MinMax kept)."""
    from tensorflow.keras import layers as kl

    from gloro.layers import MinMax

    x = kl.Input((28, 28, 1))
    z = x
    for filters in (16, 32):
        z = kl.Conv2D(filters, 4, strides=2, padding="same", kernel_initializer="orthogonal")(z)
        z = MinMax()(z)
    z = kl.Flatten()(z)
    z = MinMax()(kl.Dense(100, kernel_initializer="orthogonal")(z))
    y = kl.Dense(10, kernel_initializer="orthogonal")(z)
    optimizer = tf.keras.optimizers.Adam(1e-3)
    if kind == "plain":
        model = tf.keras.Model(x, y)
        model.compile(optimizer=optimizer, metrics=metrics,
                      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model
    import gloro

    kwargs = {} if num_iterations is None else {"num_iterations": num_iterations}
    g = gloro.GloroNet(x, y, epsilon=_subset.RECIPE["epsilon"], **kwargs)
    g.compile(optimizer=optimizer, loss="sparse_crossentropy", metrics=metrics or [])
    return g


def _clock(tf):
    class Clock(_subset.EpochClock, tf.keras.callbacks.Callback):
        pass

    return Clock()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated")
    p.add_argument("--num-iterations", type=int, default=None,
                   help="override the library's default number of power iterations per step")
    p.add_argument("--timing-rounds", type=int, default=2,
                   help="interleaved plain / original timing rounds (0: skip)")
    p.add_argument("--timing-epochs", type=int, default=4,
                   help="epochs per timing fit; the first (tracing) is not timed")
    p.add_argument("--timing-batch", type=int, default=0, help="batch size of the timing fits (0: the recipe's)")
    p.add_argument("--timing-examples", type=int, default=0,
                   help="training examples of the timing fits (0: the recipe's; 60000: the README's recipe)")
    p.add_argument("--data-dir", default=_subset.DEFAULT_DATA_DIR)
    p.add_argument("--out", default=str(HERE / "original_gloro.json"))
    args = p.parse_args(argv)

    import keras
    import numpy as np
    import tensorflow as tf

    import gloro

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    x_train, y_train, x_test, y_test = _subset.load(args.data_dir)
    # The original's metrics read sparse labels as a column: shape (n, 1).
    y_train_c, y_test_c = y_train[:, None], y_test[:, None]

    probe = _build(tf, "gloro", None, args.num_iterations)
    iterations = int(probe.num_iterations)
    name = f"original-{iterations}"
    del probe
    tf.keras.backend.clear_session()

    result = {
        "library": "original",
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "versions": {"gloro": gloro.__version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__, "numpy": np.__version__},
        "machine": _subset.machine(),
        "recipe": dict(_subset.RECIPE, loss="sparse_crossentropy",
                       evaluation="GloroNet.evaluate(['clean_acc', 'vra']) after fit (the library's defaults)"),
        "counts": [iterations],
        "seeds": _ints(args.seeds),
        "runs": [],
    }

    # Untimed warm-up, so that the first seed does not pay one-time costs.
    tf.keras.utils.set_random_seed(0)
    warm = _build(tf, "gloro", ["clean_acc", "vra"], args.num_iterations)
    warm.fit(x_train[:512], y_train_c[:512], batch_size=128, epochs=1, verbose=0)
    warm.evaluate(x_test[:500], y_test_c[:500], verbose=0)
    del warm
    tf.keras.backend.clear_session()

    log(f"accuracy: {name}, seeds {result['seeds']}")
    for seed in result["seeds"]:
        tf.keras.utils.set_random_seed(seed)
        tf.random.set_seed(seed)
        g = _build(tf, "gloro", ["clean_acc", "vra"], args.num_iterations)
        clock = _clock(tf)
        t0 = time.perf_counter()
        g.fit(x_train, y_train_c, batch_size=_subset.RECIPE["batch_size"],
              epochs=_subset.RECIPE["epochs"], shuffle=True, verbose=0, callbacks=[clock])
        fit_s = time.perf_counter() - t0
        scores = g.evaluate(x_test, y_test_c, batch_size=500, verbose=0, return_dict=True)
        pred = g.predict(x_test, batch_size=500, verbose=0).argmax(axis=1)
        row = {"config": name, "power_iterations": iterations, "seed": seed, "fit_wall_s": fit_s,
               "epoch_wall_s": clock.wall, "epoch_cpu_s": clock.cpu,
               "clean_acc": float(scores["clean_acc"]), "vra": float(scores["vra"]),
               "vra_predict": float((pred == y_test).mean()), "rejected": float((pred == 10).mean()),
               "lipschitz_max": float(np.max(g.lipschitz_constant()))}
        result["runs"].append(row)
        log(f"  seed {seed} {name} VRA {row['vra']:.4f} (predict {row['vra_predict']:.4f}) "
            f"clean {row['clean_acc']:.4f} fit {fit_s:6.1f} s")
        tf.keras.backend.clear_session()

    if args.timing_rounds > 0:
        options = tf.data.Options()
        options.autotune.enabled = False
        x_time, y_time = x_train, y_train_c
        if args.timing_examples:
            x_time, y_time = _subset.load(args.data_dir, train_examples=args.timing_examples)[:2]
            y_time = y_time[:, None]
        ds = (tf.data.Dataset.from_tensor_slices((x_time, y_time))
              .batch(args.timing_batch or _subset.RECIPE["batch_size"]).prefetch(2).with_options(options))
        configs = ["plain", name]
        samples = {c: {"wall": [], "cpu": []} for c in configs}
        log(f"timing: {args.timing_rounds} interleaved rounds of {args.timing_epochs} epochs")
        for r in range(args.timing_rounds):
            for c in (configs if r % 2 == 0 else configs[::-1]):
                tf.keras.utils.set_random_seed(0)
                model = _build(tf, "plain" if c == "plain" else "gloro", None, args.num_iterations)
                clock = _clock(tf)
                model.fit(ds, epochs=args.timing_epochs, verbose=0, callbacks=[clock])
                samples[c]["wall"] += clock.wall[1:]
                samples[c]["cpu"] += clock.cpu[1:]
                log(f"  round {r} {c:12s} epochs {', '.join(f'{t:.2f}' for t in clock.wall)} s")
                tf.keras.backend.clear_session()
        med = {c: (_subset.median(s["wall"]), _subset.median(s["cpu"])) for c, s in samples.items()}
        result["timing"] = {
            "rounds": args.timing_rounds, "epochs": args.timing_epochs, "samples": samples,
            "summary": {c: {"epoch_wall_median_s": w, "epoch_cpu_median_s": cpu,
                            "wall_vs_plain": w / med["plain"][0], "cpu_vs_plain": cpu / med["plain"][1]}
                        for c, (w, cpu) in med.items()},
        }

    result["machine"]["loadavg_at_end"] = os.getloadavg()
    vras = [r["vra"] for r in result["runs"]]
    result["summary"] = {name: {
        "seeds": result["seeds"], "vra": vras, "vra_mean": sum(vras) / len(vras),
        "clean_acc_mean": sum(r["clean_acc"] for r in result["runs"]) / len(vras),
        "fit_wall_mean_s": sum(r["fit_wall_s"] for r in result["runs"]) / len(vras),
    }} if vras else {}
    Path(args.out).write_text(json.dumps(result, indent=1))
    log(json.dumps(result["summary"], indent=1))
    if "timing" in result:
        log(json.dumps(result["timing"]["summary"], indent=1))


if __name__ == "__main__":
    main()
