"""dcp-matrix: checkpoint save/load compatibility matrix for PyTorch distributed layouts.

Data flows one way: config -> grid -> jobs (one CLI per job) -> records -> Parquet -> report.
Modules that need torch import it themselves, so the grid and records stay torch-free.
"""
