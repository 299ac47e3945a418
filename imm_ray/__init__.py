"""imm-ray: self-improvement of LLM reasoners with Iterative Model Merging, on Ray."""

__version__ = "0.1.0"
