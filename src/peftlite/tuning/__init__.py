"""The fine-tuning toolkit around wrap: freezing, optimizer groups, blocks, progressive unfreezing, summary.

    freezing.py     freeze / unfreeze by pattern
    groups.py       param_groups: per-pattern LRs, layer-wise decay, no-decay parameters
    partition.py    blocks(): the partition layer-wise decay scales
    recomputation.py  checkpointing(): activation checkpointing of those blocks, by a class swap
    unfreezing.py   Unfreezer: progressive unfreezing that keeps schedulers and resuming working
    report.py       summary(): what trains, layer by layer

BatchNorm policy lives with the layers (``layers/batchnorm.py``), since ``wrap`` applies it.
"""
