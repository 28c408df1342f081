#!/usr/bin/env python
"""Power-iteration steps per training step: VRA and training time.

Trains `cnn_2C2F` GloRo Nets on a Fashion-MNIST subset with the same recipe
for several values of `GloroNet(power_iterations=...)` and several seeds,
certifies the test subset, and times training against one step and against
the same network trained as a plain Keras model. The original library's side
is `benchmarks/original_gloro.py`; pass its JSON with `--original` to put both
in one table. Method and figures: benchmarks/power_iterations.md.

Recipe: first 8,000 training and 2,000 test images, Adam(1e-3), batch 128,
fixed epsilon 0.3, 2 epochs, `loss="sparse_crossentropy"`, then
`evaluate` with `["clean_acc", "vra"]` (guaranteed constants, frozen by `fit`).

Two sections, in one process:

1. accuracy: for each seed, for each count, a fresh network trained with the
   recipe (and a plain Keras network, for reference); VRA, clean accuracy and
   the wall time of `fit` (tracing and the final freeze included).
2. timing: `--timing-rounds` interleaved rounds (plain, then each count;
   reversed order on odd rounds) of `--timing-epochs`-epoch fits without
   metrics on a tf.data pipeline with autotuning off; the first epoch
   (tracing) is left out and the per-epoch medians give the ratios.

Usage (from the repository root; times on a shared, loaded 2-core CPU):

    python benchmarks/power_iterations.py                       # ~10 min
    python benchmarks/power_iterations.py --counts 1,5 --seeds 0 --timing-rounds 1 --timing-epochs 2   # smoke, ~1 min
    python benchmarks/power_iterations.py --seeds "" --counts 1,5,8 --timing-rounds 4 --timing-epochs 8 \
        --out benchmarks/power_iterations_timing.json               # timing only
    python benchmarks/power_iterations.py --report-only --original benchmarks/original_gloro.json

`--warm-counts 1,5` adds variants that converge the power iterations when
`fit` begins; `--also` and repeated `--original` pool runs of several JSON
files in the table (`--report-only`). The recorded runs and their commands
are listed in benchmarks/power_iterations.md.
"""

import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import _subset  # noqa: E402  (numpy only; shared with original_gloro.py)

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


def _ints(text):
    return [int(t) for t in text.split(",") if t.strip()]


# ------------------------------------------------------------------ models


def _gloro_net(seed, power_iterations, metrics):
    import keras

    import gloro
    import gloro.architectures

    f = gloro.architectures.get("cnn_2C2F", input_shape=(28, 28, 1), num_classes=10, seed=seed)
    g = gloro.GloroNet(model=f, epsilon=_subset.RECIPE["epsilon"], power_iterations=power_iterations)
    g.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_crossentropy", metrics=metrics)
    return g


def _plain_net(seed, metrics):
    """The same layers as `cnn_2C2F` with Keras' Dense/Conv2D (MinMax has no
    Keras equivalent: gloro's, a plain layer, is used) and no GloRo."""
    import keras

    from gloro.layers import MinMax

    counter = iter(range(100))

    def init():
        return keras.initializers.Orthogonal(seed=seed + next(counter))

    x = keras.Input((28, 28, 1))
    z = x
    for filters in (16, 32):
        z = keras.layers.Conv2D(filters, 4, strides=2, padding="same", kernel_initializer=init())(z)
        z = MinMax()(z)
    z = keras.layers.Flatten()(z)
    z = MinMax()(keras.layers.Dense(100, kernel_initializer=init())(z))
    y = keras.layers.Dense(10, kernel_initializer=init())(z)
    model = keras.Model(x, y, name="plain_cnn_2C2F")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics,
    )
    return model


def _clock():
    import keras

    class Clock(_subset.EpochClock, keras.callbacks.Callback):
        pass

    return Clock()


def _probe(warm_start):
    """Callback: optionally converges the power iterations when training
    begins (`refresh_lipschitz()`, the variant `ours-<k>+warm`), and records
    at the end of training, before `fit`'s freeze, the product of the layers'
    training-time estimates (the constant the last steps trained against)."""
    import keras

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if warm_start:
                self.model.refresh_lipschitz()

        def on_train_end(self, logs=None):
            product = 1.0
            for layer in self.model._spectral:
                product *= float(layer.lipschitz_estimate.numpy())
            self.training_estimate = product

    return Probe()


def _busy_cores():
    """(machine busy seconds over all cores, this process' CPU seconds)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    return busy, time.process_time()


# ---------------------------------------------------------------- sections


def accuracy_runs(data, counts, seeds, with_plain, log, warm_counts=()):
    import keras

    x_train, y_train, x_test, y_test = data
    runs = []
    # Untimed warm-up, so that the first configuration does not pay one-time
    # costs (first tracing of the freeze, oneDNN primitive caches...).
    keras.utils.set_random_seed(0)
    warm = _gloro_net(0, 1, ["clean_acc", "vra"])
    warm.fit(x_train[:512], y_train[:512], batch_size=128, epochs=1, verbose=0)
    warm.evaluate(x_test[:500], y_test[:500], verbose=0)
    del warm
    keras.backend.clear_session()
    configs = ([("plain", None)] if with_plain else []) + [(f"ours-{k}", k) for k in counts]
    configs += [(f"ours-{k}+warm", k) for k in warm_counts]
    for seed in seeds:
        for name, k in configs:
            keras.utils.set_random_seed(seed)
            if k is None:
                model = _plain_net(seed, ["accuracy"])
            else:
                model = _gloro_net(seed, k, ["clean_acc", "vra"])
            clock = _clock()
            probe = None if k is None else _probe(name.endswith("+warm"))
            t0 = time.perf_counter()
            model.fit(x_train, y_train, batch_size=_subset.RECIPE["batch_size"],
                      epochs=_subset.RECIPE["epochs"], shuffle=True, verbose=0,
                      callbacks=[clock] + ([probe] if probe else []))
            fit_s = time.perf_counter() - t0
            scores = model.evaluate(x_test, y_test, batch_size=500, verbose=0, return_dict=True)
            row = {"config": name, "power_iterations": k, "seed": seed, "fit_wall_s": fit_s,
                   "epoch_wall_s": clock.wall, "epoch_cpu_s": clock.cpu}
            if k is None:
                row.update({"clean_acc": float(scores["accuracy"]), "vra": None})
            else:
                # Cross-check the metric with predict: argmax over m + 1 logits.
                pred = model.predict(x_test, batch_size=500, verbose=0).argmax(axis=1)
                row.update({"clean_acc": float(scores["clean_acc"]), "vra": float(scores["vra"]),
                            "vra_predict": float((pred == y_test).mean()),
                            "rejected": float((pred == 10).mean()),
                            "lipschitz_frozen_max": float(model.lipschitz_constant().max())})
                # Lag of the training-time estimate at the end of training:
                # last training estimate / converged estimate (product over
                # the conv and dense layers; 1.0 = no lag).
                converged = 1.0
                for layer in model._spectral:
                    converged *= float(layer.lipschitz_estimate.numpy())
                row["training_estimate_over_converged"] = probe.training_estimate / converged
                # What certifying with guaranteed bounds costs next to the
                # converged estimates (product over layers of bound / estimate).
                ratio = 1.0
                for layer_row in model.lipschitz_report():
                    ratio *= layer_row["ratio"]
                row["bound_over_estimate"] = ratio
            runs.append(row)
            log(f"  seed {seed} {name:8s} VRA {row['vra'] if row['vra'] is not None else float('nan'):.4f} "
                f"clean {row['clean_acc']:.4f} fit {fit_s:6.1f} s (epochs {', '.join(f'{t:.1f}' for t in clock.wall)})")
            keras.backend.clear_session()
    return runs


def timing_runs(data, counts, rounds, epochs, log, batch_size=None):
    import keras
    import tensorflow as tf

    x_train, y_train = data[0], data[1]
    options = tf.data.Options()
    options.autotune.enabled = False   # avoids end-of-iteration stalls (BENCHMARKS.md)
    ds = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
          .batch(batch_size or _subset.RECIPE["batch_size"]).prefetch(2).with_options(options))
    configs = [("plain", None)] + [(f"ours-{k}", k) for k in counts]
    samples = {name: {"wall": [], "cpu": [], "background_cores": []} for name, _ in configs}
    for r in range(rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for name, k in order:
            keras.utils.set_random_seed(0)
            model = _plain_net(0, None) if k is None else _gloro_net(0, k, None)
            clock = _clock()
            b0 = _busy_cores()
            model.fit(ds, epochs=epochs, verbose=0, callbacks=[clock])
            b1 = _busy_cores()
            timed_wall = clock.wall[1:]
            samples[name]["wall"] += timed_wall
            samples[name]["cpu"] += clock.cpu[1:]
            # Cores used by other processes over the whole fit.
            total = sum(clock.wall)
            samples[name]["background_cores"].append(((b1[0] - b0[0]) - (b1[1] - b0[1])) / max(total, 1e-9))
            log(f"  round {r} {name:8s} epochs {', '.join(f'{t:.2f}' for t in clock.wall)} s "
                f"(background {samples[name]['background_cores'][-1]:.2f} cores)")
            keras.backend.clear_session()
    summary = {}
    med = {name: (_subset.median(s["wall"]), _subset.median(s["cpu"])) for name, s in samples.items()}
    for name, (w, c) in med.items():
        summary[name] = {
            "epoch_wall_median_s": w, "epoch_cpu_median_s": c,
            "wall_vs_plain": w / med["plain"][0], "cpu_vs_plain": c / med["plain"][1],
        }
        if "ours-1" in med:
            summary[name]["wall_vs_1"] = w / med["ours-1"][0]
            summary[name]["cpu_vs_1"] = c / med["ours-1"][1]
    return {"rounds": rounds, "epochs": epochs, "samples": samples, "summary": summary}


# ------------------------------------------------------------------ report


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def summarize(result):
    runs = result.get("runs", [])
    out = {}
    for name in dict.fromkeys(r["config"] for r in runs):
        rows = [r for r in runs if r["config"] == name]
        one = [r for r in runs if r["config"] == "ours-1"]
        fit_ratio = None
        if one and name != "plain":
            by_seed = {r["seed"]: r["fit_wall_s"] for r in one}
            fit_ratio = _mean([r["fit_wall_s"] / by_seed[r["seed"]] for r in rows if r["seed"] in by_seed])
        out[name] = {
            "seeds": [r["seed"] for r in rows],
            "vra": [r["vra"] for r in rows],
            "vra_mean": _mean([r["vra"] for r in rows]),
            "clean_acc_mean": _mean([r["clean_acc"] for r in rows]),
            "fit_wall_mean_s": _mean([r["fit_wall_s"] for r in rows]),
            "fit_wall_vs_1": fit_ratio,
            # fit's work after the last epoch (mostly freeze_lipschitz).
            "after_epochs_mean_s": _mean([r["fit_wall_s"] - sum(r["epoch_wall_s"]) for r in rows]),
        }
    return out


def markdown(ours, original=None):
    s = ours["summary"]
    t = ours.get("timing", {}).get("summary", {})
    lines = [
        "| configuration | VRA per seed | mean VRA | mean clean acc. "
        "| epoch time vs 1 step (wall / CPU) | epoch time vs plain Keras (wall / CPU) |",
        "|---|---|---|---|---|---|",
    ]

    def fmt(v, f="{:.4f}"):
        return "-" if v is None or v != v else f.format(v)

    empty = {"vra": [], "vra_mean": None, "clean_acc_mean": None, "fit_wall_vs_1": None}
    for name in dict.fromkeys([*s, *t]):
        row, tr = s.get(name, empty), t.get(name, {})
        if name == "plain":
            label = "plain Keras (no GloRo)"
        else:
            k, _, variant = name.split("-")[1].partition("+")
            label = f"ours, {k} step{'s' if k != '1' else ''}" + (
                ", converged when fit begins" if variant == "warm" else "")
        vra = ", ".join(fmt(v) for v in row["vra"]) if name != "plain" else "-"
        lines.append(
            f"| {label} | {vra} | {fmt(row['vra_mean']) if name != 'plain' else '-'} "
            f"| {fmt(row['clean_acc_mean'])} "
            f"| {fmt(tr.get('wall_vs_1'), '{:.2f}x')} / {fmt(tr.get('cpu_vs_1'), '{:.2f}x')} "
            f"| {fmt(tr.get('wall_vs_plain'), '{:.2f}x')} / {fmt(tr.get('cpu_vs_plain'), '{:.2f}x')} |"
        )
    if original:
        o = summarize(original)
        for name, row in o.items():
            ot = original.get("timing", {}).get("summary", {}).get(name, {})
            lines.append(
                f"| original gloro {original['versions'].get('gloro')}, {name.split('-', 1)[1]} "
                f"| {', '.join(fmt(v) for v in row['vra'])} | {fmt(row['vra_mean'])} "
                f"| {fmt(row['clean_acc_mean'])} | (own process) "
                f"| {fmt(ot.get('wall_vs_plain'), '{:.2f}x')} / {fmt(ot.get('cpu_vs_plain'), '{:.2f}x')} |"
            )
    return "\n".join(lines)


def recommend(ours, original):
    if not original:
        return None
    target = summarize(original)
    target_mean = _mean([row["vra_mean"] for row in target.values()])
    # Fixed counts only (not the `+warm` variants).
    counts = sorted((n for n in ours["summary"] if n.startswith("ours-") and n[5:].isdigit()),
                    key=lambda n: int(n[5:]))
    passing = [n for n in counts if ours["summary"][n]["vra_mean"] >= target_mean]
    return {
        "original_vra_mean": target_mean,
        "smallest_count_at_least_original": int(passing[0].split("-")[1]) if passing else None,
        "counts_below_original": [int(n.split("-")[1]) for n in counts if n not in passing],
    }


# --------------------------------------------------------------------- CLI


@app.command()
def main(
    counts: str = typer.Option("1,2,3,5", help="power_iterations values, comma-separated"),
    seeds: str = typer.Option("0,1,2", help="seeds, comma-separated"),
    timing_rounds: int = typer.Option(2, help="interleaved timing rounds (0: skip the timing section)"),
    timing_epochs: int = typer.Option(4, help="epochs per timing fit; the first (tracing) is not timed"),
    timing_batch: int = typer.Option(0, help="batch size of the timing fits (0: the recipe's)"),
    timing_examples: int = typer.Option(
        0, help="training examples of the timing fits (0: the recipe's; 60000: the README's recipe)"),
    plain: bool = typer.Option(True, help="also train the plain Keras network in the accuracy section"),
    warm_counts: str = typer.Option(
        "", help="also train these counts with the power iterations converged when fit begins (ours-<k>+warm)"),
    data_dir: str = typer.Option(_subset.DEFAULT_DATA_DIR, help="folder of the Fashion-MNIST IDX files"),
    out: Path = typer.Option(HERE / "power_iterations.json", help="JSON output"),
    original: Optional[List[Path]] = typer.Option(
        None, help="JSON written by original_gloro.py, for the table (repeatable: runs are pooled)"),
    also: Optional[List[Path]] = typer.Option(
        None, help="with --report-only: more JSON files of this script whose runs are pooled with --out's"),
    report_only: bool = typer.Option(False, help="do not train: print the table of --out (and --original)"),
):
    """Trains and certifies cnn_2C2F for each power-iteration count and seed;
    prints a table and writes JSON."""
    orig = None
    for path in original or []:
        part = json.loads(path.read_text())
        if orig is None:
            orig = part
        else:
            orig["runs"] += part["runs"]
            orig["seeds"] += part["seeds"]
    if report_only:
        result = json.loads(out.read_text())
        result.pop("summary", None)
        for path in also or []:
            part = json.loads(path.read_text())
            result["runs"] += part["runs"]
            result["seeds"] += part["seeds"]
    else:
        import keras
        import numpy as np
        import tensorflow as tf

        import gloro

        counts_l, seeds_l = _ints(counts), _ints(seeds)
        log = lambda msg: print(msg, flush=True)  # noqa: E731
        data = _subset.load(data_dir)
        result = {
            "library": "ours",
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "versions": {"gloro": getattr(gloro, "__version__", "worktree"), "tensorflow": tf.__version__,
                         "keras": keras.__version__, "numpy": np.__version__},
            "machine": _subset.machine(),
            "recipe": dict(_subset.RECIPE, loss="sparse_crossentropy",
                           evaluation="GloroNet.evaluate(['clean_acc', 'vra']) after fit (frozen guaranteed constants)"),
            "counts": counts_l,
            "seeds": seeds_l,
        }
        log(f"accuracy: counts {counts_l}, seeds {seeds_l}")
        result["warm_counts"] = _ints(warm_counts)
        result["runs"] = accuracy_runs(data, counts_l, seeds_l, plain, log, result["warm_counts"])
        if timing_rounds > 0:
            log(f"timing: {timing_rounds} interleaved rounds of {timing_epochs} epochs")
            timing_data = _subset.load(data_dir, train_examples=timing_examples) if timing_examples else data
            result["timing"] = timing_runs(timing_data, counts_l, timing_rounds, timing_epochs, log, timing_batch)
        result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["summary"] = summarize(result)
    result["recommendation"] = recommend(result, orig)
    if not report_only:
        out.write_text(json.dumps(result, indent=1))
    print()
    print(markdown(result, orig))
    if result["recommendation"]:
        print()
        print(json.dumps(result["recommendation"]))


if __name__ == "__main__":
    app()
