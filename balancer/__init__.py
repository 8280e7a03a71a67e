"""The balancer role: reads live worker load and places micro-batches on per-worker RQ queues."""
