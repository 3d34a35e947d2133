"""The worker processes: `python -m tasks.workers.<name> CONFIG.json`, one per stage that computes.
They import neither Prefect nor `flows`; they read a typed config (tasks/contracts/) and report
through events."""
