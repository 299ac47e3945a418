"""The run directory as typed data: its layout, the records between stages, its stage state and the
object that holds the run.

No Ray and no config: :mod:`imm_ray.run.layout` (every name under a run, stage keys, the stages
of a round), :mod:`imm_ray.run.arms` (the arm table and the resume plan of a round),
:mod:`imm_ray.run.records` (the rows of samples.jsonl, accepted.jsonl, eval_samples.jsonl),
:mod:`imm_ray.run.state` (the read-only view of state.json), :mod:`imm_ray.run.files` (readers of
the run's files), :mod:`imm_ray.run.rundir` (the lock, stage marks, pinned inputs, checkpoints).
Bytes, folders and atomic publication stay in :mod:`imm_ray.storage`, which knows nothing of runs.
"""

from imm_ray.run.records import AcceptedRow, EvalSampleRow, SampleRow
from imm_ray.run.rundir import RunDir, RunStateError
from imm_ray.run.state import RunState, StageRecord

__all__ = ["AcceptedRow", "EvalSampleRow", "RunDir", "RunState", "RunStateError", "SampleRow", "StageRecord"]
