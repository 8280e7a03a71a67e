"""The producer role: validate requests, enqueue them in Redis, read results back."""

from gpulb.models import BatchState, BatchStatus, Result
from producer.client import BatchHandle, Client, JobHandle

__all__ = ["BatchHandle", "BatchState", "BatchStatus", "Client", "JobHandle", "Result"]
