"""The collector: receives every agent's spans over OTLP, stores them in ClickHouse in the
OpenTelemetry Collector's schema, and stitches the two ends of each cross-host request
into one trace (``deeptrace collector --config config/collector.yaml``)."""
