"""Top layer: scenarios, the ``fedmerge`` CLI, launching simulations, results."""
