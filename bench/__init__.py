"""Benchmarks and the multi-host test topology (network namespaces) for DeepTrace."""
