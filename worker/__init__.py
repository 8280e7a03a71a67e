"""The worker role: one process per GPU, hosting a model behind a backend, fed by its own RQ queue."""
