"""The entropy metric inside vLLM's sampler: a logits processor that records only the rows that ask.

Asking vLLM for top-k log-probs makes its sampler copy the logits, take a top k and rank the sampled
token for *every* row of every step in which any request asks (about 7% of a CPU decode step at
256 rows, whatever share of the rows asks). :class:`EntropyRecorder` instead sees the step's raw
logits (before temperature and penalties, where vLLM takes its log-probs) and computes the entropy
of their top k renormalised (:func:`imm_ray.generate.entropy.token_entropy` of vLLM's top-k
log-probs) for the requests whose ``SamplingParams.extra_args`` carry :data:`EXTRA_KEY`, and for
no other row.

The processor runs in vLLM's engine process, so it hands its values back through a file named by
the request: one fixed-size binary record per (sample, position), appended and flushed every
step, before that step's tokens reach the caller. :class:`EntropyReader` reads the file as the
requests finish and gives each finished sample its entropies. Samples of one request (``n > 1``)
are told apart by the token ids each record carries (the token before its position), so the
recorder needs nothing from vLLM but its public logits-processor interface.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from vllm.v1.sample.logits_processor import LogitsProcessor

__all__ = ["EXTRA_KEY", "RECORD", "EntropyReader", "EntropyRecorder", "sample_entropies"]

EXTRA_KEY = "imm_entropy"  # extra_args[EXTRA_KEY] = {"file": str, "key": int, "top_k": int}

# uid: the sample's running output list (stable for the sample's life, preemption included);
# key: the caller's request number; pos: the position whose next-token distribution this is;
# tok: the token at pos - 1 (-1 at pos 0, or when the engine has not filled it in yet).
RECORD = np.dtype([("uid", "<i8"), ("key", "<i8"), ("pos", "<i4"), ("tok", "<i4"), ("ent", "<f4")])


def _top_k_entropy(logits: Any, top_k: int) -> Any:
    """Entropy (nats) of each row's top-k distribution renormalised to sum to 1 (torch, float32)."""
    import torch

    top = torch.topk(logits.float(), min(top_k, logits.shape[-1]), dim=-1).values
    logp = top - torch.logsumexp(top, dim=-1, keepdim=True)
    return -(logp.exp() * logp).sum(-1)


class EntropyRecorder(LogitsProcessor):
    """vLLM logits processor: record the top-k entropy of the rows that ask, leave the logits alone."""

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
        # batch index -> (file, key, top_k, the sample's running output token list)
        self.rows: dict[int, tuple[str, int, int, list[int]]] = {}
        self.files: dict[str, Any] = {}

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        spec = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if spec is None:
            return
        if not (isinstance(spec, dict) and isinstance(spec.get("file"), str) and isinstance(spec.get("key"), int)
                and isinstance(spec.get("top_k"), int) and spec["top_k"] > 0):
            raise ValueError(f"extra_args[{EXTRA_KEY!r}] must be {{'file': str, 'key': int, 'top_k': int > 0}}, "
                             f"got {spec!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # applied before temperature: the raw logits, for greedy requests too

    def update_state(self, batch_update: Any) -> None:
        from vllm.v1.sample.logits_processor.builtin import process_dict_updates

        def new_state(params: Any, _prompt: Any, output: list[int]):
            spec = (params.extra_args or {}).get(EXTRA_KEY)
            return None if spec is None else (spec["file"], spec["key"], spec["top_k"], output)

        process_dict_updates(self.rows, batch_update, new_state)
        live = {row[0] for row in self.rows.values()}
        for path in [p for p in self.files if p not in live]:
            self.files.pop(path).close()

    def apply(self, logits: Any) -> Any:
        if not self.rows:
            return logits
        import torch

        by_k: dict[int, list[int]] = {}
        for index, (_, _, top_k, _) in self.rows.items():
            by_k.setdefault(top_k, []).append(index)
        ents = np.empty(len(self.rows), dtype=np.float32)
        order: list[int] = []
        for top_k, indices in by_k.items():
            picked = logits.index_select(0, torch.tensor(indices, device=logits.device))
            ents[len(order):len(order) + len(indices)] = _top_k_entropy(picked, top_k).cpu().numpy()
            order += indices
        records = np.empty(len(order), dtype=RECORD)
        by_file: dict[str, list[int]] = {}
        for j, index in enumerate(order):
            path, key, _, output = self.rows[index]
            records[j] = (id(output), key, len(output), output[-1] if output else -1, ents[j])
            by_file.setdefault(path, []).append(j)
        for path, js in by_file.items():
            f = self.files.get(path)
            if f is None:
                f = self.files[path] = open(path, "ab")  # noqa: SIM115 (open while its requests run)
            f.write(records[js].tobytes())
            f.flush()
        return logits


def sample_entropies(records: np.ndarray, samples: Sequence[Sequence[int]], key: int) -> list[tuple[float, ...]]:
    """The entropies of each of one request's samples (their token ids), from that request's records.

    Per recorded sample the last record of each position wins (a re-run prefill, a recomputed
    preemption). A sample matches a recorded one whose positions cover its length and whose
    recorded tokens equal its own; samples with equal tokens share equal entropies. Raises when a
    sample has no match: a missing value is an error, never a zero.
    """
    recorded = []
    for uid in np.unique(records["uid"]):
        r = records[records["uid"] == uid]
        r = r[np.argsort(r["pos"], kind="stable")]
        recorded.append(r[np.r_[r["pos"][1:] != r["pos"][:-1], True]])
    out = []
    for j, tokens in enumerate(samples):
        n = len(tokens)
        want = np.asarray(tokens[: max(0, n - 1)], dtype=np.int64)
        match = None
        for r in recorded:
            if len(r) < n or np.any(r["pos"][:n] != np.arange(n)):
                continue
            got = r["tok"][1:n].astype(np.int64)
            if np.all((got == want) | (got < 0)):
                match = r
                break
        if match is None:
            raise RuntimeError(f"no entropy records for sample {j} of request {key} ({n} tokens; "
                               f"{len(recorded)} samples recorded)")
        out.append(tuple(float(e) for e in match["ent"][:n]))
    return out


class EntropyReader:
    """The caller's side of one stream's record file: read as requests finish, deleted on close."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.touch()
        self._offset = 0
        self._by_key: dict[int, list[np.ndarray]] = {}  # records read, by request, in file order

    @classmethod
    def temporary(cls, prefix: str) -> EntropyReader:
        """A reader on a new file in the temp dir (the engine's process writes to it by path)."""
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=".bin")
        os.close(fd)
        return cls(Path(path))

    def extra_args(self, key: int, top_k: int) -> dict[str, Any]:
        """The ``SamplingParams.extra_args`` that make request ``key`` record its entropies here."""
        return {EXTRA_KEY: {"file": str(self.path), "key": key, "top_k": top_k}}

    def entropies(self, key: int, samples: Sequence[Sequence[int]]) -> list[tuple[float, ...]]:
        """Entropies of request ``key``'s finished samples (their token ids, in order)."""
        self._read_new()
        parts = self._by_key.pop(key, [])  # a finished request's records are needed once
        records = np.concatenate(parts) if parts else np.empty(0, dtype=RECORD)
        return sample_entropies(records, samples, key)

    def _read_new(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        usable = len(data) - len(data) % RECORD.itemsize  # a record being written is read next time
        if not usable:
            return
        self._offset += usable
        new = np.frombuffer(data[:usable], dtype=RECORD)
        new = new[np.argsort(new["key"], kind="stable")]  # stable: a position's last record stays last
        for part in np.split(new, np.flatnonzero(np.diff(new["key"])) + 1):
            self._by_key.setdefault(int(part["key"][0]), []).append(part)

    def close(self) -> None:
        """Delete the record file."""
        self.path.unlink(missing_ok=True)
        self._by_key = {}

    def __enter__(self) -> EntropyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

