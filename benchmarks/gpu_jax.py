#!/usr/bin/env python
"""GPU figures on Keras' JAX backend, with no TensorFlow installed.

The same measurements as `benchmarks/run.py`'s training and certification
sections (interleaved epochs and `predict` calls of the GloroNet and of the
same network in plain Keras, after untimed warm-ups; medians and ratios), fed
from NumPy arrays instead of tf.data, so it runs where only JAX and Keras
are installed (the device machine).

Usage (from the repository root):

    KERAS_BACKEND=jax python benchmarks/gpu_jax.py --out benchmarks/gpu_jax.json

Mixed precision (issue 17): add `--dtype-policies float32,mixed_bfloat16`;
each network then also runs with bfloat16 layers (plain and GloRo alike),
and the GloroNet's epoch is compared with its float32 epoch.

See BENCHMARKS.md for the latest figures.
"""

import argparse
import datetime
import json
import os
import platform
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import run  # noqa: E402

# Training examples per network on the GPU: enough steps per epoch for a
# stable median (run.py's CPU sizes are smaller for LiResNet).
TRAIN_EXAMPLES = {"cnn_2C2F": 60_000, "cnn_6C2F": 10_000, "liresnet": 10_000, "liresnet12_w256": 10_000}
CERTIFY_EXAMPLES = {"liresnet": 10_000, "liresnet12_w256": 10_000}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # liresnet12_w256: LiResNet at the paper's scale (depth 12, width 256).
    parser.add_argument("--networks", default="cnn_2C2F,cnn_6C2F,liresnet,liresnet12_w256")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--power-iterations", default="",
                        help="comma-separated power-iteration steps per training step, one run each "
                             "(default: GloroNet's default)")
    parser.add_argument("--dtype-policies", default="float32",
                        help="comma-separated dtype policies of both networks' layers, one run each (e.g. "
                             "float32,mixed_bfloat16); the GloroNet certifies in float32 under each")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every data size (smoke runs)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import jax
    import keras

    import gloro

    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(jax.devices()[0].device_kind),
        "backend": keras.backend.backend(),
        "versions": {"gloro": gloro.__version__, "keras": keras.__version__, "jax": jax.__version__,
                     "python": platform.python_version()},
        "repeats": args.repeats,
        "batch": {"train": run.TRAIN_BATCH, "certify": run.CERTIFY_BATCH},
        "networks": {},
    }
    for name in args.networks.split(","):
        spec = run.NETWORKS[name]
        n_train = int(TRAIN_EXAMPLES.get(name, spec["train_examples"]) * args.scale)
        n_cert = int(CERTIFY_EXAMPLES.get(name, spec["certify_examples"]) * args.scale)
        x, y = run.synthetic_data(spec["input_shape"], n_train, 0)
        xc, _ = run.synthetic_data(spec["input_shape"], n_cert, 1)
        runs = {}
        for steps in map(int, (args.power_iterations or str(gloro.model.DEFAULT_POWER_ITERATIONS)).split(",")):
            runs[steps] = {}
            for policy in args.dtype_policies.split(","):
                print(f"{name}, {steps} power-iteration steps, {policy}: {n_train} training, {n_cert} "
                      "certification examples", flush=True)
                # Layers read the global policy when they are made; the
                # GloroNet itself stays float32.
                keras.config.set_dtype_policy(policy)
                try:
                    plain, g = run.build_models(name, 0, "keras", "auto", power_iterations=steps)
                finally:
                    keras.config.set_dtype_policy("float32")
                net = {"train_examples": n_train, "certify_examples": n_cert}
                net["training"] = run.bench_training(plain, g, x, y, args.repeats, print, input_kind="numpy")
                net["certification"] = run.bench_certification(
                    plain, g, xc, args.repeats, print, n_cert, input_kind="numpy"
                )
                print(f"  training ratio {net['training']['ratio_wall']:.3f}, "
                      f"certification ratio {net['certification']['ratio']:.3f}", flush=True)
                if policy != "float32" and "float32" in runs[steps]:
                    # Same process, minutes apart: the GloroNet's epoch in
                    # this policy against its float32 epoch.
                    net["training"]["gloro_epoch_vs_float32"] = run._ratio(
                        net["training"]["gloro"]["wall_median"],
                        runs[steps]["float32"]["training"]["gloro"]["wall_median"],
                    )
                    print(f"  GloroNet epoch against float32: {net['training']['gloro_epoch_vs_float32']:.3f}",
                          flush=True)
                runs[steps][policy] = net
        results["networks"][name] = runs
    with open(args.out, "w") as file:
        json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
