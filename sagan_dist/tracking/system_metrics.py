"""CPU, memory, disk, network and GPU use as ``system/*`` metrics, journaled like any metric.

Sampled by MLflow's system monitors on a thread of ours: MLflow's SystemMetricsMonitor posts to the
server itself and stops for good at its first failed request. The step is seconds since the run
began: unique and increasing across resumes, with no state to keep.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from sagan_dist.tracking.journal import Journal, now_ms

log = logging.getLogger(__name__)


class SystemMetrics:
    """A daemon thread that journals a sample every ``interval_s`` seconds until `stop`."""

    def __init__(self, journal: Journal, notify: Callable[[], None], interval_s: float) -> None:
        self.journal, self.notify, self.interval_s = journal, notify, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        try:
            monitors = _system_monitors()
            while not self._stop.wait(self.interval_s):
                metrics: dict[str, float] = {}
                for monitor in monitors:
                    monitor.collect_metrics()
                    metrics.update(monitor.aggregate_metrics())
                    monitor.clear_metrics()
                step = (now_ms() - self.journal.state["start_time"]) // 1000
                self.journal.append_metrics({f"system/{k}": float(v) for k, v in metrics.items()}, step)
                self.notify()
        except Exception as e:  # a broken sampler must not take training down
            log.warning("system metrics stopped: %s: %s", type(e).__name__, e)


def _system_monitors() -> list[Any]:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for gpu in (GPUMonitor, ROCMMonitor):
        try:
            return monitors + [gpu()]
        except Exception:  # no such GPU, or no driver library for it
            continue
    import torch

    if torch.cuda.is_available():
        log.warning("system metrics: no GPU metrics, MLflow's GPU monitor needs the nvidia-ml-py "
                    "package (pip install nvidia-ml-py)")
    return monitors
