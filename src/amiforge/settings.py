"""Settings: AMIFORGE_* environment variables over an optional amiforge.toml over defaults.

The data dir (default: $XDG_DATA_HOME/amiforge, i.e. ~/.local/share/amiforge) holds the registry (SQLite),
the layer cache and the local image store. AMIFORGE_STORE_URL points the registry elsewhere, e.g. PostgreSQL.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from amiforge.errors import ConfigError, Problem
from amiforge.model import AWS_REGION_PATTERN


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "amiforge"


CONFIG_ENV = "AMIFORGE_CONFIG"


def _config_file() -> Path:
    return Path(os.environ.get(CONFIG_ENV, "amiforge.toml"))


def _check_config_file() -> None:
    """AMIFORGE_CONFIG must name a readable regular file; an amiforge.toml in the working directory is optional, but
    one that is there must be a file. A missing or odd config file is an error, never silently ignored."""
    path = _config_file()
    named = CONFIG_ENV in os.environ
    if named and not os.environ[CONFIG_ENV].strip():
        raise ConfigError(
            f"{CONFIG_ENV} is set but empty",
            problems=[Problem("is empty", file="environment", field=CONFIG_ENV)],
            fix=f"unset {CONFIG_ENV}, or point it at an amiforge.toml file",
        )
    if not named and not path.exists() and not path.is_symlink():
        return
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise ConfigError(
            f"the settings file {path} {what}",
            problems=[Problem(what, file=str(path), field=CONFIG_ENV if named else None)],
            fix=f"point {CONFIG_ENV} at an amiforge.toml file, or unset it" if named else f"remove {path}",
        )


# The registries amiforge supports, as (backend, driver) of a SQLAlchemy URL's scheme ("" is the default driver).
_DRIVERS = {("sqlite", ""), ("sqlite", "pysqlite"), ("postgresql", "psycopg")}


class Settings(BaseSettings):
    # hide_input_in_errors: a store URL may carry a password, and --debug prints the validation error.
    model_config = SettingsConfigDict(env_prefix="AMIFORGE_", extra="forbid", hide_input_in_errors=True)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir_given(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; unset it for the default (~/.local/share/amiforge), or name a folder")
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("holds a NUL character, which no path can")
        return value

    @field_validator("data_dir")
    @classmethod
    def _data_dir_absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("store_url")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        # The URL is never echoed back in a message: it may carry a password.
        if value is None:
            return None
        try:
            url = make_url(value)
        except (ArgumentError, ValueError):
            raise ValueError(
                "is not a database URL (scheme, user, host, a numeric port, database): e.g. "
                "postgresql+psycopg://amiforge@db.internal:5432/amiforge or sqlite:////var/lib/amiforge/registry.db"
            ) from None
        if tuple(url.drivername.partition("+")[::2]) not in _DRIVERS:
            raise ValueError(
                f"names a {url.drivername!r} database; amiforge keeps its registry in SQLite (sqlite:///PATH) or "
                "PostgreSQL through psycopg 3 (postgresql+psycopg://…)"
            )
        if url.drivername.startswith("sqlite") and (not url.database or url.database == ":memory:"):
            raise ValueError("is a SQLite URL without a file: sqlite:////path/to/registry.db (four slashes)")
        return value

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
    kms_region: str | None = Field(
        default=None, pattern=f"^{AWS_REGION_PATTERN}$", description="the KMS key's region (required with kms_key)"
    )
    aws_profile: str | None = Field(default=None, description="AWS profile; default: the standard credential chain")
    aws_max_attempts: int = Field(
        default=8, ge=1, le=20, description="attempts per AWS call (botocore standard retry mode, with jitter)"
    )
    nvd_api_key: SecretStr | None = Field(
        default=None, description="NVD API key for `vulndb update --source cve` (ten times NVD's keyless rate)"
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
        if self.store_url:
            return self.store_url
        # Built, not formatted: `?`, `#` or `%xx` in the data dir's path are part of the path, never a query.
        return URL.create("sqlite", database=str(self.data_dir / "registry.db")).render_as_string(hide_password=False)


def _source(field: str) -> tuple[str, str]:
    """(where the value of `field` came from, how to change it): the variable wins over the file."""
    variable = f"AMIFORGE_{field.upper()}"
    if variable in os.environ:
        return f"environment variable {variable}", f"set {variable} to a valid value, or unset it"
    if _config_file().is_file():
        return str(_config_file()), f"fix the key {field} in {_config_file()}"
    return "defaults", f"set {variable}"


# Settings whose environment variable holds a JSON object.
_JSON_SETTINGS = ("aws_roles",)


def _check_json_variables() -> None:
    """Variables holding JSON are checked here, so a bad one is blamed on itself (pydantic-settings would report
    it as a failure to read the settings file)."""
    for name in _JSON_SETTINGS:
        variable = f"AMIFORGE_{name.upper()}"
        if variable not in os.environ:
            continue
        error: str | None = None
        try:
            if not isinstance(json.loads(os.environ[variable]), dict):
                error = "it is valid JSON, but not an object"
        except (ValueError, RecursionError) as e:
            error = str(e) if isinstance(e, ValueError) else "nested too deeply"
        if error is not None:
            raise ConfigError(
                "invalid amiforge settings",
                problems=[Problem(f"is not a JSON object: {error}", file="environment", field=variable)],
                fix=f"set {variable} to a JSON object, e.g. "
                """'{"123456789012": "arn:aws:iam::123456789012:role/amiforge"}'""",
            )


def load_settings() -> Settings:
    """Settings, or a ConfigError naming the variable or file key that is wrong."""
    _check_config_file()
    _check_json_variables()
    try:
        return Settings()
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where, fix = _source(str(err["loc"][0])) if err["loc"] else ("settings", "check the settings")
            field = ".".join(str(p) for p in err["loc"])
            problems.append(Problem(message=err["msg"].removeprefix("Value error, "), file=where, field=field, fix=fix))
        raise ConfigError("invalid amiforge settings", problems=problems, fix=problems[0].fix) from e
    except RecursionError as e:
        raise ConfigError(
            f"cannot read settings file {_config_file()}: it nests too deeply", fix="fix the file, or remove it"
        ) from e
    except (OSError, ValueError) as e:  # unreadable or malformed amiforge.toml
        reason = (e.strerror or e) if isinstance(e, OSError) else e
        raise ConfigError(
            f"cannot read settings file {_config_file()}: {reason}", fix="fix the TOML syntax or remove the file"
        ) from e
