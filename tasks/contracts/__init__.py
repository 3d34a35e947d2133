"""What crosses between the flow process and the workers, typed: the spec's sections, each worker's
config, the events workers send back, what each stage publishes in its manifest, and the
launch-and-wait protocol itself. No torch, no Prefect."""
