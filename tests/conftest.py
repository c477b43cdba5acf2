"""Suite-wide settings.

One intra-op thread per process: the suite runs beside MLflow servers and multi-process runs on a
2-core machine, where OpenMP threads spinning against each other made a tiny training step 12x
slower (0.36 s with one thread, 4.3 s with two under load). torchrun does the same for its ranks.
"""
import os

import torch

os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every subprocess the tests start
torch.set_num_threads(1)
