from setuptools import find_packages, setup

# Backend-specific dependencies. The TensorFlow extra also carries what
# only TensorFlow can run: gloro.data (tf.data, tensorflow-datasets), the
# SavedModel export, the scripts' input pipeline and TensorBoard logs.
TENSORFLOW = [
    "tensorflow>=2.16",
    "tensorflow-datasets>=4.9",
    # tensorflow-datasets downloads need it but do not declare it.
    "importlib_resources",
    "tensorboard>=2.16",
]
JAX = ["jax>=0.4.30"]
# 2.9: the `fp32_precision` switches, which the certifying forward pass sets.
TORCH = ["torch>=2.9"]

setup(
    # `gloro` on PyPI is the original TensorFlow 2 library (1.1.1); this one
    # is installed as gloro-keras and imported as `gloro`.
    name="gloro-keras",
    version="0.3.0",
    description="Certified-robust neural networks (GloRo Nets) for Keras 3 on TensorFlow, JAX and PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gloro", "gloro.*"]),
    python_requires=">=3.10",
    install_requires=[
        "keras>=3.3",
        "numpy>=1.26",
        # scripts/train.py and scripts/certify.py.
        "typer>=0.12",
        "matplotlib>=3.8",
    ],
    extras_require={
        "tensorflow": TENSORFLOW,
        "jax": JAX,
        "torch": TORCH,
        # The test command runs the suite on all three backends, each pass
        # on two processes (pytest-xdist). torch is pinned to the CPU build
        # the test machines hold on disk: a range that admits a newer
        # release downloads a CUDA build of several GB.
        "test": TENSORFLOW + ["jax[cpu]>=0.4.30", "torch==2.13.0", "pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100"],
    },
)
