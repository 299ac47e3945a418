"""Unit tests of imm_ray.merge (pure torch/safetensors; no Ray)."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import imm_ray.merge.engine as merge_engine
from imm_ray.merge import (
    MERGE_METHODS,
    MergeError,
    MergeMethod,
    TensorRNG,
    dare_drop,
    merge_checkpoints,
    merge_options,
    register_merge_method,
    slerp,
    task_vector_merge,
    weighted_average,
)
from imm_ray.merge.cli import add_merge_arguments, run_merge_cli
from imm_ray.merge.dtypes import BFLOAT16, FLOAT32, dtype_from_safetensors
from imm_ray.merge.methods import get_merge_method
from imm_ray.merge.safetensors_io import (
    CheckpointReader,
    StreamingSafetensorsWriter,
    TensorInfo,
)
from imm_ray.merge.selection import depth, value_at
from imm_ray.merge.sparsify import magnitude_mask, top_k_mask

transformers = pytest.importorskip("transformers")


def merge(method: str, anchor: Path, models: list[Path], out: Path, progress: bool = False, **options) -> Path:
    """``merge_checkpoints`` with ``method`` and the other :class:`MergeOptions` as keywords."""
    return merge_checkpoints(anchor, models, out, merge_options({"method": method, **options}), progress=progress)

SUPPORT_FILES = {
    "tokenizer.json": '{"dummy": true}\n',
    "tokenizer_config.json": '{"model_max_length": 512}\n',
    "special_tokens_map.json": "{}\n",
    "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}\n",
}


def tiny_config(**overrides):
    kwargs = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def build_model(folder: Path, seed: int = 0, noise_seed: int | None = None, max_shard_size=None, **cfg):
    """Save a tiny Llama (init from ``seed``), optionally perturbed like a fine-tune."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_config(**cfg))
    if noise_seed is not None:
        gen = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read by safetensors' own torch loader."""
    with CheckpointReader(folder) as reader:
        files = reader.weight_files
    tensors: dict[str, torch.Tensor] = {}
    for fname in files:
        tensors.update(load_file(folder / fname))
    return tensors


_ST_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64",
             torch.bool: "BOOL"}


def dtype_of(tensor: torch.Tensor):
    return dtype_from_safetensors(_ST_NAMES[tensor.dtype])


def storage(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor's bytes as the numpy storage the merge IO uses (uint16 for bfloat16)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    return tensor.contiguous().numpy()


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.tmp-")]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    anchor = build_model(root / "anchor", seed=0)
    for name, text in SUPPORT_FILES.items():
        (anchor / name).write_text(text)
    (anchor / "training_args.bin").write_bytes(b"not copied")
    (anchor / "checkpoint-10").mkdir()
    (anchor / "checkpoint-10" / "junk.txt").write_text("not copied")
    return {
        "anchor": anchor,
        "sft": build_model(root / "sft", seed=0, noise_seed=1),
        "sft_sharded": build_model(root / "sft_sharded", seed=0, noise_seed=1, max_shard_size="50KB"),
        "sft2": build_model(root / "sft2", seed=0, noise_seed=2),
        "bad_shape": build_model(root / "bad_shape", seed=0, intermediate_size=96),
        "bad_vocab": build_model(root / "bad_vocab", seed=0, vocab_size=300),
        "untied": build_model(root / "untied", seed=0, tie_word_embeddings=False),
    }


@pytest.fixture(scope="module")
def imm_default(ckpts, tmp_path_factory) -> Path:
    return merge("imm", ckpts["anchor"], [ckpts["sft"]],
                             tmp_path_factory.mktemp("imm") / "out", progress=False)


# ----------------------------------------------------------------------------- pure tensor functions

def rng(seed: int = 0, name: str = "t") -> TensorRNG:
    return TensorRNG(seed, name)


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def assert_close(got, want, atol=1e-6, rtol=0.0):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def test_dare_p0_is_identity():
    delta = randn(100)
    assert dare_drop(delta, 0.0, None) is delta


def test_dare_drop_fraction_and_exact_rescale():
    p = 0.2
    delta = randn(1_000_000, seed=123)
    assert bool((delta != 0).all())
    out = dare_drop(delta, p, rng(), "exact")
    dropped = out == 0
    assert abs(dropped.mean() - p) < 0.01
    kept = ~dropped
    assert np.array_equal(out[kept], (delta / np.float32(1 - p))[kept])
    assert not np.array_equal(out[kept], delta[kept])


def test_dare_seeding_depends_on_seed_and_tensor_name():
    delta = randn(10_000)
    a = dare_drop(delta, 0.2, rng(0, "x"))
    assert np.array_equal(a, dare_drop(delta, 0.2, rng(0, "x")))
    assert not np.array_equal(a, dare_drop(delta, 0.2, rng(1, "x")))
    assert not np.array_equal(a, dare_drop(delta, 0.2, rng(0, "y")))
    # different models (streams) get different masks
    assert not np.array_equal(rng().keep_mask(0, (1000,), 0.5), rng().keep_mask(1, (1000,), 0.5))


def test_rng_blocks_are_independent_of_blocking():
    whole = rng(3, "w").keep_mask(0, (10_007,), 0.3)
    pieces = [rng(3, "w").at(start).keep_mask(0, (min(777, 10_007 - start),), 0.3) for start in range(0, 10_007, 777)]
    assert np.array_equal(np.concatenate(pieces), whole)
    assert set(np.unique(whole).tolist()) == {0.0, 1.0}


def test_dare_l1_and_none_rescale():
    delta = randn(50_000)
    out_l1 = dare_drop(delta, 0.3, rng(), "l1")
    assert np.abs(out_l1).sum(dtype=np.float64) == pytest.approx(np.abs(delta).sum(dtype=np.float64), rel=1e-5)
    out_none = dare_drop(delta, 0.3, rng(), "none")
    kept = out_none != 0
    assert np.array_equal(out_none[kept], delta[kept])
    out_exact = dare_drop(delta, 0.3, rng(), "exact")
    assert np.array_equal(out_exact != 0, kept)  # same mask for every rescale mode


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dare_rejects_bad_rate(p):
    with pytest.raises(MergeError, match="drop_rate"):
        dare_drop(np.ones(4, dtype=np.float32), p, None)


def test_dare_rejects_bad_rescale():
    with pytest.raises(MergeError, match="rescale"):
        dare_drop(np.ones(4, dtype=np.float32), 0.5, None, "l2")  # type: ignore[arg-type]


def run_method(name, anchor, models, params=None, seed=0):
    """A method on copies (methods may overwrite their model inputs), as the engine calls it."""
    impl = get_merge_method(name)
    return impl.merge_tensor(anchor.copy() if anchor is not None else None, [m.copy() for m in models],
                             impl.validate(params, len(models)), TensorRNG(seed, "w"))


def test_method_formulas_on_tensors():
    a, s1, s2 = (randn(64, 32, seed=i) for i in range(3))
    out = run_method("imm", a, [s1], {"drop_rate": 0.0})
    assert_close(out, 0.5 * (a + s1))
    out = run_method("task_arithmetic", a, [s1, s2], {"lam": 0.3})
    assert_close(out, a + 0.3 * ((s1 - a) + (s2 - a)))
    out = run_method("task_arithmetic", a, [s1, s2], {"lam": 2.0, "weights": [0.5, 0.25]})
    assert_close(out, a + 2.0 * (0.5 * (s1 - a) + 0.25 * (s2 - a)))
    for name in ("dare_linear", "dare_ties"):  # p = 0: no drop; dare_ties then is TIES without trim
        out = run_method(name, a, [s1, s2], {"weights": [0.2, 0.7], "drop_rate": 0.0, "normalize": False})
        if name == "dare_linear":
            assert_close(out, a + 0.2 * (s1 - a) + 0.7 * (s2 - a))
        else:
            assert_close(out, a + ties_reference([s1 - a, s2 - a], [0.2, 0.7], False), atol=1e-5, rtol=1e-5)
    out = run_method("linear", None, [s1, s2], {"weights": [1.0, 3.0]})
    assert_close(out, 0.25 * s1 + 0.75 * s2)
    assert_close(weighted_average([s1, s2], [1.0, 1.0], normalize=False), s1 + s2)
    # pure functions leave their inputs alone
    a0, s10 = a.copy(), s1.copy()
    task_vector_merge(a, [s1], [1.0], lam=0.5, drop_rate=0.3, sparsification="random", rng=rng())
    weighted_average([a, s1], [0.5, 0.5])
    assert np.array_equal(a, a0) and np.array_equal(s1, s10)


def test_imm_with_dare_matches_core_formula():
    a, s = randn(1000, seed=5), randn(1000, seed=6)
    expected = a + 0.5 * dare_drop(s - a, 0.2, rng(7, "w"))
    got = run_method("imm", a, [s], {"lam": 0.5, "drop_rate": 0.2}, seed=7)
    assert_close(got, expected)
    kept = np.abs(got - a) > 1e-7
    assert_close((got - a)[kept], (0.5 * (s - a) / 0.8)[kept], rtol=1e-5)
    assert abs((~kept).mean() - 0.2) < 0.05


def ties_reference(deltas, weights, normalize):
    """TIES sign election + disjoint mean, written elementwise in plain Python."""
    shape = deltas[0].shape
    flat = [d.reshape(-1).tolist() for d in deltas]
    out = []
    for j in range(len(flat[0])):
        vals = [w * f[j] for w, f in zip(weights, flat)]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [(v > 0 and sign > 0) or (v < 0 and sign < 0) for v in vals]
        total = sum(v for v, ok in zip(vals, agree) if ok)
        wsum = sum(w for w, ok in zip(weights, agree) if ok)
        out.append(total / wsum if normalize and wsum != 0 else total)
    return np.array(out, dtype=np.float32).reshape(shape)


def f32(values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_ties_sign_election_by_hand():
    a = np.zeros(5, dtype=np.float32)
    m1 = f32([1.0, -2.0, 3.0, 0.5, -1.0])
    m2 = f32([2.0, 1.0, -1.0, -0.5, -3.0])
    # density 1 (no trim), weights 1: signs: +, -, +, + (tie -> +), -
    out = run_method("ties", a, [m1, m2], {"density": 1.0})
    assert np.array_equal(out, f32([1.5, -2.0, 3.0, 0.5, -2.0]))
    out = run_method("ties", a, [m1, m2], {"density": 1.0, "normalize": False})
    assert np.array_equal(out, f32([3.0, -2.0, 3.0, 0.5, -4.0]))
    # trim: density 0.4 keeps the 2 largest |delta| per model: m1 -> [0,-2,3,0,0], m2 -> [2,0,0,0,-3]
    out = run_method("ties", a, [m1, m2], {"density": 0.4, "lam": 0.5})
    assert np.array_equal(out, 0.5 * f32([2.0, -2.0, 3.0, 0.0, -3.0]))
    base, x, y = (randn(6, 7, seed=10 + i) for i in range(3))
    got = run_method("ties", base, [x, y], {"density": 1.0, "weights": [0.3, 0.9]})
    assert_close(got, base + ties_reference([x - base, y - base], [0.3, 0.9], True), atol=1e-5, rtol=1e-5)


def test_magnitude_masks_exact_counts_and_ties():
    values = f32([3.0, 1.0, 3.0, 2.0, 3.0, 0.5])
    assert top_k_mask(values, 2).tolist() == [True, False, True, False, False, False]
    assert top_k_mask(values, 0).sum() == 0 and top_k_mask(values, 6).all()
    delta = f32([-10.0, 5.0, -4.0, 3.0, 2.0, -1.0, 0.5, 0.25, 0.1, 0.05])
    # breadcrumbs: drop the top 10% (|-10|), keep the next 50%
    assert magnitude_mask(delta, 0.5, 0.1).tolist() == [False] + [True] * 5 + [False] * 4
    out = run_method("breadcrumbs", np.zeros(10, dtype=np.float32), [delta], {"density": 0.5, "gamma": 0.1})
    assert np.array_equal(out, delta * magnitude_mask(delta, 0.5, 0.1))


def test_slerp_endpoints_and_midpoint():
    v0, v1 = randn(40, 8, seed=2), randn(40, 8, seed=3)
    assert np.array_equal(run_method("slerp", v0, [v1], {"t": 0.0}), v0)
    assert np.array_equal(run_method("slerp", v0, [v1], {"t": 1.0}), v1)
    e0, e1 = f32([1.0, 0.0]), f32([0.0, 1.0])
    assert_close(slerp(0.5, e0, e1), f32([0.5 ** 0.5, 0.5 ** 0.5]))
    assert_close(slerp(1 / 3, e0, e1), f32([0.5 * 3 ** 0.5, 0.5]))
    # general midpoint: the formula with the angle between the flattened tensors
    import math

    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    theta = math.acos(float((v0 * v1).sum() / (n0 * n1)))
    want = (math.sin(theta / 2) / math.sin(theta)) * (v0 + v1)
    assert_close(run_method("slerp", v0, [v1], {"t": 0.5}), want, atol=1e-5, rtol=1e-5)
    # colinear tensors fall back to lerp
    assert_close(slerp(0.25, v0, 2 * v0), 1.25 * v0)


def test_bf16_conversion_matches_torch():
    """Round-to-nearest-even float32 -> bfloat16 and the exact way back, bit for bit against torch."""
    from imm_ray.merge.dtypes import BFLOAT16

    values = np.concatenate([randn(100_000, seed=4) * 1e3, randn(1000, seed=5) * 1e-38,
                             f32([0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.38e38, -3.38e38])])
    ours = BFLOAT16.from_float32(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    back = BFLOAT16.to_float32(ours)
    assert np.array_equal(back, torch.from_numpy(theirs.view(np.int16)).view(torch.bfloat16).float().numpy())
    assert BFLOAT16.fits(f32([3.38e38])) and not BFLOAT16.fits(f32([3.397e38]))
    assert not BFLOAT16.fits(f32([1.0, np.nan])) and not BFLOAT16.fits(f32([-np.inf]))
    assert not BFLOAT16.all_finite(BFLOAT16.from_float32(f32([3.397e38])))


def test_depth_gradients():
    assert value_at([0.0, 1.0], 0.25) == 0.25 and value_at([0.2, 0.4, 1.0], 0.75) == pytest.approx(0.7)
    assert value_at(0.3, 0.9) == 0.3 and value_at([0.1, 0.9], 1.0) == 0.9
    assert depth("model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert depth("model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert depth("model.embed_tokens.weight", 5) == 0.0 and depth("model.norm.weight", 5) == 1.0


# ----------------------------------------------------------------------------- parameters / registry

@pytest.mark.parametrize(
    ("method", "n_models", "params", "needle"),
    [
        ("imm", 1, {"lamda": 0.5}, "lamda"),
        ("imm", 1, {"drop_rate": 1.0}, "drop_rate"),
        ("imm", 1, {"drop_rate": -0.1}, "drop_rate"),
        ("imm", 1, {"lam": float("nan")}, "lam"),
        ("task_arithmetic", 1, {"lam": 1e300}, "lam"),
        ("imm", 1, {"lam": "0.5"}, "lam"),
        ("imm", 1, {"rescale": "l2"}, "rescale"),
        ("imm", 2, {}, "exactly 1"),
        ("task_arithmetic", 1, {"drop_rate": 0.2}, "drop_rate"),
        ("dare_linear", 2, {"weights": [1.0]}, "weights"),
        ("linear", 2, {"weights": [1.0, "x"]}, "weights"),
        ("linear", 2, {"weights": [1.0, -1.0]}, "weights"),
        ("linear", 1, {"lam": 0.5}, "lam"),
    ],
)
def test_invalid_params_raise_naming_param(method, n_models, params, needle):
    with pytest.raises(MergeError, match=needle):
        get_merge_method(method).validate(params, n_models)


def test_defaults_are_paper_settings():
    assert get_merge_method("imm").validate(None, 1) == {"lam": 0.5, "drop_rate": 0.2, "rescale": "exact"}
    assert get_merge_method("linear").validate({}, 4)["weights"] == [0.25] * 4
    assert set(MERGE_METHODS) >= {"imm", "linear", "task_arithmetic", "dare_linear"}


def test_unknown_method_and_param_before_writing(ckpts, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MergeError, match="unknown merge method 'ties_x'"):
        merge("ties_x", ckpts["anchor"], [ckpts["sft"]], out, progress=False)
    with pytest.raises(MergeError, match="'bogus'"):
        merge("imm", ckpts["anchor"], [ckpts["sft"]], out, params={"bogus": 1}, progress=False)
    assert not out.exists()


def test_register_custom_method(ckpts, tmp_path):
    class TakeModel(MergeMethod):
        name = "take_model_test"
        uses_anchor_weights = False

        def merge_tensor(self, anchor, models, params, generator):
            return models[0]

    register_merge_method(TakeModel)
    try:
        with pytest.raises(MergeError, match="already registered"):
            register_merge_method(TakeModel)
        out = merge("take_model_test", ckpts["anchor"], [ckpts["sft"]], tmp_path / "o", progress=False)
        ref = load_all(ckpts["sft"])
        got = load_all(out)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    finally:
        MERGE_METHODS.pop("take_model_test", None)


# ----------------------------------------------------------------------------- checkpoint merges

def test_imm_p0_is_plain_average(ckpts, tmp_path):
    out = merge("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "avg",
                            params={"drop_rate": 0.0}, progress=False)
    a, s, m = load_all(ckpts["anchor"]), load_all(ckpts["sft"]), load_all(out)
    assert m.keys() == a.keys()
    for name in a:
        torch.testing.assert_close(m[name], 0.5 * (a[name] + s[name]), rtol=0, atol=1e-6)


def test_imm_default_output_is_loadable_and_tied(ckpts, imm_default):
    out = imm_default
    tensors = load_all(out)
    assert "lm_head.weight" not in tensors
    assert tensors.keys() == load_all(ckpts["anchor"]).keys()
    # support files copied, weights / subfolders / training artefacts not
    for name, text in SUPPORT_FILES.items():
        assert (out / name).read_text() == text
    for name in ("config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (ckpts["anchor"] / name).read_bytes()
    assert not (out / "training_args.bin").exists() and not (out / "checkpoint-10").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), tensors["model.embed_tokens.weight"])
    # DARE was really applied: where the update is non-zero about p of the entries equal the anchor
    a, s = load_all(ckpts["anchor"]), load_all(ckpts["sft"])
    unchanged = total = 0
    for name in a:
        moved = s[name] != a[name]
        unchanged += int((tensors[name][moved] == a[name][moved]).sum())
        total += int(moved.sum())
    assert total > 50_000 and abs(unchanged / total - 0.2) < 0.01


def test_provenance(ckpts, imm_default):
    prov = json.loads((imm_default / "merge_provenance.json").read_text())
    assert prov["method"] == "imm" and prov["seed"] == 0
    assert prov["params"] == {"lam": 0.5, "drop_rate": 0.2, "rescale": "exact"}
    assert prov["anchor"]["path"] == str(ckpts["anchor"].absolute())
    sha = hashlib.sha256((ckpts["sft"] / "model.safetensors").read_bytes()).hexdigest()
    assert prov["models"][0]["weight_files"] == {"model.safetensors": sha}
    out_sha = hashlib.sha256((imm_default / "model.safetensors").read_bytes()).hexdigest()
    assert prov["output"]["weight_files"] == {"model.safetensors": out_sha}
    assert prov["versions"]["numpy"] == np.__version__ and "safetensors" in prov["versions"]


def test_same_seed_identical_bytes_different_seed_differs(ckpts, imm_default, tmp_path):
    again = merge("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "again", progress=False)
    assert file_bytes(again) == file_bytes(imm_default)
    other = merge("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "seed1", seed=1, progress=False)
    assert (other / "model.safetensors").read_bytes() != (imm_default / "model.safetensors").read_bytes()


def test_sharded_input_merges_like_single_file(ckpts, imm_default, tmp_path):
    assert (ckpts["sft_sharded"] / "model.safetensors.index.json").is_file()
    out = merge("imm", ckpts["anchor"], [ckpts["sft_sharded"]], tmp_path / "o", progress=False)
    assert (out / "model.safetensors").read_bytes() == (imm_default / "model.safetensors").read_bytes()


def test_sharded_output(ckpts, imm_default, tmp_path):
    out = merge("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "o",
                            progress=False, max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    got, ref = load_all(out), load_all(imm_default)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_dtype_override_bf16(ckpts, tmp_path):
    out = merge("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "o", dtype="bf16", progress=False)
    tensors = load_all(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_default_dtype_follows_anchor_storage(ckpts, tmp_path):
    bf16 = tmp_path / "anchor_bf16"
    bf16.mkdir()
    for f in ckpts["anchor"].iterdir():
        if f.is_file():
            (bf16 / f.name).write_bytes(f.read_bytes())
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(bf16 / "model.safetensors").items()}
    save_file(tensors, bf16 / "model.safetensors", metadata={"format": "pt"})
    out = merge("imm", bf16, [ckpts["sft"]], tmp_path / "o", params={"drop_rate": 0.0}, progress=False)
    got, s = load_all(out), load_all(ckpts["sft"])
    for k, v in tensors.items():
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], (v.float() + 0.5 * (s[k] - v.float())).to(torch.bfloat16))


def test_linear_and_dare_linear_two_models(ckpts, tmp_path):
    s1, s2, a = load_all(ckpts["sft"]), load_all(ckpts["sft2"]), load_all(ckpts["anchor"])
    out = merge("linear", ckpts["anchor"], [ckpts["sft"], ckpts["sft2"]], tmp_path / "lin",
                            params={"weights": [1.0, 3.0]}, progress=False)
    got = load_all(out)
    for k in a:
        torch.testing.assert_close(got[k], 0.25 * s1[k] + 0.75 * s2[k], rtol=0, atol=1e-6)
    out = merge("dare_linear", ckpts["anchor"], [ckpts["sft"], ckpts["sft2"]], tmp_path / "dl",
                            params={"weights": [0.5, 0.5], "drop_rate": 0.0}, progress=False)
    got = load_all(out)
    for k in a:
        torch.testing.assert_close(got[k], a[k] + 0.5 * (s1[k] - a[k]) + 0.5 * (s2[k] - a[k]), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- safety

def test_shape_mismatch_raises_before_writing(ckpts, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(MergeError, match=r"mlp\.(down|gate|up)_proj\.weight.*\[128, 64\]|\[64, 128\]") as err:
        merge("imm", ckpts["anchor"], [ckpts["bad_shape"]], out, progress=False)
    assert "96" in str(err.value)
    assert leftovers(tmp_path, "o") == []


def test_vocab_mismatch_names_both_sizes(ckpts, tmp_path):
    with pytest.raises(MergeError, match="vocab") as err:
        merge("imm", ckpts["anchor"], [ckpts["bad_vocab"]], tmp_path / "o", progress=False)
    assert "256" in str(err.value) and "300" in str(err.value)
    assert leftovers(tmp_path, "o") == []


def test_tied_anchor_vs_untied_model(ckpts, tmp_path):
    with pytest.raises(MergeError, match="lm_head.weight"):
        merge("imm", ckpts["anchor"], [ckpts["untied"]], tmp_path / "o", progress=False)
    assert leftovers(tmp_path, "o") == []


def test_nan_input_publishes_nothing(ckpts, tmp_path):
    bad = tmp_path / "nan_model"
    bad.mkdir()
    for f in ckpts["sft"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match="NaN"):
        merge("imm", ckpts["anchor"], [bad], tmp_path / "o", progress=False)
    assert leftovers(tmp_path, "o") == []


def test_non_finite_result_publishes_nothing(ckpts, tmp_path):
    class Broken(MergeMethod):
        name = "broken_test"

        def merge_tensor(self, anchor, models, params, generator):
            out = anchor.copy()
            out.reshape(-1)[-1] = float("inf")
            return out

    register_merge_method(Broken)
    try:
        with pytest.raises(MergeError, match="NaN/Inf"):
            merge("broken_test", ckpts["anchor"], [ckpts["sft"]], tmp_path / "o", progress=False)
    finally:
        MERGE_METHODS.pop("broken_test", None)
    with pytest.raises(MergeError, match="overflow when casting to float16"):
        merge("task_arithmetic", ckpts["anchor"], [ckpts["sft"]], tmp_path / "o",
                          params={"lam": 1e7}, dtype="float16", progress=False)
    assert leftovers(tmp_path, "o") == []


def test_existing_out_dir_is_not_overwritten(ckpts, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="already exists"):
        merge("imm", ckpts["anchor"], [ckpts["sft"]], out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_weights_raise(tmp_path, ckpts):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MergeError, match="no model.safetensors"):
        merge("imm", ckpts["anchor"], [empty], tmp_path / "o", progress=False)


# ----------------------------------------------------------------------------- IO, CLI, purity

def test_streaming_writer_roundtrip(tmp_path):
    tensors = {
        "a.bf16": torch.randn(7, 5).to(torch.bfloat16),
        "b.f16": torch.randn(3).to(torch.float16),
        "c.i64": torch.arange(10),
        "d.bool": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 4),
        "g.f32": torch.randn(100, 100),
    }
    infos = [TensorInfo(k, dtype_of(v), tuple(v.shape)) for k, v in sorted(tensors.items())]
    for size, expect_index in ((None, False), (300, True)):
        folder = tmp_path / str(size)
        folder.mkdir()
        writer = StreamingSafetensorsWriter(folder, infos, size)
        for info in infos:
            writer.write(info.name, storage(tensors[info.name]))
        files = writer.close()
        assert (folder / "model.safetensors.index.json").exists() == expect_index
        assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(files)
        for fname in files:
            with safe_open(str(folder / fname), framework="pt") as fh:
                assert fh.metadata() == {"format": "pt"}
        back = load_all(folder)
        assert back.keys() == tensors.keys()
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_writer_rejects_out_of_plan_tensor(tmp_path):
    writer = StreamingSafetensorsWriter(tmp_path, [TensorInfo("x", FLOAT32, (2,))])
    with pytest.raises(MergeError, match="expected 'x'"):
        writer.write("x", np.zeros(3, dtype=np.float32))
    with pytest.raises(MergeError, match="unplanned"):
        writer.write_block("y", 0, np.zeros(1, dtype=np.float32))
    with pytest.raises(MergeError, match="incomplete"):
        writer.close()
    writer.abort()


def test_writer_blocks_in_any_order_and_reader_ranges(tmp_path):
    value = torch.randn(37, 11).to(torch.bfloat16)
    writer = StreamingSafetensorsWriter(tmp_path, [TensorInfo("w", BFLOAT16, (37, 11))])
    flat = storage(value).reshape(-1)
    for start in reversed(range(0, flat.size, 50)):
        writer.write_block("w", start, flat[start : start + 50].copy())
    writer.close()
    assert torch.equal(load_all(tmp_path)["w"], value)
    with CheckpointReader(tmp_path) as reader:
        assert np.array_equal(reader.get("w"), storage(value))
        assert np.array_equal(reader.get_float32("w"), value.float().numpy())
        part = reader.read_into("w", 13, np.empty(20, dtype=np.uint16))
        assert np.array_equal(part, flat[13:33])


def test_cli(ckpts, imm_default, tmp_path):
    parser = argparse.ArgumentParser()
    add_merge_arguments(parser)
    args = parser.parse_args([
        "--method", "imm", "--base", str(ckpts["anchor"]), "--model", str(ckpts["sft"]),
        "--lambda", "0.5", "--drop-rate", "0.2", "--seed", "0", "--no-progress", "--out", str(tmp_path / "o"),
    ])
    assert run_merge_cli(args) == 0
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == (imm_default / "model.safetensors").read_bytes()
    args = parser.parse_args([
        "--method", "linear", "--base", str(ckpts["anchor"]), "--model", str(ckpts["sft"]),
        "--model", str(ckpts["sft2"]), "--weight", "1", "--weight", "1", "--lambda", "0.5",
        "--no-progress", "--out", str(tmp_path / "bad"),
    ])
    with pytest.raises(MergeError, match="lam"):  # linear has no 'lam'
        run_merge_cli(args)
    assert not (tmp_path / "bad").exists()


PURE_IMPORTS = ("imm_ray.cli_flags", "imm_ray.errors", "imm_ray.registry")


def test_merge_package_does_not_import_ray():
    """The merge package is pure: it imports neither ray nor other imm_ray packages (which might),
    except the stdlib-only imm_ray.errors (UserError, the one-line error reporting) and
    imm_ray.registry (the one registry style) and imm_ray.cli_flags (flags from settings)."""
    import ast

    import imm_ray.merge

    pkg = Path(imm_ray.merge.__file__).parent
    for path in sorted(pkg.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module not in PURE_IMPORTS:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not {"ray", "imm_ray"} & set(roots), f"{path.name}: imports {roots}"


def test_merge_cli_does_not_import_torch():
    """`imm merge` starts without torch (1.5 s and 220 MB of start-up on these machines)."""
    import subprocess
    import sys

    code = "import sys, imm_ray.merge.cli; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- full menu, blocks, selection

ALL_METHOD_PARAMS = {
    "linear": {"weights": [1.0, 2.0]},
    "task_arithmetic": {"lam": 0.7},
    "ties": {"density": 0.5},
    "dare_linear": {"drop_rate": 0.3},
    "dare_ties": {"drop_rate": 0.3},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
}


@pytest.mark.parametrize("method", sorted(ALL_METHOD_PARAMS))
def test_every_method_matches_its_formula_and_loads(ckpts, tmp_path, method):
    models = [ckpts["sft"], ckpts["sft2"]]
    params = ALL_METHOD_PARAMS[method]
    out = merge(method, ckpts["anchor"], models, tmp_path / "o", params=params, seed=3, progress=False)
    a, ms, got = load_all(ckpts["anchor"]), [load_all(m) for m in models], load_all(out)
    impl = get_merge_method(method)
    resolved = impl.validate(params, 2)
    for name in a:
        want = impl.merge_tensor(a[name].numpy().copy(), [m[name].numpy().copy() for m in ms], resolved,
                                 TensorRNG(3, name))
        torch.testing.assert_close(got[name], torch.from_numpy(want), rtol=1e-6, atol=1e-6, msg=f"{method}: {name}")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_slerp_merge_is_between_endpoints(ckpts, tmp_path):
    out = merge("slerp", ckpts["anchor"], [ckpts["sft"]], tmp_path / "s", params={"t": 0.0}, progress=False)
    got, a = load_all(out), load_all(ckpts["anchor"])
    assert got.keys() == a.keys() and all(torch.equal(got[k], a[k]) for k in a)
    out = merge("slerp", ckpts["anchor"], [ckpts["sft"]], tmp_path / "m", progress=False)
    a, s, got = load_all(ckpts["anchor"]), load_all(ckpts["sft"]), load_all(out)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[name], torch.from_numpy(slerp(0.5, a[name].numpy(), s[name].numpy())))


def test_blocks_and_threads_give_identical_bytes(ckpts, imm_default, tmp_path, monkeypatch):
    monkeypatch.setattr(merge_engine, "BLOCK_ELEMENTS", 1000)  # many blocks per tensor
    one = merge("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "t1", threads=1, progress=False)
    two = merge("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "t2", threads=2, progress=False)
    assert file_bytes(one) == file_bytes(two)
    assert (one / "model.safetensors").read_bytes() == (imm_default / "model.safetensors").read_bytes()


def test_include_exclude_copy_anchor(ckpts, tmp_path):
    out = merge("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "o", params={"drop_rate": 0.0},
                            exclude=[r"embed_tokens", r"norm\.weight$"], progress=False)
    a, s, got = load_all(ckpts["anchor"]), load_all(ckpts["sft"]), load_all(out)
    copied = [n for n in a if "embed_tokens" in n or n.endswith("norm.weight")]
    assert len(copied) >= 4
    for name in a:
        if name in copied:
            assert torch.equal(got[name], a[name])
        else:
            torch.testing.assert_close(got[name], 0.5 * (a[name] + s[name]), rtol=0, atol=1e-6)
    prov = json.loads((out / "merge_provenance.json").read_text())
    assert prov["selection"]["copied_from_anchor"] == len(copied)
    out = merge("task_arithmetic", ckpts["anchor"], [ckpts["sft"]], tmp_path / "i",
                            include=r"layers\.1\.", progress=False)
    got = load_all(out)
    for name in a:
        if ".layers.1." in name:
            torch.testing.assert_close(got[name], s[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(got[name], a[name])
    with pytest.raises(MergeError, match="exclude regex"):
        merge("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "bad", exclude="(", progress=False)


def test_lambda_gradient_over_depth(ckpts, tmp_path):
    out = merge("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "g",
                            params={"lam": [0.0, 1.0], "drop_rate": 0.0}, progress=False)
    a, s, got = load_all(ckpts["anchor"]), load_all(ckpts["sft"]), load_all(out)
    up = "mlp.up_proj.weight"
    assert torch.equal(got[f"model.layers.0.{up}"], a[f"model.layers.0.{up}"])  # 2 layers: depth 0 and 1
    torch.testing.assert_close(got[f"model.layers.1.{up}"], s[f"model.layers.1.{up}"])
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    with pytest.raises(MergeError, match="lam"):
        get_merge_method("imm").validate({"lam": [0.1, "x"]}, 1)


def test_yaml_config_cli(ckpts, imm_default, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        f"method: imm\nbase: {ckpts['anchor']}\nmodels:\n  - {ckpts['sft']}\n"
        f"params: {{lam: 0.5, drop_rate: 0.2}}\nseed: 0\nout: {tmp_path / 'y'}\n"
    )
    parser = argparse.ArgumentParser()
    add_merge_arguments(parser)
    assert run_merge_cli(parser.parse_args(["--config", str(cfg), "--no-progress"])) == 0
    assert (tmp_path / "y" / "model.safetensors").read_bytes() == (imm_default / "model.safetensors").read_bytes()
    # command-line options win over the file; --density maps to drop_rate = 1 - D for DARE methods
    args = parser.parse_args(["--config", str(cfg), "--method", "dare_linear", "--density", "1.0",
                              "--no-checksums", "--no-progress", "--out", str(tmp_path / "d")])
    cfg.write_text(cfg.read_text().replace("params: {lam: 0.5, drop_rate: 0.2}", "params: {weights: [0.5]}"))
    assert run_merge_cli(args) == 0
    prov = json.loads((tmp_path / "d" / "merge_provenance.json").read_text())
    assert prov["method"] == "dare_linear" and prov["params"]["drop_rate"] == 0.0 and prov["checksum"] is None
    with pytest.raises(MergeError, match="missing --base, --model, --out"):  # nothing to merge
        run_merge_cli(parser.parse_args(["--no-progress"]))


def test_merged_folder_gets_umask_permissions(ckpts, tmp_path):
    """Defect 15: the merged folder was created 0700 (mkdtemp), unreadable by a server under another user."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = merge("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "merged", params={"lam": 0.5},
                                seed=0)
    finally:
        os.umask(old)
    assert stat.S_IMODE(Path(out).stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in Path(out).iterdir())


def test_a_published_anchor_manifest_is_not_copied(ckpts, tmp_path):
    """An anchor materialized from object storage carries manifest.json: it describes the anchor."""
    import shutil

    anchor = tmp_path / "anchor"
    shutil.copytree(ckpts["anchor"], anchor)
    (anchor / "manifest.json").write_text('{"version": 1, "files": {}}')
    out = merge("imm", anchor, [ckpts["sft"]], tmp_path / "merged", params={"lam": 0.5}, seed=0)
    assert not (Path(out) / "manifest.json").exists()
    provenance = json.loads((Path(out) / "merge_provenance.json").read_text())
    assert "manifest.json" not in provenance["output"]["copied_files"]


def test_merge_options_name_the_bad_key():
    """The one options model (engine, ``imm merge`` and the run config's recipe) reports bad input as MergeError."""
    with pytest.raises(MergeError, match=r"^threads: .*greater than or equal to 1"):
        merge_options({"threads": 0})
    with pytest.raises(MergeError, match=r"^method: unknown merge method 'tie' \(did you mean 'ties'\?\)"):
        merge_options({"method": "tie"})
    assert merge_options({"include": r"layers\.1\."}).include == [r"layers\.1\."]
