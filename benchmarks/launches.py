#!/usr/bin/env python
"""Kernels launched per compiled JAX training step: a device-independent cost.

On a GPU, a training step of a small network is bound by kernel launches,
not arithmetic, so its time follows the number of kernels the compiled step
runs. That number can be read without a GPU, from the optimized HLO that
XLA compiles for the step: every top-level instruction that computes
(fusions, convolutions, dots, custom calls, and operations XLA left unfused,
such as a concatenation) is one kernel, and a while loop's body counts once
per iteration (XLA records the trip count it proved). Parameters, constants,
bitcasts, tuples and copies (XLA's moves of the state between donated
buffers) are not counted. The figures here come from XLA's CPU
compiler, whose fusion decisions are close to, not identical with, its GPU
compiler's; compare ratios, not absolute counts.

For each network, the GloroNet (GloroNet's defaults) and the same network in
plain Keras (as `benchmarks/run.py` builds them) are compiled on the same
batch, and the script prints both counts and their ratio.

Usage (from the repository root):

    python benchmarks/launches.py --out benchmarks/launches.json
    python benchmarks/launches.py --networks cnn_6C2F --power-iterations 1,8

See BENCHMARKS.md for the latest figures.
"""

import argparse
import collections
import datetime
import json
import os
import platform
import re
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import run  # noqa: E402

# Top-level instructions that launch nothing: bookkeeping of values and
# buffers. Control flow is followed into the computations it runs.
NOT_KERNELS = ("parameter", "constant", "bitcast", "tuple", "get-tuple-element", "copy")
CONTROL_FLOW = ("while", "call", "conditional")
TARGET_RATIO = 2.0
DEFAULT_NETWORKS = ("cnn_6C2F", "liresnet12")

_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%\S+ = .*?\s([a-z][a-z0-9-]*)\(")
_WHILE_BODY = re.compile(r"body=%([\w.\-]+)")
_CALLED = re.compile(r"(?:to_apply|calls)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _computations(hlo_text):
    """`({name: [instruction lines]}, entry name)` of an HLO module's text."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(2)
            computations[current] = []
            if match.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            computations[current].append(line)
    if entry is None:
        raise ValueError("The HLO text has no ENTRY computation.")
    return computations, entry


def kernel_counts(hlo_text):
    """Kernels an optimized HLO module launches, by opcode.

    Args:
        hlo_text: the module's text (`jax.jit(f).lower(...).compile().as_text()`).

    Returns:
        `collections.Counter` of the kernel opcodes (all but `NOT_KERNELS`) run by
        one execution; while-loop bodies are counted once per proven
        iteration.

    Raises:
        ValueError: a while loop whose trip count XLA did not prove (its
            cost is then unknown).
    """
    computations, entry = _computations(hlo_text)

    def count(name):
        total = collections.Counter()
        for line in computations[name]:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            opcode = match.group(1)
            if opcode in NOT_KERNELS:
                continue
            if opcode not in CONTROL_FLOW:
                total[opcode] += 1
            elif opcode == "while":
                trips = _TRIP_COUNT.search(line)
                if trips is None:
                    raise ValueError(f"A while loop without a known trip count: {line.strip()[:200]}")
                body = count(_WHILE_BODY.search(line).group(1))
                for key, value in body.items():
                    total[key] += value * int(trips.group(1))
            elif opcode == "call":
                total.update(count(_CALLED.search(line).group(1)))
            elif opcode == "conditional":
                # One branch runs; the costliest bounds it.
                branches = [b.strip().lstrip("%") for b in _BRANCHES.search(line).group(1).split(",")]
                total.update(max((count(b) for b in branches), key=lambda c: sum(c.values())))
        return total

    return count(entry)


def train_step_hlo(model, x, y):
    """The optimized HLO text of `model`'s compiled JAX training step on
    the batch `(x, y)`; the model is compiled and trains on it once first
    (which builds its optimizer)."""
    import jax

    model.train_on_batch(x, y)
    state = model._get_jax_state(
        trainable_variables=True, non_trainable_variables=True,
        optimizer_variables=True, metrics_variables=True,
    )
    return jax.jit(model.train_step).lower(state, (x, y)).compile().as_text()


def measure(name, power_iterations, batch):
    """Counts of the plain network and the GloroNet of `name`."""
    spec = run.NETWORKS[name]
    x, y = run.synthetic_data(spec["input_shape"], batch, 0)
    plain, g = run.build_models(name, 0, "keras", "auto", power_iterations=power_iterations)
    counts = {}
    for label, model in (("plain", plain), ("gloro", g)):
        by_opcode = kernel_counts(train_step_hlo(model, x, y))
        counts[label] = {"kernels": sum(by_opcode.values()), "by_opcode": dict(by_opcode)}
    counts["ratio"] = counts["gloro"]["kernels"] / counts["plain"]["kernels"]
    counts["power_iterations"] = g.power_iterations
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default=",".join(DEFAULT_NETWORKS),
                        help=f"comma-separated names of benchmarks/run.py's NETWORKS (default: {','.join(DEFAULT_NETWORKS)})")
    parser.add_argument("--power-iterations", default="",
                        help="comma-separated steps per training step to compare (default: GloroNet's default)")
    parser.add_argument("--batch", type=int, default=run.TRAIN_BATCH)
    parser.add_argument("--out", help="JSON file for the figures")
    args = parser.parse_args()

    import jax
    import keras

    import gloro

    if keras.backend.backend() != "jax":
        parser.error("this benchmark reads JAX's compiled HLO: run it with KERAS_BACKEND=jax")
    steps = [int(s) for s in args.power_iterations.split(",") if s] or [None]
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "versions": {"gloro": gloro.__version__, "keras": keras.__version__, "jax": jax.__version__,
                     "python": platform.python_version()},
        "batch": args.batch,
        "not_counted": list(NOT_KERNELS),
        "target_ratio_max": TARGET_RATIO,
        "networks": {},
    }
    print(f"{'network':<12} {'steps':>5} {'plain':>6} {'gloro':>6} {'ratio':>6}")
    for name in args.networks.split(","):
        rows = []
        for k in steps:
            counts = measure(name, k, args.batch)
            rows.append(counts)
            print(f"{name:<12} {counts['power_iterations']:>5} {counts['plain']['kernels']:>6} "
                  f"{counts['gloro']['kernels']:>6} {counts['ratio']:>6.2f}", flush=True)
        results["networks"][name] = rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
