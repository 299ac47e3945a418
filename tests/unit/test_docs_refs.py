"""Every config key and ``make`` target that README.md and cluster/README.md name in code exists.

Checked: ``key.sub=value`` overrides and bare ``section.key`` spans against the config models
(``imm config show``'s keys; below a dict-valued key such as ``merge.params`` any name goes; a
``imm serve`` override may leave out ``serve.``), and ``make <target>`` against the Makefile.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imm_ray.config_reference import LIST_INDEX, config_keys

REPO = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "cluster/README.md")
# Placeholders the docs use to explain the syntax.
PLACEHOLDERS = {"key.sub", "a.b", "a.b.c"}
# Bare dotted spans that are files, not keys.
FILE_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl", ".md", ".py", ".toml", ".sh", ".txt", ".log", ".bak", ".tmp",
                 ".safetensors", ".parquet")

KEYS = {k.key: k.type for k in config_keys()}
SECTIONS = {key for key in KEYS if "." not in key}


def code_spans(text: str) -> list[str]:
    """Fenced blocks and inline code spans of a Markdown text."""
    return re.findall(r"```.*?```|`[^`\n]+`", text, re.S)


def overrides_in(span: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"(?<![\w./$-])([a-z_]+(?:\.[A-Za-z0-9_]+)+)=", span)}


def bare_keys_in(span: str) -> set[str]:
    """A span that is only ``section.key`` (``ray.`` spans are skipped: as often Ray's own Python API)."""
    text = span.strip("`")
    if not re.fullmatch(r"[a-z_]+(\.[A-Za-z0-9_*]+)+", text) or text.endswith(FILE_SUFFIXES):
        return set()
    return {text} if text.split(".")[0] in SECTIONS - {"ray"} else set()


def known_key(key: str) -> bool:
    """A key of the models, a list item's key (any index), a name below a dict-valued key, or ``section.*``."""
    parts = [LIST_INDEX if p.isdigit() else p for p in key.split(".")]
    if parts[-1] == "*":
        return ".".join(parts[:-1]) in KEYS
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if parts[end - 1] == LIST_INDEX and KEYS.get(".".join(parts[:end - 1]), "").startswith("list["):
            continue  # an item of a list of models
        if prefix not in KEYS:
            return False
        if KEYS[prefix].startswith("dict[") and end < len(parts):
            return True
    return True


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {t for line in re.findall(r"^([\w .-]+?)\s*:(?!=)", text, re.M) for t in line.split()}


@pytest.mark.parametrize("doc", DOCS)
def test_config_keys_named_in_the_docs_exist(doc):
    spans = code_spans((REPO / doc).read_text())
    overrides = set().union(*map(overrides_in, spans)) - PLACEHOLDERS
    bare = set().union(*map(bare_keys_in, spans))
    unknown = sorted(k for k in overrides if not (known_key(k) or known_key(f"serve.{k}")))
    unknown += sorted(k for k in bare - overrides if not known_key(k))
    assert not unknown, f"{doc} names config keys that do not exist (imm config show lists them): {unknown}"


@pytest.mark.parametrize("doc", DOCS)
def test_make_targets_named_in_the_docs_exist(doc):
    named = {m.group(1) for span in code_spans((REPO / doc).read_text())
             for m in re.finditer(r"\bmake\s+([a-z][\w-]*)", span)}
    missing = sorted(named - make_targets())
    assert not missing, f"{doc} names make targets the Makefile does not have: {missing}"


def test_the_checks_catch_a_wrong_key_and_accept_the_valid_forms():
    assert not known_key("serve.replicas") and known_key("serve.num_replicas")
    assert known_key("data.eval.0.limit") and known_key("merge.params.lam") and known_key("storage.*")
    assert known_key("generate.resources.resources.node_1") and known_key("train.resources.node_2")
    assert not known_key("generate.resources.node_1")
    assert bare_keys_in("`serve.replicas`") == {"serve.replicas"} and not bare_keys_in("`run.yaml`")
    assert {"demo", "test", "docs", "setup"} <= make_targets()
