"""modelpress worker: Celery tasks and the compression methods they run."""
