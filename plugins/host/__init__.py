"""Host baseline metrics from procfs."""
