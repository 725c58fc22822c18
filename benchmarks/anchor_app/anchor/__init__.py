"""Plain Flower FedAvg on fedmerge's workload: the anchor of ``benchmarks/sim_overhead.py``."""
