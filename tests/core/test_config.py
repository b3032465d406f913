"""The run configuration: defaults are the paper's, precedence is file < env < CLI, errors name the key."""

from pathlib import Path

import pytest

from services.core.config import ConfigError, RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_papers_values():
    cfg = RunConfig()
    a = cfg.algorithm
    assert (a.group_size, a.truncation_limit, a.suffix_budget, a.alpha) == (6, 300, "m", 0.01)
    assert (a.clip_eps, a.clip_eps_low, a.clip_eps_high, a.beta, a.epsilon) == (0.2, 0.2, 0.28, 0.04, 0.5)
    assert (a.shaping_low, a.shaping_high, a.max_response_tokens) == (0.5, 1.0, 4096)
    assert (cfg.sampling.temperature, cfg.sampling.init_temperature, cfg.sampling.init_max_tokens) == (
        0.7,
        0.9,
        2048,
    )
    assert cfg.train.lr == 1e-6 and cfg.train.zero_stage == 2


def test_yaml_then_env_then_cli(tmp_path, monkeypatch):
    path = write(tmp_path, "algorithm:\n  group_size: 4\n  epsilon: 0.2\n  truncation_limit: 0.5l\n")
    assert load_config(path).algorithm.group_size == 4
    monkeypatch.setenv("RPO_ALGORITHM__GROUP_SIZE", "5")
    cfg = load_config(path)
    assert cfg.algorithm.group_size == 5 and cfg.algorithm.epsilon == 0.2  # env beats file, rest of file kept
    cfg = load_config(path, ["algorithm.group_size=3", "algorithm.suffix_budget=64"])
    assert cfg.algorithm.group_size == 3 and cfg.algorithm.suffix_budget == 64
    assert cfg.algorithm.truncation_limit == "0.5l"


def test_api_token_from_its_documented_variable(monkeypatch):
    monkeypatch.setenv("RPO_API_TOKEN", "s3cret")
    cfg = load_config()
    assert cfg.services.api_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.public_dict())


def test_unknown_key_names_key_file_and_line(tmp_path):
    path = write(tmp_path, "algorithm:\n  group_size: 4\n\ntrain:\n  lr: 0.001\n  learning_rate: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}, line 6: train.learning_rate: unknown key" in str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("algorithm.epsilon=1.5", "algorithm.epsilon"),
        ("algorithm.group_size=0", "algorithm.group_size"),
        ("algorithm.truncation_limit=-3", "algorithm.truncation_limit"),
        ("algorithm.truncation_limit=1.5l", "algorithm.truncation_limit"),
        ("algorithm.suffix_budget=0", "algorithm.suffix_budget"),
        ("algorithm.algorithm=ppo", "algorithm.algorithm"),
        ("train.lr=-1", "train.lr"),
        ("nope.x=1", "nope"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"  --set {override}: {key}:" in str(err.value)  # the key, and the --set it came from


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "algorithm:\n  group_size: [4\n")
    with pytest.raises(ConfigError, match=r"run.yaml, line \d+: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["algorithm.group_size"])


def test_every_shipped_config_file_parses():
    files = sorted(REPO.glob("configs/*.yaml")) + sorted(REPO.glob("*/presets/*.yaml"))
    assert files, "the repo ships example configs"
    for path in files:
        load_config(path)


def test_every_setting_is_documented_and_the_docs_are_current():
    from services.cli.config_docs import render

    undocumented = [
        f"{section}.{name}"
        for section, field in RunConfig.model_fields.items()
        for name, sub in field.annotation.model_fields.items()
        if not sub.description
    ]
    assert undocumented == []
    assert (REPO / "docs" / "configuration.md").read_text() == render(), (
        "docs/configuration.md is stale: python -m services.cli.config_docs > docs/configuration.md"
    )


def test_dapo_gets_the_overlong_penalty_by_default_and_grpo_none():
    dapo = load_config(None, ["algorithm.algorithm=dapo", "algorithm.max_response_tokens=4096"])
    assert dapo.algorithm.overlong_buffer_tokens is None and dapo.algorithm.overlong_buffer() == 512
    off = load_config(None, ["algorithm.algorithm=dapo", "algorithm.overlong_buffer_tokens=0"])
    assert off.algorithm.overlong_buffer() == 0
    grpo = load_config(None, ["algorithm.overlong_buffer_tokens=256"])
    assert grpo.algorithm.overlong_buffer() == 0
    assert load_config(None, ["algorithm.algorithm=dapo"]).algorithm.dynamic_sampling_filter == "correctness"
    with pytest.raises(ConfigError, match="dynamic_sampling_filter"):
        load_config(None, ["algorithm.dynamic_sampling_filter=length"])


def test_paper_configs_are_the_paper_runs():
    """Accuracy runs (Table 1) at L = 0.5l, the timing run (Table 3) at L = 800, DAPO with clip-higher able
    to act (more than one update per batch), the overlong penalty on and the shaped-reward filter."""
    configs = Path(__file__).resolve().parents[2] / "configs"
    loaded = {p.name: load_config(p) for p in configs.glob("paper-*.yaml")}
    assert loaded["paper-grpo-1.5b.yaml"].algorithm.truncation_limit == "0.5l"
    assert loaded["paper-dapo-1.5b.yaml"].algorithm.truncation_limit == "0.5l"
    assert loaded["paper-grpo-timing-1.5b.yaml"].algorithm.truncation_limit == 800
    assert loaded["paper-grpo-full-1.5b.yaml"].algorithm.mode == "full"
    dapo = loaded["paper-dapo-1.5b.yaml"]
    assert dapo.train.updates_per_batch > 1 and dapo.algorithm.overlong_buffer() > 0
    assert dapo.algorithm.dynamic_sampling_filter == "reward"


@pytest.mark.parametrize(
    "value",
    ["http://a:8200", "http://a:8200,http://b:8200", " http://a:8200 , http://b:8200 ", '["http://a:8200"]'],
)
def test_a_list_setting_takes_the_same_forms_in_the_environment_and_on_the_command_line(monkeypatch, value):
    expected = [u.strip() for u in value.strip("[]").replace('"', "").split(",")]
    monkeypatch.setenv("RPO_SERVICES__ROLLOUT_URLS", value)
    assert load_config(None).services.rollout_urls == expected
    monkeypatch.delenv("RPO_SERVICES__ROLLOUT_URLS")
    assert load_config(None, [f"services.rollout_urls={value}"]).services.rollout_urls == expected


def test_a_typo_in_a_sections_name_is_refused_like_one_in_a_fields(monkeypatch):
    monkeypatch.setenv("RPO_ALGORITM__GROUP_SIZE", "4")
    with pytest.raises(
        ConfigError, match=r"RPO_ALGORITM__GROUP_SIZE: no section 'algoritm' \(sections: model"
    ):
        load_config(None)
    monkeypatch.delenv("RPO_ALGORITM__GROUP_SIZE")
    monkeypatch.setenv("RPO_ALGORITHM__GROUP_SIZ", "4")
    with pytest.raises(ConfigError, match="RPO_ALGORITHM__GROUP_SIZ"):
        load_config(None)


def test_a_group_of_one_is_refused_since_every_advantage_would_be_zero():
    with pytest.raises(
        ConfigError, match=r"algorithm.group_size: Input should be greater than or equal to 2"
    ):
        load_config(None, ["algorithm.group_size=1"])
    assert load_config(None, ["algorithm.group_size=2"]).algorithm.group_size == 2


def test_a_config_left_at_its_defaults_sends_the_requests_own_defaults():
    """Each rollout default is written once, on the wire (RolloutSettings): the training request made from a
    default config carries the wire's default for every field except those the config owns."""
    from services.core.clients.replica_set import RolloutPlans
    from services.core.schemas.rollout import RolloutSettings

    sent = RolloutPlans.from_config(load_config(None, [])).training
    owned_by_the_config = {"run_id", "dataset", "seed"}  # the run's namespace, its data, each step's seed
    for name, field in RolloutSettings.model_fields.items():
        if name not in owned_by_the_config:
            default = field.default_factory() if field.default_factory else field.default
            assert getattr(sent, name) == default, name


def test_greedy_rollouts_one_step_ahead_with_importance_weights_are_refused():
    """The importance weight of a lagged sample needs the learner's log-probs at the sampling temperature;
    at T = 0 they are undefined, so the pair is refused naming every field, and each way out is accepted."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sampling.temperature=0", "train.max_lag=1"])
    for field in ("sampling.temperature", "train.max_lag", "algorithm.off_policy_correction"):
        assert field in str(err.value)
    for way_out in ("train.max_lag=0", "algorithm.off_policy_correction=none", "sampling.temperature=0.7"):
        load_config(None, ["sampling.temperature=0", "train.max_lag=1", way_out])  # the last override wins
