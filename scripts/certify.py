"""Certifies a trained GloRo Net on a dataset split and audits its certificates.

Example:

    python scripts/certify.py --model runs/fashion_mnist_cnn_2C2F/model.keras \\
        --dataset fashion_mnist --data-dir /usr/share/datasets/fashion-mnist --audit 100

The model is loaded with `gloro.load_model`, which checks the stored
Lipschitz constants against what the stored weights prove. Whatever it
refuses (a missing or unreadable file, a model that is not a GloroNet,
constants lowered below what the weights prove) stops the script with exit
status 2 and a one-line message. An exported SavedModel folder is refused
too: its constants cannot be checked against its weights, so certify the
`model.keras` it was exported from.

Reports clean accuracy, verified-robust accuracy (VRA: the GloRo prediction,
argmax over the classes and ⊥, is the label), the rejection rate (fraction
predicted ⊥), the throughput of the certification pass, the Lipschitz
constant, how far its guaranteed bound lies above the power-iteration
estimate, and certified radii. `--audit N` attacks the first N points
certified as a single class with `gloro.attacks.pgd_l2` at epsilon: an
attack that changes a certified prediction disproves the certificate, and
the script then exits with status 1.

For a relaxed network (`gloro.relaxations.RtkGloroNet`, `AffinityGloroNet`)
it also reports `rtk_vra` (the label is in the certified set) and the mean
certified set size; VRA there counts points whose top class is the label and
some set is certified, and the audit attacks the points whose certified set
is their top class alone.

Runs on Keras' TensorFlow and JAX backends (`KERAS_BACKEND`); the input
pipeline is tf.data and needs TensorFlow installed on either.

Files written into `--out` (default `certify_<split>/` next to the model):

- `examples.csv`: per example `index`, `label`, `clean_prediction` (argmax
  of the class logits), `prediction` (the GloRo prediction, `-1` for ⊥) and
  `radius` (certified L2 radius of the clean prediction). Non-finite logits
  give `-1` predictions and radius 0.
- `radius_curve.csv` and `radius_curve.png`: certified accuracy, the
  fraction of examples whose clean prediction is correct with a certified
  radius >= r, for r from 0 to twice epsilon or the largest finite radius of
  a correct example, whichever is larger.
- `certify.json`: every number above.

Every file is written aside and renamed into place, and `certify.json` is
removed first and written last: when it is there, the other files come from
the same pass. Nothing else in `--out` is touched.

Checked before any certification: the flags (`--epsilon` finite in float32,
`--out` a folder that can be written), the model, a split that selects at
least one example, images of the model's input shape and labels of the
model's classes (a label equal to the number of classes would otherwise be
read as ⊥).
"""

import math
import re
import sys
import time
from pathlib import Path
from typing import Annotated

import keras
import numpy as np
import typer
from matplotlib.figure import Figure

# Lets `python scripts/certify.py` run from a checkout without installing gloro.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gloro  # noqa: E402
from gloro import attacks, certificates, data, relaxations, runs  # noqa: E402

_CURVE_POINTS = 201


def _fail(flag, message):
    raise typer.BadParameter(message, param_hint=f"'{flag}'")


def _shortest(value):
    # Epsilon is stored in float32: report its shortest decimal form (0.3,
    # not 0.30000001192092896).
    return float(str(np.float32(value)))


def _load(path, epsilon):
    """The GloroNet in `path`, verified by `gloro.load_model`.

    Args:
        path: the `--model` argument.
        epsilon: the `--epsilon` argument, or None for the model's own.

    Returns:
        the `GloroNet`, certifying at `epsilon` if given.
    """
    if Path(path).is_dir():
        _fail(
            "--model",
            f"{path} is a folder; certify.py takes a model.keras file, because a SavedModel's "
            "constants cannot be checked against its weights.",
        )
    try:
        g = gloro.load_model(path)
    except (FileNotFoundError, ValueError) as err:
        _fail("--model", str(err).splitlines()[0])
    if epsilon is not None:
        g.epsilon = epsilon
    return g


def _predictions(outputs):
    """Clean and GloRo predictions, -1 for ⊥ or non-finite logits, and the
    size of the certified set (1 or 0 for a GloroNet; up to k for a relaxed
    one)."""
    m = outputs.shape[1] - 1
    finite = np.all(np.isfinite(outputs[:, :m]), axis=1)
    clean = np.where(finite, np.argmax(outputs[:, :m], axis=1), -1)
    prediction = keras.ops.convert_to_numpy(certificates.gloro_predictions(outputs))
    set_size = keras.ops.convert_to_numpy(certificates.certified_top_k(outputs))
    return clean, np.where(prediction == m, -1, prediction), set_size


def _lipschitz(g):
    return {
        "lipschitz_constant": float(np.max(g.lipschitz_constant())),
        # Computes every layer's guaranteed bound once, for the rows and the
        # whole network alike.
        "lipschitz_report": g.features_lipschitz(),
    }


def _radius_curve(correct, radius, epsilon, out, title):
    finite = radius[correct & np.isfinite(radius)]
    r_max = max(2 * epsilon, finite.max(initial=0.0)) or 1.0
    grid = np.linspace(0.0, r_max, _CURVE_POINTS)
    accuracy = np.array([np.mean(correct & (radius >= r)) for r in grid])
    with runs.atomic_path(out / "radius_curve.csv") as path:
        np.savetxt(
            path,
            np.column_stack([grid, accuracy]),
            delimiter=",",
            header="radius,certified_accuracy",
            comments="",
            fmt="%.8g",
        )
    # A bare Figure renders with the Agg backend, needing no display.
    fig = Figure(figsize=(5, 3.5), layout="tight")
    ax = fig.subplots()
    ax.plot(grid, accuracy)
    ax.axvline(epsilon, color="gray", linestyle="--", label=f"epsilon = {epsilon:g}")
    ax.set(title=title, xlabel="L2 radius r", ylabel="certified accuracy", ylim=(0, 1), xlim=(0, r_max))
    ax.legend()
    with runs.atomic_path(out / "radius_curve.png") as path:
        fig.savefig(path, dpi=120, format="png")


def _audit(g, x, labels, batch_size, verbose):
    if not len(x):
        return {"points": 0, "broken": 0, "max_relative_margin_reduction": None}
    result = attacks.pgd_l2(
        g.f, x, g.epsilon, labels=labels, seed=0, batch_size=batch_size, verbose=verbose
    )
    reduction = result.relative_reduction()
    return {
        "points": len(x),
        "broken": int(np.sum(result.success)),
        "max_relative_margin_reduction": (
            float(np.nanmax(reduction)) if np.any(np.isfinite(reduction)) else None
        ),
    }


def _certify_all(g, batches, num_examples, audit, verbose):
    """One pass over the data: per-example labels, clean and GloRo
    predictions, certified set sizes, whether the label is in the certified
    set, radii, the first `audit` inputs
    certified as a single class with their classes, and the seconds spent
    certifying."""
    # Throughput is measured without the one-off tracing of the first call.
    g.predict_on_batch(next(batches.as_numpy_iterator())[0])
    seconds = 0.0
    labels, clean, prediction, set_size, in_set, radius, certified_x = [], [], [], [], [], [], []
    progress = keras.utils.Progbar(num_examples, verbose=verbose, unit_name="example")
    m = g.f.output_shape[-1]
    for x, y in batches.as_numpy_iterator():
        if y.min() < 0 or y.max() >= m:
            # Column m is ⊥: such a label would count a rejection as correct.
            _fail("--dataset", f"the data has label {int(y.max() if y.max() >= m else y.min())}, outside the "
                  f"model's classes 0 to {m - 1}.")
        start = time.perf_counter()
        outputs = keras.ops.convert_to_numpy(g.predict_on_batch(x))
        seconds += time.perf_counter() - start
        batch_clean, batch_prediction, batch_set_size = _predictions(outputs)
        labels.append(y)
        clean.append(batch_clean)
        prediction.append(batch_prediction)
        set_size.append(batch_set_size)
        label_logit = np.take_along_axis(outputs, y.reshape(-1, 1).astype(int), axis=1)[:, 0]
        in_set.append((label_logit > outputs[:, -1]) & (batch_set_size > 0))
        radius.append(g.certified_radius(x, batch_size=len(x)))
        if sum(map(len, certified_x)) < audit:
            certified_x.append(x[batch_set_size == 1])
        progress.add(len(y))
    certified_x = np.concatenate(certified_x)[:audit] if audit else None
    arrays = (labels, clean, prediction, set_size, in_set, radius)
    return (*(np.concatenate(a) for a in arrays), certified_x, seconds)


def _write_examples(path, labels, clean, prediction, radius):
    radius_text = [f"{r:.8g}" for r in radius]
    with runs.atomic_path(path) as tmp, open(tmp, "w") as file:
        file.write("index,label,clean_prediction,prediction,radius\n")
        rows = zip(range(len(labels)), labels, clean, prediction, radius_text)
        file.writelines(",".join(map(str, row)) + "\n" for row in rows)


def _audit_line(report):
    if not report["points"]:
        return "Audit: no certified points to attack."
    return (
        f"Audit: PGD broke {report['broken']} of {report['points']} points certified as a single class; largest margin "
        f"reduction {report['max_relative_margin_reduction']:.4f} of the clean margin."
    )


def certify(
    model: Annotated[str, typer.Option(help="model.keras file.")],
    dataset: Annotated[str, typer.Option(help="Dataset name for gloro.data.load.")] = "fashion_mnist",
    split: Annotated[str, typer.Option(help="Split, optionally sliced: test, train[:1000], ...")] = "test",
    epsilon: Annotated[
        float | None,
        typer.Option(help="Certified L2 radius.", show_default="the model's"),
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            help="Folder with the dataset.", show_default="$GLORO_DATA_DIR, else tensorflow-datasets"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size.")] = 256,
    out: Annotated[
        str | None, typer.Option(help="Output folder.", show_default="certify_<split>/ next to the model")
    ] = None,
    audit: Annotated[int, typer.Option(min=0, help="Attack this many certified points with PGD.")] = 0,
    verbose: Annotated[int, typer.Option(min=0, max=1, help="1 shows progress bars.")] = 1,
):
    """Certifies a GloRo Net on a dataset split; see the module docstring."""
    # The model certifies in float32: 1e39 is finite here but inf there.
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon <= float(np.finfo(np.float32).max) and epsilon >= 0):
        _fail("--epsilon", f"must be a number >= 0, finite in float32 (below 3.4e38), got {epsilon}.")
    out = Path(out or Path(model).parent / ("certify_" + re.sub(r"\W", "_", split)))
    reason = runs.writable_folder(out)
    if reason:
        _fail("--out", reason)
    g = _load(model, epsilon)
    try:
        ds, info = data.load(dataset, split, data_dir=data_dir)
    except FileNotFoundError as err:
        _fail("--dataset", str(err).splitlines()[0])
    except ValueError as err:
        _fail("--dataset/--split", str(err).splitlines()[0])
    if not info.num_examples:
        _fail("--split", f"{split!r} selects no examples of {dataset}.")
    input_shape = tuple(g.f.input_shape[1:])
    if info.input_shape != input_shape:
        _fail(
            "--dataset",
            f"{dataset} has inputs of shape {info.input_shape}, the model takes {input_shape}.",
        )
    num_classes = g.f.output_shape[-1]
    if info.num_classes != num_classes:
        _fail("--dataset", f"{dataset} has {info.num_classes} classes, the model {num_classes}.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "certify.json").unlink(missing_ok=True)

    batches = data.pipeline(ds, batch_size, training=False, cache=False)
    labels, clean, prediction, set_size, in_set, radius, certified_x, seconds = _certify_all(
        g, batches, info.num_examples, audit, verbose
    )
    correct = clean == labels
    relaxed = isinstance(g, (relaxations.RtkGloroNet, relaxations.AffinityGloroNet))
    results = {
        "model": str(model),
        "dataset": dataset,
        "split": split,
        "num_examples": len(labels),
        "epsilon": _shortest(g.epsilon),
        "clean_acc": float(np.mean(correct)),
        "vra": float(np.mean(prediction == labels)),
        "rejection_rate": float(np.mean(prediction == -1)),
        "certification_seconds": seconds,
        "throughput_examples_per_second": len(labels) / seconds,
        **_lipschitz(g),
    }
    if relaxed:
        # The label is in the certified set: the classes above ⊥.
        results["rtk_vra"] = float(np.mean(in_set))
        results["mean_certified_k"] = float(np.mean(set_size))
    else:
        # Expected 0: a point counts in VRA exactly when its radius exceeds
        # epsilon, except for rounding right at the boundary.
        results["radius_vra_disagreements"] = int(
            np.sum((prediction == labels) != (correct & (radius > g.epsilon)))
        )
    _write_examples(out / "examples.csv", labels, clean, prediction, radius)
    _radius_curve(correct, radius, g.epsilon, out, f"{dataset} {split}")
    if audit:
        results["audit"] = _audit(
            g, certified_x, clean[set_size == 1][: len(certified_x)], batch_size, verbose
        )
    runs.write_json(out / "certify.json", results)

    print(
        f"{dataset} {split}: clean accuracy {results['clean_acc']:.4f}, VRA {results['vra']:.4f} at epsilon "
        f"{results['epsilon']}, rejection rate {results['rejection_rate']:.4f}, "
        f"{results['throughput_examples_per_second']:.0f} examples/s; results in {out}"
    )
    print(
        f"Lipschitz constant {results['lipschitz_constant']:.4g}; guaranteed bound / power-iteration "
        f"estimate {results['lipschitz_report']['ratio']:.6f}."
    )
    if relaxed:
        print(
            f"Relaxed robustness (k={g.k}): the label is in the certified set for "
            f"{results['rtk_vra']:.4f}; mean certified set size {results['mean_certified_k']:.4f}."
        )
    if audit:
        print(_audit_line(results["audit"]))
        if results["audit"]["broken"]:
            print(
                "Error: a certified prediction was changed within epsilon: the certificate is wrong.",
                file=sys.stderr,
            )
            raise typer.Exit(1)
    return results


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
app.command()(certify)

if __name__ == "__main__":
    app()
