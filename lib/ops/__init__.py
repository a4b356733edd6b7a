"""Running it: the local stack, pipeline records, the prediction log, drift, provenance."""
