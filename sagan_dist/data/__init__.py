"""Data: webdataset shards in, one infinite (images, labels) batch stream per rank out.

* ``prepare_data(cfg, run_dir) -> str`` (rank 0): the shard URL pattern of the run, writing the
  embedded digits shards first if ``data.source=digits`` (sources.py);
* ``build_loader(cfg, shards, rank, world_size, seed, device=None, start=None) -> BatchStream``
  (every rank): the reader (loader.py), read ahead by a thread; ``stream.next_batch(stop)`` raises
  `StopRequested` or `DataStallError` instead of waiting for ever (stream.py); ``stream.position()``
  is where it stands, and ``start`` reads on from such a position (position.py: exact resume);
* ``sagan-dist make-shards SRC OUT``: ImageFolder / ImageNet tree -> shards (shards.py).

images.py converts any image mode to RGB for both; procs.py starts and stops the reader's
processes (DataLoader workers, ``pipe:`` commands).
"""
from sagan_dist.data.loader import build_loader
from sagan_dist.data.sources import prepare_data
from sagan_dist.data.stream import BatchStream, DataStallError, StopRequested

__all__ = ["BatchStream", "DataStallError", "StopRequested", "build_loader", "prepare_data"]
