"""Data: webdataset shards in, one infinite (images, labels) batch stream per rank out.

* ``prepare_data(cfg, run_dir) -> str`` (rank 0): the shard URL pattern of the run, writing the
  embedded digits shards first if ``data.source=digits`` (sources.py);
* ``build_loader(cfg, shards, rank, world_size, seed) -> BatchStream`` (every rank): the reader
  (loader.py);
* ``sagan-dist make-shards SRC OUT``: ImageFolder / ImageNet tree -> shards (shards.py).
"""
from sagan_dist.data.loader import BatchStream, build_loader
from sagan_dist.data.sources import prepare_data

__all__ = ["BatchStream", "build_loader", "prepare_data"]
