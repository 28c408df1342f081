from setuptools import find_packages, setup

setup(
    name="gloro",
    version="0.3.0",
    description="Certified-robust neural networks (GloRo Nets) for Keras 3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gloro", "gloro.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.3",
        "numpy>=1.26",
        "tensorflow-datasets>=4.9",
        # tensorflow-datasets downloads need it but do not declare it.
        "importlib_resources",
        "typer>=0.12",
        "matplotlib>=3.8",
        "tensorboard>=2.16",
    ],
    extras_require={
        # The test command runs the suite on the JAX backend too, each pass
        # on two processes (pytest-xdist).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "jax[cpu]>=0.4.30"],
        "jax": ["jax>=0.4.30"],
    },
)
