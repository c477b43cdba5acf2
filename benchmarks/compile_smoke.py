"""A torch.compile smoke test of seconds: a small conv net with attention-like matmuls, forward and
backward under bf16 autocast, compiled with ``dynamic=False`` as `sagan_dist.acceleration` does.

Run first by ``benchmarks/gpu_check.sh``: if inductor, Triton or the compiler of the machine fails,
this says so in seconds and the check skips its compile rows instead of losing minutes to them.

    python -m benchmarks.compile_smoke --device cuda
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x)))
        flat = h.flatten(2)  # (b, c, hw): a softmax over positions, as self-attention does
        attn = torch.softmax(flat.transpose(1, 2) @ flat, dim=-1)
        return (flat @ attn).mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    device = torch.device(p.parse_args().device)
    started = time.perf_counter()
    net = _Net().to(device).to(memory_format=torch.channels_last)
    net.compile(dynamic=False)
    x = torch.randn(4, 3, 16, 16, device=device)
    for _ in range(2):  # the second call must reuse the graph
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = net(x)
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"compile smoke test: forward + backward compiled and run twice on {device} in "
          f"{time.perf_counter() - started:.1f} s (torch {torch.__version__})")


if __name__ == "__main__":
    main()
