"""The memory probe plugin."""
