"""dcp-matrix: checkpoint save/load compatibility matrix for PyTorch distributed layouts.

Data flows one way: config -> grid -> jobs (one CLI per job) -> records -> Parquet -> report.
Modules that need torch import it themselves, so the grid and records stay torch-free.
"""

import time as _time

# When this process imported the package: the start of a job's own account of its time
# (pipeline_lib.job.driver.JobClock; `python -m pipeline_lib` imports it first).
STARTED = _time.time()
