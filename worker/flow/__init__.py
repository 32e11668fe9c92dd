"""The call flow: one chunk from lease to manifest, image claims, run records, the global limiter, Celery glue."""
