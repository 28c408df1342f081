"""What certification costs: GloRo against bound propagation (IBP, KW,
CROWN, CROWN-IBP, BCP) and randomized smoothing, on the same networks, points and
L2 radius (issue 19).

For each network, every method certifies test points of the network GloRo
trained and of the network trained for that method (IBP, CROWN-IBP, Gaussian
BCP, noise for smoothing), and every method's training is timed on the same
network and data. Slow methods are measured on a subset and extrapolated to
the 10,000-point test set; each row says how many points it measured.

    pip install -r benchmarks/requirements-certifiers.txt
    python benchmarks/certifiers.py            # writes benchmarks/certifiers.json
    python benchmarks/certifiers.py --quick    # smaller subsets, ~8 min on 2 busy cores

Networks: `cnn_2C2F` on Fashion-MNIST at radius 0.3 (trained here, on the
real data) and `cnn_6C2F` on CIFAR-10 shapes at 36/255 (synthetic inputs and
labels, weights after two one-batch epochs: a cost figure only, no
certified accuracy).
"""

import dataclasses
import json
import os
import sys
import time
from typing import Annotated

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# TensorFlow keeps CPU memory statistics (reporting.measure) only with it.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import typer  # noqa: E402

import gloro  # noqa: E402
from benchmarks import _subset, bounds, certified_training, reporting, smoothing  # noqa: E402

TEST_SET = 10_000
PAPER = "Leino et al. 2021, Table 2 (CIFAR-10, 6C2F, one GPU)"
# The GloRo paper's cost table: (train s/epoch, train MB/instance,
# certify s for the test set, certify MB/instance).
PAPER_FIGURES = {
    "gloro": (6.9, 3.6, 0.4, 1.8),
    "kw": (516.8, 100.9, 2500.0, 1400.0),
    "bcp": (47.5, 12.7, 5.8, 19.1),
    "smoothing": (None, None, 36800.0, 19.8),
}
IMPLEMENTATION = {
    "gloro": f"gloro {gloro.__version__}: GloroNet.predict",
    "gloro_radius": f"gloro {gloro.__version__}: GloroNet.certified_radius",
    "ibp": "benchmarks/bounds.py (keras.ops), native MinMax",
    "crown_ibp": "benchmarks/bounds.py (keras.ops), MinMax as relu",
    "kw": "benchmarks/bounds.py (keras.ops), MinMax as relu",
    "crown": "benchmarks/bounds.py (keras.ops), MinMax as relu",
    "bcp": "benchmarks/bounds.py (keras.ops), native MinMax, guaranteed norms",
    "smoothing": "benchmarks/smoothing.py (keras.ops + SciPy)",
}
TRAINING = {
    "gloro": f"gloro {gloro.__version__}: GloroNet.fit",
    "ibp": "benchmarks/certified_training.py (keras.ops), native MinMax",
    "crown_ibp": "benchmarks/certified_training.py (keras.ops), MinMax as relu",
    "kw": "benchmarks/certified_training.py (keras.ops), MinMax as relu",
    "bcp": "benchmarks/certified_training.py (keras.ops), native MinMax, power iteration",
    "noise": "keras GaussianNoise + Adam",
}


@dataclasses.dataclass
class Setting:
    """One network of the comparison and how much of each method to run."""

    network: str
    dataset: str
    input_shape: tuple
    radius: float
    sigma: float  # the smoothing noise Cohen et al. pair with this radius
    train_examples: int  # examples per epoch of the real dataset
    real_data: bool
    epochs: int  # training epochs (real data) or timed epochs (synthetic)
    train_subset: int  # examples each epoch runs here
    points: dict  # method -> test points to certify
    smoothing_samples: int = smoothing.N  # n of CERTIFY actually drawn
    kw_train: tuple = None  # (examples, batch) of KW training, None: skip
    batch: int = 256
    linear_fraction: float = 1.0  # share of hidden units KW / CROWN bound
    chunk: int = 4096  # hidden units per backward pass of KW / CROWN
    own_networks: bool = True  # also certify each method's own network


def settings(quick):
    """The two networks, sized for a full run (about 20 min on 2 CPU cores
    shared with other work) or a quick one (a few minutes)."""
    if quick:
        small = dict(gloro=1000, gloro_radius=1000, ibp=1000, bcp=1000, crown_ibp=100, kw=1, crown=1, smoothing=1)
        wide = dict(gloro=128, gloro_radius=128, ibp=128, bcp=128, crown_ibp=8, kw=1, crown=1, smoothing=1)
        return [
            Setting("cnn_2C2F", "fashion_mnist", (28, 28, 1), 0.3, 0.25, 60_000, True, 2, 1024, small,
                    smoothing_samples=2_000, kw_train=(4, 2), batch=128),
            Setting("cnn_6C2F", "cifar10 shapes (synthetic)", (32, 32, 3), 36 / 255, 0.12, 50_000, False, 2, 32, wide,
                    smoothing_samples=500, linear_fraction=1 / 512, chunk=256, own_networks=False, batch=32),
        ]
    small = dict(gloro=10_000, gloro_radius=10_000, ibp=10_000, bcp=10_000, crown_ibp=1_000, kw=10, crown=10, smoothing=2)
    wide = dict(gloro=512, gloro_radius=512, ibp=512, bcp=512, crown_ibp=32, kw=1, crown=1, smoothing=1)
    return [
        Setting("cnn_2C2F", "fashion_mnist", (28, 28, 1), 0.3, 0.25, 60_000, True, 2, 10_000, small,
                kw_train=(8, 4)),
        Setting("cnn_6C2F", "cifar10 shapes (synthetic)", (32, 32, 3), 36 / 255, 0.12, 50_000, False, 2, 128, wide,
                smoothing_samples=1_000, linear_fraction=1 / 256, chunk=512, own_networks=False, batch=128),
    ]


def certify(method, model, x, radius, sigma, smoothing_samples=smoothing.N, gloro_net=None, chunk=4096, fraction=1.0):
    """Certifies `x` with one method on the logits model `model`.

    Args:
        method: `"gloro"`, `"gloro_radius"`, `"smoothing"` or one of
            `bounds.METHODS`.
        model: the logits model.
        x: numpy inputs.
        radius: the L2 radius.
        sigma: the noise of smoothing.
        smoothing_samples: CERTIFY's n.
        gloro_net: the `GloroNet` to use for GloRo (default: one built on
            `model`).
        chunk, fraction: for KW and CROWN, see `bounds.linear_bounds`.

    Returns:
        `(predictions, certified)`, numpy `(n,)` int and bool; a prediction
        of -1 is an abstention.
    """
    num_classes = model.output_shape[-1]
    if method in ("gloro", "gloro_radius"):
        g = gloro_net if gloro_net is not None else gloro.GloroNet(model=model, epsilon=radius)
        g.epsilon = radius
        if method == "gloro":
            out = g.predict(x, batch_size=512, verbose=0)
            pred = out.argmax(axis=1)
            return np.where(pred < num_classes, pred, -1), pred < num_classes
        logits = g.f.predict(x, batch_size=512, verbose=0)
        return logits.argmax(axis=1), g.certified_radius(x, batch_size=512) > radius
    if method == "smoothing":
        return smoothing.certify(model, x, sigma, radius, num_classes, n=smoothing_samples, batch_size=_smoothing_batch(x))
    if method in ("kw", "crown"):
        return bounds.certify(method, model, x, radius, batch_size=1, chunk=chunk, fraction=fraction)
    return bounds.certify(method, model, x, radius)


def _smoothing_batch(x):
    """Noisy copies per forward pass of smoothing: about 40 MB of inputs."""
    return max(100, min(10_000, 10_000_000 // int(np.prod(x.shape[1:]))))


def _inputs_at_once(method, x):
    """How many inputs a method holds in memory together: the divisor of
    its peak memory per instance (for smoothing, noisy copies)."""
    if method in ("kw", "crown"):
        return 1
    if method == "smoothing":
        return min(_smoothing_batch(x), smoothing.N0 + smoothing.N)
    return min(len(x), 512 if method.startswith("gloro") else 256)


def certify_row(setting, method, model, trained_for, x, y, gloro_net=None):
    """Certifies `x` with `method`, timed and extrapolated to the test set.

    Returns:
        `(row, certified)`: the result row and which points were certified
        (numpy bool).
    """
    samples = setting.smoothing_samples
    if method.startswith("gloro"):
        g = gloro_net if gloro_net is not None else gloro.GloroNet(model=model, epsilon=setting.radius)
        g.freeze_lipschitz()  # once per network, not per test set
        gloro_net = g
        # Keras traces predict for each new batch shape: a first, untimed
        # call leaves only the certification in the timed one.
        certify(method, model, x, setting.radius, setting.sigma, gloro_net=g)
    linear = method in ("kw", "crown")
    fraction = setting.linear_fraction if linear else 1.0
    (pred, certified), seconds, peak = reporting.measure(
        lambda: certify(method, model, x, setting.radius, setting.sigma, samples, gloro_net, setting.chunk, fraction)
    )
    scale = TEST_SET / len(x)
    if method == "smoothing":
        scale *= (smoothing.N0 + smoothing.N) / (smoothing.N0 + samples)
    if linear and fraction < 1:
        units = bounds.hidden_units(*bounds.chain(model))
        fraction = sum(max(1, int(np.ceil(fraction * n))) for n in units) / sum(units)
        scale /= fraction
    return {
        "task": "certify",
        "method": method,
        "implementation": IMPLEMENTATION[method],
        "network": setting.network,
        "trained_for": trained_for,
        "dataset": setting.dataset,
        "device": "cpu",
        "radius": setting.radius,
        "sigma": setting.sigma if method == "smoothing" else None,
        "points_measured": len(x),
        "smoothing_samples": samples if method == "smoothing" else None,
        "hidden_units_bounded": fraction if linear else None,
        "seconds_measured": seconds,
        "seconds_test_set": seconds * scale,
        "extrapolated": bool(scale != 1),
        "mb_per_instance": peak / _inputs_at_once(method, x),
        # Meaningless on synthetic labels; valid only when smoothing drew
        # its full n and KW / CROWN bounded every hidden unit (else the
        # certificates are sound but looser than the method's own).
        "certified_accuracy": (
            float(np.mean(certified & (pred == y)))
            if setting.real_data and (method != "smoothing" or samples == smoothing.N) and fraction == 1 else None
        ),
        "certified_fraction": float(np.mean(certified)),
    }, certified


class _EpochClock(_subset.EpochClock, keras.callbacks.Callback):
    pass


def train_row(setting, method, model, x, y, epochs, batch):
    """Trains `model` for `method` and returns the cost row, with seconds per
    epoch scaled to the dataset's training set."""
    trainer = certified_training.trainer(method, model, setting.radius, setting.sigma)
    clock = _EpochClock()
    _, seconds, peak = reporting.measure(
        lambda: trainer.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, callbacks=[clock])
    )
    # The first epoch traces the step; later ones are the steady cost.
    steady = clock.wall[1:] or clock.wall
    return trainer, {
        "task": "train",
        "method": method,
        "implementation": TRAINING[method],
        "network": setting.network,
        "dataset": setting.dataset,
        "device": "cpu",
        "radius": setting.radius,
        "sigma": setting.sigma if method == "noise" else None,
        "points_measured": len(x),
        "epochs": epochs,
        "batch_size": batch,
        "seconds_measured": seconds,
        "seconds_per_epoch": _subset.median(steady) * setting.train_examples / len(x),
        "extrapolated": len(x) != setting.train_examples,
        "mb_per_instance": peak / batch,
        "certified_accuracy": None,
    }


def _data(setting):
    """`(x_train, y_train, x_test, y_test)`: the real data's first examples,
    or uniform inputs and random labels of the setting's shape."""
    n_test = max(setting.points.values())
    if setting.real_data:
        return _subset.load(train_examples=setting.train_subset, test_examples=n_test)
    rng = np.random.default_rng(0)
    x_train = rng.random((setting.train_subset,) + setting.input_shape, dtype=np.float32)
    x_test = rng.random((n_test,) + setting.input_shape, dtype=np.float32)
    return x_train, rng.integers(0, 10, len(x_train)), x_test, rng.integers(0, 10, n_test)


def run_setting(setting, log=print):
    """All rows of one network: training costs, then every certifier on the
    GloRo network and on each method's own network."""
    x_train, y_train, x_test, y_test = _data(setting)
    build = lambda: gloro.architectures.get(setting.network, setting.input_shape, 10, seed=0)  # noqa: E731
    rows, models = [], {}
    for method in ("gloro", "ibp", "crown_ibp", "bcp", "noise"):
        log(f"{setting.network}: training for {method}")
        trainer, row = train_row(setting, method, build(), x_train, y_train, setting.epochs, setting.batch)
        rows.append(row)
        models[method] = trainer
    if setting.kw_train:
        n, batch = setting.kw_train
        log(f"{setting.network}: KW training, {n} examples")
        rows.append(train_row(setting, "kw", build(), x_train[:n], y_train[:n], 2, batch)[1])
    plan = [(m, "gloro") for m in ("gloro", "gloro_radius", "ibp", "crown_ibp", "kw", "crown", "bcp", "smoothing")]
    if setting.own_networks:
        plan += [
            ("ibp", "ibp"), ("crown_ibp", "crown_ibp"), ("kw", "ibp"), ("crown", "crown_ibp"), ("bcp", "bcp"),
            ("smoothing", "noise"),
        ]
    progress = keras.utils.Progbar(len(plan))
    for method, trained_for in plan:
        k = setting.points[method]
        trainer = models[trained_for]
        logits_model = trainer.f if hasattr(trainer, "f") else trainer.layers[-1]
        row, _ = certify_row(
            setting, method, logits_model, trained_for, x_test[:k], y_test[:k],
            gloro_net=trainer if trained_for == "gloro" else None,
        )
        rows.append(row)
        progress.add(1, values=[("s", row["seconds_measured"])])
    return rows


def paper_columns(rows):
    """Adds the paper's figure for the same method and task, as its own
    keys, where the paper has one: on cnn_6C2F only, the network of its
    table (CIFAR-10, measured on a GPU)."""
    for row in rows:
        figures = PAPER_FIGURES.get(row["method"])
        if figures is None or row["network"] != "cnn_6C2F":
            row["paper_value"] = None
            continue
        if row["task"] == "train":
            row["paper_value"], row["paper_mb_per_instance"] = figures[0], figures[1]
        else:
            row["paper_value"], row["paper_mb_per_instance"] = figures[2], figures[3]
        row["paper_source"] = PAPER
    return rows


def _ratios(rows):
    """Each row's cost over GloRo's on the same network and task (GloRo's
    own network for certification)."""
    base = {}
    for row in rows:
        if row["method"] == "gloro" and row.get("trained_for", "gloro") == "gloro":
            base[row["network"], row["task"]] = row
    for row in rows:
        ref = base.get((row["network"], row["task"]))
        key = "seconds_test_set" if row["task"] == "certify" else "seconds_per_epoch"
        row["time_over_gloro"] = row[key] / ref[key] if ref else None
        row["memory_over_gloro"] = row["mb_per_instance"] / ref["mb_per_instance"] if ref and ref["mb_per_instance"] > 0 else None
    return rows


def _times(ratio):
    """A ratio as `1.4x` or `25,710x`."""
    return f"{ratio:.2g}x" if ratio < 10 else f"{ratio:,.0f}x"


def tables(rows):
    """The Markdown tables of a run: certification, then training."""
    rows = _ratios([dict(r) for r in rows])
    certify_columns = [
        ("network", "network", None), ("method", "method", None), ("network trained for", "trained_for", None),
        ("points measured", "points_measured", ","), ("s, 10,000 points", "seconds_test_set", ",.1f"),
        ("× GloRo", "time_over_gloro", _times), ("MB per instance", "mb_per_instance", ".3g"),
        ("× GloRo", "memory_over_gloro", _times), ("certified acc.", "certified_accuracy", ".3f"),
        ("paper s (GPU, CIFAR-10)", "paper_value", ",.1f"), ("paper MB", "paper_mb_per_instance", ",.1f"),
    ]
    train_columns = [
        ("network", "network", None), ("method", "method", None), ("examples timed", "points_measured", ","),
        ("s per epoch", "seconds_per_epoch", ",.1f"), ("× GloRo", "time_over_gloro", _times),
        ("MB per instance", "mb_per_instance", ".3g"), ("× GloRo", "memory_over_gloro", _times),
        ("paper s (GPU, CIFAR-10)", "paper_value", ",.1f"), ("paper MB", "paper_mb_per_instance", ",.1f"),
    ]
    return "\n\n".join([
        reporting.markdown_table([r for r in rows if r["task"] == "certify"], certify_columns),
        reporting.markdown_table([r for r in rows if r["task"] == "train"], train_columns),
    ])


app = typer.Typer(add_completion=False)


@app.command()
def main(
    quick: Annotated[bool, typer.Option(help="Smaller subsets: a few minutes.")] = False,
    out: Annotated[str, typer.Option(help="JSON file to write.")] = None,
    networks: Annotated[str, typer.Option(help="Comma-separated: cnn_2C2F, cnn_6C2F.")] = "cnn_2C2F,cnn_6C2F",
    tables_only: Annotated[bool, typer.Option(help="Print the tables of an existing --out file; run nothing.")] = False,
):
    """Times and memory of GloRo, IBP, KW, CROWN, CROWN-IBP, BCP and
    randomized smoothing: training and certification."""
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "certifiers_quick.json" if quick else "certifiers.json")
    if tables_only:
        with open(out) as f:
            print(tables(json.load(f)["rows"]))
        return
    start = time.perf_counter()
    wanted = networks.split(",")
    rows = []
    for setting in settings(quick):
        if setting.network in wanted:
            rows += run_setting(setting)
    reporting.write(
        out,
        paper_columns(rows),
        command="python benchmarks/certifiers.py" + (" --quick" if quick else ""),
        seconds=time.perf_counter() - start,
        memory=reporting.memory_method(),
        test_set=TEST_SET,
        versions={"keras": keras.__version__, "numpy": np.__version__, "gloro": gloro.__version__},
    )
    print(tables(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    app()
