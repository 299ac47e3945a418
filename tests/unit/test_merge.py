"""Unit tests of imm_ray.merge (pure torch/safetensors; no Ray)."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from imm_ray.merge import (
    MERGE_METHODS,
    MergeError,
    MergeMethod,
    dare_drop,
    merge_checkpoints,
    register_merge_method,
    task_vector_merge,
    weighted_average,
)
from imm_ray.merge.cli import add_merge_arguments, run_merge_cli
from imm_ray.merge.methods import get_merge_method
from imm_ray.merge.safetensors_io import CheckpointReader, StreamingSafetensorsWriter, TensorInfo

transformers = pytest.importorskip("transformers")

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
    with CheckpointReader(folder) as reader:
        return {n: reader.get(n).clone() for n in reader.names()}


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
    return merge_checkpoints("imm", ckpts["anchor"], [ckpts["sft"]],
                             tmp_path_factory.mktemp("imm") / "out", progress=False)


# ----------------------------------------------------------------------------- pure tensor functions

def test_dare_p0_is_identity_and_draws_nothing():
    delta = torch.randn(100)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert dare_drop(delta, 0.0, gen) is delta
    assert torch.equal(gen.get_state(), state)


def test_dare_drop_fraction_and_exact_rescale():
    p = 0.2
    delta = torch.randn(1_000_000, generator=torch.Generator().manual_seed(123))
    assert bool((delta != 0).all())
    out = dare_drop(delta, p, torch.Generator().manual_seed(0), "exact")
    dropped = out == 0
    assert abs(dropped.float().mean().item() - p) < 0.01
    kept = ~dropped
    assert torch.equal(out[kept], (delta / (1 - p))[kept])
    # and it is not the identity
    assert not torch.equal(out[kept], delta[kept])


def test_dare_seeding():
    delta = torch.randn(10_000)
    a = dare_drop(delta, 0.2, torch.Generator().manual_seed(0))
    b = dare_drop(delta, 0.2, torch.Generator().manual_seed(0))
    c = dare_drop(delta, 0.2, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_l1_and_none_rescale():
    delta = torch.randn(50_000)
    out_l1 = dare_drop(delta, 0.3, torch.Generator().manual_seed(0), "l1")
    torch.testing.assert_close(out_l1.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    out_none = dare_drop(delta, 0.3, torch.Generator().manual_seed(0), "none")
    kept = out_none != 0
    assert torch.equal(out_none[kept], delta[kept])
    out_exact = dare_drop(delta, 0.3, torch.Generator().manual_seed(0), "exact")
    assert torch.equal(out_exact != 0, kept)  # same mask for every rescale mode


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dare_rejects_bad_rate(p):
    with pytest.raises(MergeError, match="drop_rate"):
        dare_drop(torch.ones(4), p, None)


def test_dare_rejects_bad_rescale():
    with pytest.raises(MergeError, match="rescale"):
        dare_drop(torch.ones(4), 0.5, None, "l2")  # type: ignore[arg-type]


def test_method_formulas_on_tensors():
    g = torch.Generator().manual_seed(0)
    a, s1, s2 = (torch.randn(64, 32, generator=g) for _ in range(3))
    gen = torch.Generator().manual_seed(0)
    imm = get_merge_method("imm")
    out = imm.merge_tensor(a, [s1], imm.validate({"drop_rate": 0.0}, 1), gen)
    torch.testing.assert_close(out, 0.5 * (a + s1), rtol=0, atol=1e-6)
    ta = get_merge_method("task_arithmetic")
    out = ta.merge_tensor(a, [s1, s2], ta.validate({"lam": 0.3}, 2), gen)
    torch.testing.assert_close(out, a + 0.3 * ((s1 - a) + (s2 - a)), rtol=0, atol=1e-6)
    dl = get_merge_method("dare_linear")
    out = dl.merge_tensor(a, [s1, s2], dl.validate({"weights": [0.2, 0.7], "drop_rate": 0.0}, 2), gen)
    torch.testing.assert_close(out, a + 0.2 * (s1 - a) + 0.7 * (s2 - a), rtol=0, atol=1e-6)
    lin = get_merge_method("linear")
    out = lin.merge_tensor(None, [s1, s2], lin.validate({"weights": [1.0, 3.0]}, 2), gen)
    torch.testing.assert_close(out, 0.25 * s1 + 0.75 * s2, rtol=0, atol=1e-6)
    torch.testing.assert_close(weighted_average([s1, s2], [1.0, 1.0], normalize=False), s1 + s2)


def test_imm_with_dare_matches_core_formula():
    g = torch.Generator().manual_seed(5)
    a, s = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    expected = a + 0.5 * dare_drop(s - a, 0.2, torch.Generator().manual_seed(7))
    got = task_vector_merge(a, [s], [0.5], drop_rate=0.2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, expected)


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
        merge_checkpoints("ties_x", ckpts["anchor"], [ckpts["sft"]], out, progress=False)
    with pytest.raises(MergeError, match="'bogus'"):
        merge_checkpoints("imm", ckpts["anchor"], [ckpts["sft"]], out, params={"bogus": 1}, progress=False)
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
        out = merge_checkpoints("take_model_test", ckpts["anchor"], [ckpts["sft"]], tmp_path / "o", progress=False)
        ref = load_all(ckpts["sft"])
        got = load_all(out)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    finally:
        MERGE_METHODS.pop("take_model_test", None)


# ----------------------------------------------------------------------------- checkpoint merges

def test_imm_p0_is_plain_average(ckpts, tmp_path):
    out = merge_checkpoints("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "avg",
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
    assert prov["versions"]["torch"] == torch.__version__ and "safetensors" in prov["versions"]


def test_same_seed_identical_bytes_different_seed_differs(ckpts, imm_default, tmp_path):
    again = merge_checkpoints("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "again", progress=False)
    assert file_bytes(again) == file_bytes(imm_default)
    other = merge_checkpoints("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "seed1", seed=1, progress=False)
    assert (other / "model.safetensors").read_bytes() != (imm_default / "model.safetensors").read_bytes()


def test_sharded_input_merges_like_single_file(ckpts, imm_default, tmp_path):
    assert (ckpts["sft_sharded"] / "model.safetensors.index.json").is_file()
    out = merge_checkpoints("imm", ckpts["anchor"], [ckpts["sft_sharded"]], tmp_path / "o", progress=False)
    assert (out / "model.safetensors").read_bytes() == (imm_default / "model.safetensors").read_bytes()


def test_sharded_output(ckpts, imm_default, tmp_path):
    out = merge_checkpoints("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "o",
                            progress=False, max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    got, ref = load_all(out), load_all(imm_default)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_dtype_override_bf16(ckpts, tmp_path):
    out = merge_checkpoints("imm", ckpts["anchor"], [ckpts["sft"]], tmp_path / "o", dtype="bf16", progress=False)
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
    out = merge_checkpoints("imm", bf16, [ckpts["sft"]], tmp_path / "o", params={"drop_rate": 0.0}, progress=False)
    got, s = load_all(out), load_all(ckpts["sft"])
    for k, v in tensors.items():
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], (v.float() + 0.5 * (s[k] - v.float())).to(torch.bfloat16))


def test_linear_and_dare_linear_two_models(ckpts, tmp_path):
    s1, s2, a = load_all(ckpts["sft"]), load_all(ckpts["sft2"]), load_all(ckpts["anchor"])
    out = merge_checkpoints("linear", ckpts["anchor"], [ckpts["sft"], ckpts["sft2"]], tmp_path / "lin",
                            params={"weights": [1.0, 3.0]}, progress=False)
    got = load_all(out)
    for k in a:
        torch.testing.assert_close(got[k], 0.25 * s1[k] + 0.75 * s2[k], rtol=0, atol=1e-6)
    out = merge_checkpoints("dare_linear", ckpts["anchor"], [ckpts["sft"], ckpts["sft2"]], tmp_path / "dl",
                            params={"weights": [0.5, 0.5], "drop_rate": 0.0}, progress=False)
    got = load_all(out)
    for k in a:
        torch.testing.assert_close(got[k], a[k] + 0.5 * (s1[k] - a[k]) + 0.5 * (s2[k] - a[k]), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- safety

def test_shape_mismatch_raises_before_writing(ckpts, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(MergeError, match=r"mlp\.(down|gate|up)_proj\.weight.*\[128, 64\]|\[64, 128\]") as err:
        merge_checkpoints("imm", ckpts["anchor"], [ckpts["bad_shape"]], out, progress=False)
    assert "96" in str(err.value)
    assert leftovers(tmp_path, "o") == []


def test_vocab_mismatch_names_both_sizes(ckpts, tmp_path):
    with pytest.raises(MergeError, match="vocab") as err:
        merge_checkpoints("imm", ckpts["anchor"], [ckpts["bad_vocab"]], tmp_path / "o", progress=False)
    assert "256" in str(err.value) and "300" in str(err.value)
    assert leftovers(tmp_path, "o") == []


def test_tied_anchor_vs_untied_model(ckpts, tmp_path):
    with pytest.raises(MergeError, match="lm_head.weight"):
        merge_checkpoints("imm", ckpts["anchor"], [ckpts["untied"]], tmp_path / "o", progress=False)
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
        merge_checkpoints("imm", ckpts["anchor"], [bad], tmp_path / "o", progress=False)
    assert leftovers(tmp_path, "o") == []


def test_non_finite_result_publishes_nothing(ckpts, tmp_path):
    class Broken(MergeMethod):
        name = "broken_test"

        def merge_tensor(self, anchor, models, params, generator):
            out = anchor.clone()
            out.view(-1)[-1] = float("inf")
            return out

    register_merge_method(Broken)
    try:
        with pytest.raises(MergeError, match="NaN/Inf"):
            merge_checkpoints("broken_test", ckpts["anchor"], [ckpts["sft"]], tmp_path / "o", progress=False)
    finally:
        MERGE_METHODS.pop("broken_test", None)
    with pytest.raises(MergeError, match="overflow when casting to float16"):
        merge_checkpoints("task_arithmetic", ckpts["anchor"], [ckpts["sft"]], tmp_path / "o",
                          params={"lam": 1e7}, dtype="float16", progress=False)
    assert leftovers(tmp_path, "o") == []


def test_existing_out_dir_is_not_overwritten(ckpts, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="already exists"):
        merge_checkpoints("imm", ckpts["anchor"], [ckpts["sft"]], out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_weights_raise(tmp_path, ckpts):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MergeError, match="no model.safetensors"):
        merge_checkpoints("imm", ckpts["anchor"], [empty], tmp_path / "o", progress=False)


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
    infos = [TensorInfo(k, v.dtype, tuple(v.shape)) for k, v in sorted(tensors.items())]
    for size, expect_index in ((None, False), (300, True)):
        folder = tmp_path / str(size)
        folder.mkdir()
        writer = StreamingSafetensorsWriter(folder, infos, size)
        for info in infos:
            writer.write(info.name, tensors[info.name])
        hashes = writer.close()
        assert (folder / "model.safetensors.index.json").exists() == expect_index
        for fname, digest in hashes.items():
            assert hashlib.sha256((folder / fname).read_bytes()).hexdigest() == digest
            with safe_open(str(folder / fname), framework="pt") as fh:
                assert fh.metadata() == {"format": "pt"}
        back = load_all(folder)
        assert back.keys() == tensors.keys()
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_writer_rejects_out_of_plan_tensor(tmp_path):
    writer = StreamingSafetensorsWriter(tmp_path, [TensorInfo("x", torch.float32, (2,))])
    with pytest.raises(MergeError, match="expected 'x'"):
        writer.write("x", torch.zeros(3))


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
    assert run_merge_cli(args) == 2  # linear has no 'lam'
    assert not (tmp_path / "bad").exists()


def test_merge_package_does_not_import_ray():
    """The merge package is pure: it imports neither ray nor other imm_ray packages (which might)."""
    import ast

    import imm_ray.merge

    pkg = Path(imm_ray.merge.__file__).parent
    for path in sorted(pkg.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not {"ray", "imm_ray"} & set(roots), f"{path.name}: imports {roots}"
