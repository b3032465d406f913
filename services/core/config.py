"""The one typed configuration of a run, shared by every service and the trainer.

Sources, lowest precedence first: field defaults < YAML file < environment (`RPO_<SECTION>__<FIELD>`, plus
`RPO_API_TOKEN`) < CLI overrides (`--set section.field=value`). Unknown keys and bad values are rejected
with the dotted key, and for keys that came from the YAML file, the file and line. Validators check; they
never rewrite a value. `docs/configuration.md` lists every field with its default and the paper's value.

Importable without torch or vLLM.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    Field,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from services.core.config_deployment import (  # noqa: F401 - the sections are reached through this module
    CacheServerSection,
    GpusSection,
    RolloutSection,
    ServicesSection,
)
from services.core.config_inputs import DataSection, ModelSection, RewardSection  # noqa: F401 - as above
from services.core.config_training import (  # noqa: F401 - as above
    AlgorithmSection,
    LoraSection,
    SamplingSection,
    TrainSection,
)
from services.core.trl_names import suggestion


class ConfigError(ValueError):
    """A configuration problem, phrased for a person: names the key, and the file and line when known."""


def fresh_run_id() -> str:
    """A run id no other run has: the start time and 4 random hex digits."""
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


ENV_PREFIX = "RPO_"
log = logging.getLogger("rpo.config")
REFERENCE_REWARDS = ("math", "exact", "auto")
"""The built-in reward functions that compare a response with the reference answer."""

_yaml_data: ContextVar[dict[str, Any] | None] = ContextVar("_yaml_data", default=None)


class _EnvSource(EnvSettingsSource):
    """`RPO_<SECTION>__<FIELD>` variables, whose values read as `--set` values do: YAML (JSON is YAML), so
    `RPO_SERVICES__ROLLOUT_URLS=http://a:8200,http://b:8200` works as on the command line; pydantic-settings
    alone wants JSON for a list and fails with a traceback on anything else."""

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value


class _YamlSource(PydanticBaseSettingsSource):
    """Feeds the parsed YAML file (held in a ContextVar by `load_config`) below the environment."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_data.get() or {})


class RunConfig(BaseSettings):
    """Everything a run needs. Sections mirror the processes that read them."""

    model_config = SettingsConfigDict(
        extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter="__", validate_assignment=True
    )

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    algorithm: AlgorithmSection = Field(default_factory=AlgorithmSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    train: TrainSection = Field(default_factory=TrainSection)
    services: ServicesSection = Field(default_factory=ServicesSection)
    cache_server: CacheServerSection = Field(default_factory=CacheServerSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    gpus: GpusSection = Field(default_factory=GpusSection)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, _EnvSource(settings_cls), _YamlSource(settings_cls))

    @model_validator(mode="before")
    @classmethod
    def _api_token_from_env(cls, data: Any) -> Any:
        """RPO_API_TOKEN is the documented name of the token; it fills services.api_token when unset."""
        token = os.environ.get("RPO_API_TOKEN")
        if not token or not isinstance(data, Mapping):
            return data
        services = data.get("services") or {}
        if isinstance(services, Mapping) and "api_token" not in services:
            return {**data, "services": {**services, "api_token": token}}
        return data

    @model_validator(mode="after")
    def _prompt_only_needs_no_reference(self) -> RunConfig:
        """A prompt-only dataset (`data.answer_field: null`) only with reward functions that need no reference."""
        if self.data.answer_field is None:
            needing = [t.label() for t in self.reward.reward_terms() if t.function in REFERENCE_REWARDS]
            if needing:
                raise ValueError(
                    f"data.answer_field is null (a prompt-only dataset), but the reward function(s) "
                    f"{', '.join(needing)} compare against a reference; name the answer column, or use "
                    "reward.functions that need none"
                )
        return self

    @model_validator(mode="after")
    def _greedy_rollouts_have_no_importance_weight(self) -> RunConfig:
        """Lagged samples weighted by pi_old / pi_behaviour need pi_old at the sampling temperature; at T = 0
        that divides the logits by zero (and vLLM's greedy log-probs are untempered), so refuse the pair."""
        lagged = self.train.max_lag > 0 and self.algorithm.off_policy_correction == "tis"
        if lagged and self.sampling.temperature == 0:
            raise ValueError(
                "sampling.temperature is 0 (greedy rollouts) with train.max_lag > 0 and "
                "algorithm.off_policy_correction: tis: the importance weight needs the learner's log-probs at "
                "the sampling temperature, which is undefined at 0; sample at T > 0, set train.max_lag: 0, or "
                "algorithm.off_policy_correction: none"
            )
        return self

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data with secrets masked, for run directories and logs."""
        return self.model_dump(mode="json")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. algorithm.group_size=4")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def _set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def _yaml_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each dotted key path of a YAML mapping document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (str(key_node.value),)
                lines[prefix + key] = key_node.start_mark.line + 1
                walk(value_node, prefix + key)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _env_sources() -> dict[tuple[str, ...], str]:
    """The settings the environment sets (`RPO_<SECTION>__<FIELD>`), by key path. A variable that reads as a
    setting with one underscore for the two (`RPO_TRAIN_LR`) is ignored by the settings: it is warned about,
    with the right spelling."""
    sources = {}
    for name in os.environ:
        if name.startswith(ENV_PREFIX) and "__" in name:
            path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
            sources[path] = f"environment variable {name}"
        elif name.startswith(ENV_PREFIX) and (right := _misspelt_env(name)):
            log.warning("environment variable %s is not read (one underscore); did you mean %s?", name, right)
    return sources


def _misspelt_env(name: str) -> str | None:
    """`RPO_<SECTION>__<FIELD>` for a variable spelt `RPO_<SECTION>_<FIELD>` (None: not such a variable)."""
    rest = name[len(ENV_PREFIX) :].lower()
    for section, field in RunConfig.model_fields.items():
        if rest.startswith(section + "_") and rest[len(section) + 1 :] in field.annotation.model_fields:
            return f"{ENV_PREFIX}{section.upper()}__{rest[len(section) + 1 :].upper()}"
    return None


def _format_errors(
    err: ValidationError,
    origin: str | None,
    key_lines: dict[tuple[str, ...], int],
    sources: dict[tuple[str, ...], str],
) -> str:
    """One line per bad key, naming where its value came from: the `--set` item, the environment variable,
    or the YAML file and line (in that order of precedence, the order the values override each other)."""
    by_key: dict[str, list[str]] = {}
    for e in err.errors():
        loc = tuple(
            str(p)
            for p in e["loc"]  # pydantic's union tags (`int`, `literal[...]`, `function-after[...]`) left out
            if str(p) != "int" and not str(p).startswith(("literal[", "function-", "constrained-"))
        )
        key = ".".join(loc) or "(root)"
        where = ""
        for n in range(len(loc), 0, -1):
            if loc[:n] in sources:
                where = f"{sources[loc[:n]]}: "
                break
            if origin is not None and loc[:n] in key_lines:
                where = f"{origin}, line {key_lines[loc[:n]]}: "
                break
        if not where and loc:  # an unknown section: the item that set something below it
            below = [s for path, s in sources.items() if path[: len(loc)] == loc]
            where = f"{below[0]}: " if below else ""
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            hint = suggestion(loc[-1]) if loc else None
            msg = "unknown key" + (f" ({hint})" if hint else "")
        got = e.get("input")
        detail = f"; got {got!r}" if e["type"] != "extra_forbidden" and not isinstance(got, dict) else ""
        # A union (int | literal) reports once per branch: one line per key, branches joined with "or".
        by_key.setdefault(f"{where}{key}", []).append(f"{msg}{detail}")
    lines = [f"{key}: {' -- or -- '.join(dict.fromkeys(msgs))}" for key, msgs in by_key.items()]
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run configuration: defaults < YAML `path` < environment < `overrides` ("a.b=value")."""
    text, origin, data = "", None, {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text, origin = p.read_text(encoding="utf-8"), str(p)
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{p}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    cli: dict[str, Any] = {}
    sources = _env_sources()
    for path, source in sources.items():  # pydantic-settings ignores a variable whose section does not exist
        if path[0] not in RunConfig.model_fields:
            raise ConfigError(
                f"{source}: no section {path[0]!r} (sections: {', '.join(RunConfig.model_fields)}); "
                f"the form is {ENV_PREFIX}<SECTION>__<FIELD>"
            )
    for item in overrides:
        key_path, value = _parse_override(item)
        _set_path(cli, key_path, value)
        sources[tuple(key_path)] = f"--set {item}"
    token = _yaml_data.set(data)
    try:
        return RunConfig(**cli)
    except ValidationError as err:
        key_lines = _yaml_key_lines(text) if text else {}
        raise ConfigError(_format_errors(err, origin, key_lines, sources)) from None
    finally:
        _yaml_data.reset(token)
