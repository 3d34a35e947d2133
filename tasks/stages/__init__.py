"""The Prefect tasks of the pipeline, one module per stage. They run in the flow process: each
keys its stage, launches a worker (tasks/workers/) to do the work and records the manifest.
Nothing here imports torch."""
