"""benchmarks/counters.py: what counts as a host read. The CUDA path (profiler runtime events) needs
a GPU; on CPU only its event-name counting is exercised."""
from __future__ import annotations

import torch

from benchmarks.counters import count_host_reads, cuda_syncs


def test_explicit_and_implicit_cuda_synchronizes_are_counted_by_runtime_call():
    names = ["aten::mm", "cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaStreamSynchronize_v2",
             "cudaMemcpyAsync", "cudaEventSynchronize", "cudaLaunchKernel", "cudaStreamWaitEvent"]
    assert cuda_syncs(names) == {"cudaDeviceSynchronize": 1, "cudaStreamSynchronize": 2, "cudaEventSynchronize": 1}
    assert cuda_syncs([]) == {}


def test_on_cpu_reads_of_a_tensor_on_the_host_are_counted():
    t = torch.ones(3)
    with count_host_reads(torch.device("cpu")) as reads:
        t.sum().item()
        bool(t.all())
        t + 1  # no read
    assert reads.total == 2 and reads.flagged == 0
