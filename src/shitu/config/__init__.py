"""Typed, validated configuration in the PaddleClas YAML shape, with `-o key=value` overrides."""

from shitu.config.loader import load_config, resolve_config_path, shipped_configs
from shitu.config.overrides import apply_overrides, parse_override
from shitu.config.schema import ArchConfig, ComponentConfig, GlobalConfig, ShituConfig

__all__ = [
    "ArchConfig",
    "ComponentConfig",
    "GlobalConfig",
    "ShituConfig",
    "apply_overrides",
    "load_config",
    "parse_override",
    "resolve_config_path",
    "shipped_configs",
]
