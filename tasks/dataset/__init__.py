"""Datasets as LLaMA-Factory registers them: the registry, loading a source into Arrow, turning a row
into the example a stage reads, JSON Lines. Read by the flow process (checks, preview) and by the
data worker."""
