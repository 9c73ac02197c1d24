"""The JSON Schemas of desired.yaml and of the REST API, shipped inside the package as ``reconciler.schemas``."""
