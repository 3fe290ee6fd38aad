"""DeepTrace protocol plugin for Redis (RESP2/RESP3), shipped as its own distribution."""
