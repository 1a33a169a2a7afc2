"""Deterministic, dependency-light data partitioners for federated split fine-tuning.

Pure functions (numpy + stdlib only): every rank computes its own shard locally and all ranks agree.
"""

from partition.data_split import (
    iid_partition,
    label_dirichlet_partition,
    length_buckets,
    length_dirichlet_partition,
    partition_skew,
)

__all__ = [
    "iid_partition",
    "label_dirichlet_partition",
    "length_buckets",
    "length_dirichlet_partition",
    "partition_skew",
]
