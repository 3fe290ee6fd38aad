"""DeepTrace agent core: plugin manager, config, BTF offsets, BPF loading, pipeline."""

__version__ = "0.1.0"
