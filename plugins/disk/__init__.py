"""The disk probe plugin."""
