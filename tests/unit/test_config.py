"""Config tree: defaults, presets, YAML files, overrides and their errors."""

from pathlib import Path

import pytest
import yaml

from imm_ray.config import (
    ConfigError,
    apply_override,
    config_differences,
    config_from_dict,
    config_to_yaml,
    load_config,
    load_run_config,
)

REPO = Path(__file__).resolve().parents[2]


def test_defaults_match_the_paper_merge():
    cfg = load_config()
    assert cfg.merge.method == "imm"
    assert cfg.merge.params == {"lam": 0.5, "drop_rate": 0.2}
    assert cfg.data.eval[0].name == "gsm8k"


def test_paper_preset_applies_under_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: paper\ntrain: {epochs: 1}\n")
    cfg = load_config(f)
    assert cfg.train.lr == 2e-5 and cfg.train.warmup_ratio == 0.03 and cfg.train.effective_batch_size == 64
    assert cfg.train.epochs == 1  # the file wins over the preset
    assert cfg.run.arms == ["imm", "si"]
    assert cfg.data.prompt_template == "alpaca"


def test_overrides_parse_yaml_values_and_index_lists(tmp_path):
    cfg = load_config(REPO / "jobs/configs/demo.yaml", ["run.rounds=5", "data.eval.1.limit=7", "run.arms=[imm, si]"])
    assert cfg.run.rounds == 5
    assert cfg.data.eval[1].limit == 7
    assert cfg.run.arms == ["imm", "si"]


@pytest.mark.parametrize("override", ["run.rounds", "data.eval.9.limit=1", "=3"])
def test_bad_override_says_what_is_wrong(override):
    with pytest.raises(ConfigError):
        load_config(REPO / "jobs/configs/demo.yaml", [override])


def test_unknown_key_and_bad_value_name_the_key():
    with pytest.raises(ConfigError, match="run.roundz"):
        load_config(None, ["run.roundz=3"])
    with pytest.raises(ConfigError, match="run.rounds"):
        load_config(None, ["run.rounds=0"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(None, preset="nope")
    with pytest.raises(ConfigError, match=r"unknown preset 'papr' \(did you mean 'paper'\?\); choose from cpu-small"):
        load_config(None, preset="papr")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_demo_config_is_what_the_issue_asks():
    cfg = load_config(REPO / "jobs/configs/demo.yaml")
    assert cfg.model.ref == "embedded:smollm2-135m-instruct"
    assert cfg.generate.engine.name == "vllm"
    assert cfg.data.train.limit == 128 and cfg.generate.samples_per_question == 4
    assert [(d.name, d.limit) for d in cfg.data.eval] == [("gsm8k", 100), ("svamp", 100), ("syn-mul-div", 100)]
    assert cfg.run.rounds == 2 and cfg.run.arms == ["imm"]


def test_config_differences_lists_dotted_keys():
    tree = {"a": {"b": 1, "c": [1]}, "d": 2}
    other = {"a": {"b": 2, "c": [1]}, "d": 2, "e": 1}
    assert config_differences(tree, other) == ["a.b", "e"]
    apply_override(tree, "a.b=2")
    assert tree["a"]["b"] == 2


@pytest.mark.parametrize(
    "override, key, choice",
    [
        ("merge.method=nope", "merge.method", "dare_ties"),
        ("merge.method=nope", "merge.method", "imm"),
        ("merge.params.drop_rate=1.5", "merge.params", "[0, 1)"),
        ("merge.params.dropp_rate=0.1", "merge.params", "drop_rate"),
        ("merge.params.lam=[]", "merge.params", "lam"),
        ("verify.verifier=nope", "verify.verifier", "math"),
        ("evaluate.verifier=nope", "evaluate.verifier", "auto"),
        ("generate.engine.name=nope", "generate.engine.name", "vllm"),
        ("data.prompt_template=nope", "data.prompt_template", "alpaca"),
        ("run.arms=[imm, nope]", "run.arms", "rest"),
    ],
)
def test_registry_names_and_merge_params_fail_at_load_time(override, key, choice):
    with pytest.raises(ConfigError) as exc:
        load_config(REPO / "jobs/configs/demo.yaml", [override])
    message = str(exc.value)
    assert key in message and choice in message, message
    assert "\n" not in message  # one line, for the CLI


def test_evaluation_samples_need_a_temperature():
    cfg = load_config(None, ["evaluate.samples=4", "evaluate.temperature=0.8"])
    assert (cfg.evaluate.samples, cfg.evaluate.temperature) == (4, 0.8)
    with pytest.raises(ConfigError, match=r"evaluate: samples > 1 needs temperature > 0"):
        load_config(None, ["evaluate.samples=4"])


def test_merge_params_are_checked_against_the_chosen_method():
    cfg = load_config(None, ["merge.method=ties", "merge.params={density: 0.3, lam: 1.0}"])
    assert cfg.merge.params == {"density": 0.3, "lam": 1.0}  # kept as written (run.yaml compares them)
    with pytest.raises(ConfigError, match="drop_rate"):  # ties has no drop rate
        load_config(None, ["merge.method=ties"])  # the default params are the imm method's


def test_unknown_key_suggests_the_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"run\.roundz.*did you mean run\.rounds"):
        load_config(None, ["run.roundz=3"])
    with pytest.raises(ConfigError, match=r"data\.eval\.0\.limt.*did you mean data\.eval\.0\.limit"):
        load_config(REPO / "jobs/configs/demo.yaml", ["data.eval.0.limt=3"])
    with pytest.raises(ConfigError, match=r"genrate.*did you mean generate"):
        load_config(None, ["genrate.seed=3"])


def test_registry_lookup_suggests_the_nearest_name_and_is_a_user_error():
    from imm_ray.data.prompts import get_prompt_template
    from imm_ray.errors import UserError

    with pytest.raises(KeyError) as err:
        get_prompt_template("alpacca")
    assert isinstance(err.value, UserError)
    assert str(err.value) == "unknown prompt template 'alpacca' (did you mean 'alpaca'?); choose from alpaca, chat"


@pytest.mark.parametrize("override, key", [
    ("data.train.preset=gsm8kk", "data.train"),
    ("data.eval.1.preset=svampp", "data.eval"),
])
def test_unknown_dataset_presets_fail_at_load_time(override, key):
    with pytest.raises(ConfigError, match=rf"{key}.*unknown dataset preset .*did you mean"):
        load_config(REPO / "jobs/configs/demo.yaml", [override])


def test_removed_chunk_size_still_loads_with_a_deprecation_warning(tmp_path, caplog):
    """Run directories made before streaming saved generate.chunk_size in run.yaml; they still load and resume."""
    from imm_ray.loop.driver import RoundDriver
    from imm_ray.run import RunDir

    old = yaml.safe_load(config_to_yaml(load_config()))
    old["generate"]["chunk_size"] = 32
    with caplog.at_level("WARNING", logger="imm_ray.config"):
        cfg = config_from_dict(old)
    assert "generate.chunk_size is deprecated and ignored" in caplog.text
    assert "chunk_size" not in config_to_yaml(cfg)
    with pytest.raises(ConfigError, match="generate.chunk_sise: unknown key"):  # only the removed key is dropped
        config_from_dict({"generate": {"chunk_sise": 32}})

    rd = RunDir(tmp_path)
    rd.write_config(yaml.safe_dump(old, sort_keys=False))
    rd.mark_done("imm/round-001/generate", 1.0, {})
    RoundDriver(cfg, tmp_path)._save_config()  # a resume of the old run is not refused over the removed key
    assert load_run_config(tmp_path) == cfg and "chunk_size" not in rd.read_config_text()


@pytest.mark.parametrize("override, key", [
    ("generate.entropy_stride=0", "generate.entropy_stride"),
    ("ray.placement_log_s=0", "ray.placement_log_s"),
    ("ray.placement_timeout_s=-5", "ray.placement_timeout_s"),
])
def test_entropy_stride_and_placement_waits_are_validated(override, key):
    with pytest.raises(ConfigError, match=rf"{key}: Input should be greater than"):
        load_config(None, [override])


def test_entropy_stride_and_placement_waits_may_change_on_resume(tmp_path):
    from imm_ray.loop.driver import RoundDriver
    from imm_ray.run import RunDir

    RoundDriver(load_config(), tmp_path)._save_config()
    RunDir(tmp_path).mark_done("imm/round-001/generate", 1.0, {})
    changed = ["generate.entropy_stride=1", "generate.entropy_top_k=5", "ray.placement_log_s=5",
               "ray.placement_timeout_s=600"]
    RoundDriver(load_config(None, changed), tmp_path)._save_config()
    cfg = load_run_config(tmp_path)
    assert (cfg.generate.entropy_stride, cfg.ray.placement_log_s, cfg.ray.placement_timeout_s) == (1, 5, 600)
    with pytest.raises(ConfigError, match="generate.temperature differs"):  # a key generate used stays pinned
        RoundDriver(load_config(None, [*changed, "generate.temperature=0.1"]), tmp_path)._save_config()


def test_driver_hands_entropy_stride_and_placement_waits_to_the_generator_pool(
        tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    """What the round's generate stage asks of the pool (a fake one: tests/integration/test_loop.py runs it)."""
    from transformers import AutoTokenizer

    from imm_ray.generate.actors import GenerationStats
    from imm_ray.generate.engine import Completion
    from imm_ray.loop.driver import RoundDriver, RoundStep
    from imm_ray.storage import Location

    cfg = load_config(None, [f"data.dir={tiny_data_dir}", "data.train={name: t, preset: gsm8k, split: train}",
                             "generate.entropy_stride=3", "ray.placement_log_s=7", "ray.placement_timeout_s=90"])
    driver = RoundDriver(cfg, tmp_path / "run")
    spec = driver.pool().spec
    assert (spec.placement_log_s, spec.placement_timeout_s) == (7, 90)

    seen = []

    class Pool:
        last_stats = GenerationStats(prompts=0, completions=0, tokens=0, seconds=1.0, retries=0)

        def generate(self, prompts, sampling, desc):
            seen.append(sampling)
            return [[Completion("42", "stop", 1)] * sampling.n for _ in prompts]

    driver.tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(driver, "_load", lambda role, model, owner: Pool())
    driver._generate(RoundStep(key="imm/round_1/generate", t=1, plan=None, rdir=Location(str(tmp_path)),
                               current=str(tiny_model_dir), owner=None))
    assert seen[0].entropy_stride == 3 and seen[0].entropy_top_k == cfg.generate.entropy_top_k
