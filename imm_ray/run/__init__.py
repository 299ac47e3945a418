"""The run directory as typed data: its layout, its stage state and the object that holds the run.

No Ray and no config: :mod:`imm_ray.run.layout` (every name under a run, stage keys),
:mod:`imm_ray.run.rundir` (the lock, stage marks, pinned inputs, checkpoints). Bytes, folders and
atomic publication stay in :mod:`imm_ray.storage`, which knows nothing of runs.
"""

from imm_ray.run.rundir import RunDir, RunStateError

__all__ = ["RunDir", "RunStateError"]
