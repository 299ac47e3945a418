"""The run config of the integration tests' tiny IMM runs, built in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imm_ray.config import deep_merge


def tiny_run_config(model_dir: Path, data_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """One imm round on the tiny memorising model with the ``hf`` engine (deterministic with the run's
    seed on the CPU), evaluated on ``tiny-test``; each keyword is merged over its config section
    (``run={"rounds": 2}``)."""
    tree = {
        "run": {"name": "tiny", "rounds": 1, "arms": ["imm"], "progress": False},
        "model": {"ref": str(model_dir)},
        "data": {
            "dir": str(data_dir),
            "train": {"name": "tiny-train", "preset": "gsm8k", "split": "train"},
            "eval": [{"name": "tiny-test", "preset": "gsm8k", "split": "test"}],
            "instruction_suffix": "",
        },
        "generate": {
            "engine": {"name": "hf", "dtype": "float32", "batch_size": 16},
            "samples_per_question": 2, "temperature": 0.7, "max_tokens": 40,
        },
        "train": {"epochs": 2, "lr": 1e-4, "micro_batch_size": 4, "effective_batch_size": 4, "max_length": 128},
        "merge": {"params": {"lam": 0.5, "drop_rate": 0.2}},
        "evaluate": {"max_tokens": 40},
    }
    return deep_merge(tree, sections)
