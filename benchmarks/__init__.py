"""Cost benchmarks of GloRo Nets against plain Keras networks (see BENCHMARKS.md)."""
