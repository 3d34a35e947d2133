"""What the stage tasks stand on, in the flow process: stage outputs and their cache, MLflow
tracking and the registry, lineage, Prefect artifacts, locks, the local servers, URIs as shown (redacted)."""
