"""The worker: one owner of each attempt's life (`attempt`), its steps (`steps`), and the
process-level runner (`runner.FlowWorker`). Imported by worker processes only."""

from flow_api.worker.runner import FlowWorker, WorkerStopped

__all__ = ["FlowWorker", "WorkerStopped"]
