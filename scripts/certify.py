"""Certifies a trained GloRo Net on a dataset split and audits its certificates.

Example:

    python scripts/certify.py --model runs/fashion_mnist_cnn_2C2F/model.keras \\
        --dataset fashion_mnist --data-dir /usr/share/datasets/fashion-mnist --audit 100

Reports clean accuracy, verified-robust accuracy (VRA: the GloRo prediction,
argmax over the classes and ⊥, is the label), the rejection rate (fraction
predicted ⊥), the throughput of the certification pass and, for a
`model.keras`, the Lipschitz constant, how far its guaranteed bound lies above
the power-iteration estimate, and certified radii. `--audit N` attacks the
first N certified points with `gloro.attacks.pgd_l2` at epsilon: an attack
that changes a certified prediction disproves the certificate, and the script
then exits with status 1.

A `--model` folder is read as a TensorFlow SavedModel (as written by
`GloroNet.export`); its `serve` function gives the logits, which fix
accuracy, VRA and rejection rate at the epsilon it was exported with, but not
certified radii.

Files written into `--out` (default `certify_<split>/`, or
`certify_<split>_saved_model/` for a SavedModel, next to the model):

- `examples.csv`: per example `index`, `label`, `clean_prediction` (argmax
  of the class logits), `prediction` (the GloRo prediction, `-1` for ⊥) and
  `radius` (certified L2 radius of the clean prediction; empty for a
  SavedModel). Non-finite logits give `-1` predictions and radius 0.
- `radius_curve.csv` and `radius_curve.png` (`model.keras` only): certified
  accuracy, the fraction of examples whose clean prediction is correct with a
  certified radius >= r, for r from 0 to twice epsilon or the largest finite
  radius of a correct example, whichever is larger.
- `certify.json`: every number above.
"""

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Annotated

import keras
import numpy as np
import tensorflow as tf
import typer
from matplotlib.figure import Figure

# Lets `python scripts/certify.py` run from a checkout without installing gloro.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gloro import GloroNet, attacks, certificates, data  # noqa: E402

_CURVE_POINTS = 201


def _fail(flag, message):
    raise typer.BadParameter(message, param_hint=f"'{flag}'")


def _shortest(value):
    # Epsilon is stored in float32: report its shortest decimal form (0.3,
    # not 0.30000001192092896).
    return None if value is None else float(str(np.float32(value)))


class _Model:
    """What certify needs of a `model.keras` GloroNet or of a SavedModel."""

    def __init__(self, path, epsilon):
        path = Path(path)
        if path.is_dir():
            self.gloro_net = None
            try:
                self._served = tf.saved_model.load(str(path))
            except OSError as err:
                _fail("--model", f"{path} is not a SavedModel: {str(err).splitlines()[0]}")
            self.input_shape = tuple(self._served.serve.input_signature[0].shape[1:])
            if epsilon is not None:
                _fail(
                    "--epsilon",
                    "a SavedModel certifies at the epsilon it was exported with; use model.keras.",
                )
            # Keras exports the model's variables under their paths.
            found = [v for v in self._served.variables if v.name.split("/")[-1].startswith("epsilon")]
            self.epsilon = float(found[0].numpy()) if found else None
        elif path.is_file():
            try:
                self.gloro_net = keras.saving.load_model(path, compile=False)
            except (ValueError, OSError) as err:
                _fail("--model", f"cannot load {path}: {str(err).splitlines()[0]}")
            if not isinstance(self.gloro_net, GloroNet):
                _fail("--model", f"{path} holds a {type(self.gloro_net).__name__}, not a GloroNet.")
            if epsilon is not None:
                self.gloro_net.epsilon = epsilon
            self.input_shape = tuple(self.gloro_net.f.input_shape[1:])
            self.epsilon = self.gloro_net.epsilon
        else:
            _fail("--model", f"{path} does not exist.")

    def certify(self, x):
        """The `m + 1` GloRo logits of a batch, as numpy."""
        if self.gloro_net is None:
            return self._served.serve(x).numpy()
        return self.gloro_net.predict_on_batch(x)

    def logits(self, x):
        """The `m` class logits, differentiable (for the attack)."""
        if self.gloro_net is None:
            return self._served.serve(x)[:, :-1]
        return self.gloro_net.f(x)


def _predictions(outputs):
    """Clean and GloRo predictions, -1 for ⊥ or non-finite logits."""
    m = outputs.shape[1] - 1
    finite = np.all(np.isfinite(outputs[:, :m]), axis=1)
    clean = np.where(finite, np.argmax(outputs[:, :m], axis=1), -1)
    prediction = certificates.gloro_predictions(outputs).numpy()
    return clean, np.where(prediction == m, -1, prediction)


def _lipschitz(g):
    rows = g.lipschitz_report()
    estimate = math.prod(row["estimate"] for row in rows)
    bound = math.prod(row["bound"] for row in rows)
    return {
        "lipschitz_constant": float(np.max(g.lipschitz_constant())),
        "lipschitz_report": {"estimate": estimate, "bound": bound, "ratio": bound / estimate, "layers": rows},
    }


def _radius_curve(correct, radius, epsilon, out, title):
    finite = radius[correct & np.isfinite(radius)]
    r_max = max(2 * epsilon, finite.max(initial=0.0)) or 1.0
    grid = np.linspace(0.0, r_max, _CURVE_POINTS)
    accuracy = np.array([np.mean(correct & (radius >= r)) for r in grid])
    np.savetxt(
        out / "radius_curve.csv",
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
    fig.savefig(out / "radius_curve.png", dpi=120)


def _audit(net, x, labels, batch_size, verbose):
    if not len(x):
        return {"points": 0, "broken": 0, "max_relative_margin_reduction": None}
    result = attacks.pgd_l2(
        net.logits, x, net.epsilon, labels=labels, seed=0, batch_size=batch_size, verbose=verbose
    )
    reduction = result.relative_reduction()
    return {
        "points": len(x),
        "broken": int(np.sum(result.success)),
        "max_relative_margin_reduction": (
            float(np.nanmax(reduction)) if np.any(np.isfinite(reduction)) else None
        ),
    }


def _certify_all(net, batches, num_examples, audit, verbose):
    """One pass over the data: per-example labels, clean and GloRo
    predictions, radii (None for a SavedModel), the first `audit` certified
    inputs, and the seconds spent certifying."""
    # Throughput is measured without the one-off tracing of the first call.
    net.certify(next(iter(batches))[0])
    seconds = 0.0
    labels, clean, prediction, radius, certified_x = [], [], [], [], []
    progress = keras.utils.Progbar(num_examples, verbose=verbose, unit_name="example")
    for x, y in batches:
        start = time.perf_counter()
        outputs = net.certify(x)
        seconds += time.perf_counter() - start
        batch_clean, batch_prediction = _predictions(outputs)
        labels.append(y.numpy())
        clean.append(batch_clean)
        prediction.append(batch_prediction)
        if net.gloro_net is not None:
            radius.append(net.gloro_net.certified_radius(x.numpy(), batch_size=len(x)))
        if sum(map(len, certified_x)) < audit:
            certified_x.append(x.numpy()[batch_prediction >= 0])
        progress.add(len(y))
    radius = np.concatenate(radius) if radius else None
    certified_x = np.concatenate(certified_x)[:audit] if audit else None
    return (*(np.concatenate(a) for a in (labels, clean, prediction)), radius, certified_x, seconds)


def _write_examples(path, labels, clean, prediction, radius):
    radius_text = [""] * len(labels) if radius is None else [f"{r:.8g}" for r in radius]
    with open(path, "w") as file:
        file.write("index,label,clean_prediction,prediction,radius\n")
        rows = zip(range(len(labels)), labels, clean, prediction, radius_text)
        file.writelines(",".join(map(str, row)) + "\n" for row in rows)


def certify(
    model: Annotated[str, typer.Option(help="model.keras file or SavedModel folder.")],
    dataset: Annotated[str, typer.Option(help="Dataset name for gloro.data.load.")] = "fashion_mnist",
    split: Annotated[str, typer.Option(help="Split, optionally sliced: test, train[:1000], ...")] = "test",
    epsilon: Annotated[
        float | None,
        typer.Option(help="Certified L2 radius (model.keras only).", show_default="the model's"),
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
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon >= 0):
        _fail("--epsilon", f"must be a finite number >= 0, got {epsilon}.")
    net = _Model(model, epsilon)
    if audit and net.epsilon is None:
        _fail("--audit", "the SavedModel does not reveal its epsilon; audit model.keras instead.")
    try:
        ds, info = data.load(dataset, split, data_dir=data_dir)
    except FileNotFoundError as err:
        _fail("--dataset", str(err).splitlines()[0])
    except ValueError as err:
        _fail("--dataset/--split", str(err).splitlines()[0])
    if info.input_shape != net.input_shape:
        _fail(
            "--dataset",
            f"{dataset} has inputs of shape {info.input_shape}, the model takes {net.input_shape}.",
        )
    saved_model = net.gloro_net is None
    if out is None:
        name = re.sub(r"\W", "_", split) + ("_saved_model" if saved_model else "")
        out = Path(model).parent / f"certify_{name}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    batches = data.pipeline(ds, batch_size, training=False, cache=False)
    labels, clean, prediction, radius, certified_x, seconds = _certify_all(
        net, batches, info.num_examples, audit, verbose
    )
    correct = clean == labels
    results = {
        "model": str(model),
        "format": "saved_model" if saved_model else "keras",
        "dataset": dataset,
        "split": split,
        "num_examples": len(labels),
        "epsilon": _shortest(net.epsilon),
        "clean_acc": float(np.mean(correct)),
        "vra": float(np.mean(prediction == labels)),
        "rejection_rate": float(np.mean(prediction == -1)),
        "certification_seconds": seconds,
        "throughput_examples_per_second": len(labels) / seconds,
    }
    _write_examples(out / "examples.csv", labels, clean, prediction, radius)
    if saved_model:
        results["radius"] = "unavailable: a SavedModel serves logits only; certify model.keras for radii"
    else:
        results.update(_lipschitz(net.gloro_net))
        # Expected 0: a point counts in VRA exactly when its radius exceeds
        # epsilon, except for rounding right at the boundary.
        results["radius_vra_disagreements"] = int(
            np.sum((prediction == labels) != (correct & (radius > net.epsilon)))
        )
        _radius_curve(correct, radius, net.epsilon, out, f"{dataset} {split}")
    if audit:
        results["audit"] = _audit(
            net, certified_x, prediction[prediction >= 0][: len(certified_x)], batch_size, verbose
        )
    (out / "certify.json").write_text(json.dumps(results, indent=2) + "\n")

    print(
        f"{dataset} {split}: clean accuracy {results['clean_acc']:.4f}, VRA {results['vra']:.4f} at epsilon "
        f"{results['epsilon']}, rejection rate {results['rejection_rate']:.4f}, "
        f"{results['throughput_examples_per_second']:.0f} examples/s; results in {out}"
    )
    if saved_model:
        print(f"Certified radii: {results['radius']}.")
    else:
        report = results["lipschitz_report"]
        print(
            f"Lipschitz constant {results['lipschitz_constant']:.4g}; guaranteed bound / power-iteration "
            f"estimate {report['ratio']:.6f}."
        )
    if audit:
        report = results["audit"]
        print(
            f"Audit: PGD broke {report['broken']} of {report['points']} certified points; largest margin "
            f"reduction {report['max_relative_margin_reduction']} of the clean margin."
        )
        if report["broken"]:
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
