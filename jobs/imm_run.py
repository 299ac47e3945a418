"""``ray job submit --working-dir . -- python -m jobs.imm_run --config jobs/configs/demo.yaml``."""

from __future__ import annotations

import sys

from imm_ray.cli import main as imm_main


def main(argv: list[str] | None = None) -> int:
    """``imm run`` itself: the same flags, and failures reported the same way (one line, exit 2)."""
    return imm_main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
