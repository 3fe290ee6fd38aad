"""The cpu probe plugin."""
