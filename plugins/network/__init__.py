"""The network probe plugin."""
