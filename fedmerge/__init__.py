"""fedmerge's kernel: data, models, alignment, merging, topologies, local training.

Pure functions on state dicts and tensors. Nothing here imports ``flwr`` or
``ray``; the Flower glue lives in ``strategies`` and the CLI in ``sims``.
"""

__version__ = "0.1.0"
