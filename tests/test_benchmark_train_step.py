"""benchmarks/train_step.py's plumbing: synthetic batches on the run's device, a failed child as its
row's error (named by its last error line), rows printed as they are measured."""
from __future__ import annotations

import torch

from benchmarks.step_measure import in_child, last_error_line
from benchmarks.step_report import HEADERS, RowPrinter
from benchmarks.step_variants import Setup, SyntheticStream, Variant


def test_synthetic_batches_are_on_the_runs_device():
    """Stand-in: "meta" plays the GPU (the first D step concatenated a CPU batch with CUDA fakes)."""
    x, y = SyntheticStream(2, 8, 10, seed=0, device=torch.device("meta")).next_batch()
    assert (x.device.type, y.device.type) == ("meta", "meta") and x.shape == (2, 3, 8, 8)
    x, y = SyntheticStream(2, 8, 10, seed=0).next_batch()
    assert x.device.type == "cpu" and -1 <= float(x.min()) and float(x.max()) <= 1


def test_the_error_line_of_a_traceback_is_its_last_named_error():
    text = ("child failed (1):\nTraceback (most recent call last):\n  File \"x.py\", line 3\n"
            "torch.AcceleratorError: CUDA error: an illegal memory access was encountered\n"
            "Search for `cudaErrorIllegalAddress' in https://docs.nvidia.com/cuda/\n")
    assert last_error_line(text) == "torch.AcceleratorError: CUDA error: an illegal memory access was encountered"
    assert last_error_line("") == "(no output)"


def test_a_child_that_fails_is_its_rows_error_and_the_rows_come_one_by_one():
    """A real child that fails (a resolution the model refuses) comes back as ``{"error": ...}``;
    the printer writes the header once, then every row when it is handed over, errors included."""
    s = Setup(channels=8, batch=2, checkpoint_from=32, classes=10, init="normal", device="cpu", threads=1)
    bad = Variant(resolution=48, precision="bf16", checkpointing="off", batch=2)
    result = in_child("memory", bad, s, timeout=300)
    assert set(result) == {"error"} and "resolution" in result["error"], result
    lines: list[str] = []
    printer = RowPrinter({"bf16": 1e12}, world=1, say=lines.append)
    printer.row(bad, result)
    good = Variant(resolution=64, precision="bf16", checkpointing="off", batch=2)
    printer.row(good, {"time": 0.5, "wall": 0.5, "spread": 0.0, "wrapped": 0, "flops": 4e9, "step_peak": 2 ** 20,
                       "process_peak": 2 ** 21, "host_reads": 0, "collectives": 0, "comm_bytes": 0})
    assert lines[0].startswith("| res |") and len(lines) == 4
    assert f"error: {result['error']}" in lines[2]
    assert lines[3].count("|") == len(HEADERS) + 1 and "| 4.00 |" in lines[3]  # 2 images in 0.5 s


def test_the_batch_search_doubles_in_one_child_and_stops_at_its_cap():
    """The --max-batch search (run on CPU here, where nothing runs out of memory): batches 2 and 4
    fit, 8 is over the cap, so the answer is 4 as a lower bound."""
    s = Setup(channels=8, batch=2, checkpoint_from=32, classes=10, init="normal", device="cpu", threads=1)
    v = Variant(resolution=64, precision="bf16", checkpointing="off", batch=2)
    assert in_child("search", v, s, timeout=600, cap=4, probes=5) == {"largest": 4, "failed_at": None,
                                                                         "limited": True}
