"""Settings: AMIFORGE_* environment variables over an optional amiforge.toml over defaults.

The data dir (default: $XDG_DATA_HOME/amiforge, i.e. ~/.local/share/amiforge) holds the registry (SQLite),
the layer cache and the local image store. AMIFORGE_STORE_URL points the registry elsewhere, e.g. PostgreSQL.
"""

from __future__ import annotations

import getpass
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from amiforge.errors import ConfigError, Problem


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "amiforge"


def _config_file() -> Path:
    return Path(os.environ.get("AMIFORGE_CONFIG", "amiforge.toml"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AMIFORGE_", extra="forbid")

    data_dir: Path = Field(default_factory=_default_data_dir, description="registry, cache and image store")
    store_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite in the data dir")
    region: str = Field(default="local", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="local region")
    accel: Literal["auto", "tcg", "kvm"] = "auto"
    mirror: str = "http://deb.debian.org/debian"
    security_mirror: str = "http://deb.debian.org/debian-security"
    guest_memory_mb: int = Field(default=512, ge=256, le=16384)
    guest_cpus: int = Field(default=2, ge=1, le=16)
    actor: str = Field(default_factory=lambda: f"{getpass.getuser()}@{socket.gethostname()}")
    policy: Path | None = Field(default=None, description="promotion policy YAML; default: the built-in policy")
    signing_key: Path | None = Field(default=None, description="Ed25519 key file; default: <data>/keys/amiforge.key")
    kms_key: str | None = Field(default=None, description="sign with this AWS KMS ECC_NIST_P256 key (id, ARN or alias)")
    kms_region: str | None = Field(default=None, description="the KMS key's region (required with kms_key)")
    aws_profile: str | None = Field(default=None, description="AWS profile; default: the standard credential chain")
    aws_max_attempts: int = Field(
        default=8, ge=1, le=20, description="attempts per AWS call (botocore standard retry mode, with jitter)"
    )
    aws_roles: dict[str, str] = Field(
        default_factory=dict,
        description="account id -> IAM role ARN to assume there (multi-account distribution); JSON in the environment",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=_config_file()))

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def regions_dir(self) -> Path:
        return self.data_dir / "regions"

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key or self.data_dir / "keys" / "amiforge.key"

    @property
    def registry_url(self) -> str:
        return self.store_url or f"sqlite:///{self.data_dir / 'registry.db'}"


def load_settings() -> Settings:
    """Settings, or a ConfigError naming the variable or file key that is wrong."""
    try:
        return Settings()
    except ValidationError as e:
        problems = [
            Problem(
                message=err["msg"],
                file=str(_config_file()) if _config_file().is_file() else "environment",
                field=".".join(str(p) for p in err["loc"]),
                fix=f"set AMIFORGE_{str(err['loc'][0]).upper()} or the key in amiforge.toml to a valid value",
            )
            for err in e.errors()
        ]
        raise ConfigError("invalid amiforge settings", problems=problems) from e
    except (OSError, ValueError) as e:  # unreadable or malformed amiforge.toml
        raise ConfigError(
            f"cannot read settings file {_config_file()}: {e}", fix="fix the TOML syntax or remove the file"
        ) from e
