"""Kshipra's one typed configuration: TOML file + ``KSHIPRA_*`` environment variables."""

from cdn_config.load import SAMPLE_CONFIG, ConfigError, load_config
from cdn_config.model import (
    CacheRule,
    EdgeConfig,
    JobConcurrency,
    KshipraConfig,
    MediaConfig,
    OriginConfig,
    RedisConfig,
    Secrets,
    TranscodeConfig,
    UploadLimits,
    parse_byte_size,
    parse_listen,
)

__all__ = [
    "SAMPLE_CONFIG",
    "CacheRule",
    "ConfigError",
    "EdgeConfig",
    "JobConcurrency",
    "KshipraConfig",
    "MediaConfig",
    "OriginConfig",
    "RedisConfig",
    "Secrets",
    "TranscodeConfig",
    "UploadLimits",
    "load_config",
    "parse_byte_size",
    "parse_listen",
]
