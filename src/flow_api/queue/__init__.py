"""The queue layer: the only package that imports bullmq.

- `connection`: the Redis client and the mapping of a lost Redis to `QueueUnavailable`;
- `producer`: adding jobs and flagging cancels (the API's write side);
- `store`: reading a stored job back, in one snapshot, with BullMQ's states in our names;
- `consumer` and `slot_worker`: taking and finishing jobs — imported by workers only, so this
  package's `__init__` imports none of its modules (the API process never loads the consumer).
"""
