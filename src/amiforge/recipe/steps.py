"""The steps of a recipe (packages, file, shell, service, user), each one cache layer, and the file sources
they copy.

A step is a mapping with exactly one key naming its kind; `Step` is the union pydantic validates, with a check
that says which rule was broken before pydantic tries. A file step's `src` is confined to the recipe's folder
(no absolute path, no `..`, no symlink out, a regular file) when the recipe is loaded, and again at every use
(`source_sha256()`, `stage_source()`): the folder may have changed since. Its `dest` is an absolute path in the
image; the image root itself is confined by `imagefs.resolve_inside()` when the step runs.
"""

from __future__ import annotations

import difflib
import re
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from amiforge.errors import ConfigError, Problem
from amiforge.inputs import file_sha256
from amiforge.recipe.fields import STRICT, AbsPath, FileMode, PackageName, PosixName, UnitName, shorten
from amiforge.yamlfile import NonEmptyStr, fail, yaml_type

__all__ = [
    "STEP_TAGS",
    "FileSpec",
    "FileStep",
    "PackagesStep",
    "ServiceSpec",
    "ServiceStep",
    "ShellStep",
    "Step",
    "UserSpec",
    "UserStep",
    "source_sha256",
    "stage_source",
]


# ----------------------------------------------------------------------------------------------------------
# File sources: inside the recipe's folder, checked at load and at every use


def _src_problem(folder: Path, src: str) -> tuple[str, str] | None:
    """Why `src` may not be copied from `folder` (message, fix); None for a regular file inside it."""
    try:
        root = folder.resolve(strict=True)
        # strict: a missing file fails here; resolve follows every symlink, so an escape shows in the result.
        resolved = (root / src).resolve(strict=True)
    except FileNotFoundError:
        return (
            f"source file {src!r} does not exist in the recipe's folder {folder}",
            "create it, or fix the path (it is relative to the folder holding the recipe)",
        )
    except (OSError, RuntimeError) as e:  # symlink loops: RuntimeError before 3.13, OSError(ELOOP) after
        return (f"source file {src!r} cannot be resolved: {e}", "replace the symlink with the file itself")
    if not resolved.is_relative_to(root):
        return (
            f"source file {src!r} resolves to {resolved}, outside the recipe's folder {root} (through a symlink)",
            "copy the file into the recipe's folder instead of linking to it",
        )
    if not resolved.is_file():
        return (
            f"source {src!r} is not a regular file (a directory or a device?)",
            "point src at a single regular file",
        )
    return None


def _source(folder: Path, src: str) -> Path:
    """The path of a file step's source, confined to the recipe's folder and a regular file. Checked again at every
    use: the folder may have changed since the recipe was validated."""
    problem = _src_problem(folder, src)
    if problem is not None:
        message, fix = problem
        raise ConfigError(message, problems=[Problem(message=message, field="file.src", fix=fix)], fix=fix)
    return (folder.resolve() / src).resolve()


def source_sha256(folder: Path, src: str) -> str:
    """sha256 hex of a file step's source, read in chunks (a source may be a large binary)."""
    return file_sha256(_source(folder, src))


def stage_source(folder: Path, src: str, dest: Path) -> None:
    """Copy a file step's source (re-checked) to `dest`, in chunks."""
    shutil.copyfile(_source(folder, src), dest)


# ----------------------------------------------------------------------------------------------------------
# The steps


class FileSpec(BaseModel):
    model_config = STRICT

    src: str = Field(description="path relative to the recipe's folder; must stay inside it")
    dest: str = Field(description="absolute path in the image")
    mode: FileMode = "0644"
    owner: PosixName = "root"
    group: PosixName = "root"

    @field_validator("src")
    @classmethod
    def _src_confined(cls, value: str, info: ValidationInfo) -> str:
        fix = "write it relative to the recipe's folder, e.g. files/index.html"
        if not value or "\x00" in value:
            raise fail("src must be a non-empty path without NUL characters", fix)
        if value.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:", value):
            raise fail(f"src {value!r} is absolute; sources must be relative to the recipe's folder", fix)
        if ".." in re.split(r"[/\\]", value):
            raise fail(
                f"src {value!r} contains '..'; sources must stay inside the recipe's folder",
                "move the file into the recipe's folder and refer to it without '..'",
            )
        folder = info.context.get("folder") if isinstance(info.context, Mapping) else None
        # Without a folder (a recipe built in memory) only the syntax is checked; every use re-checks (_source).
        if isinstance(folder, Path):
            problem = _src_problem(folder, value)
            if problem is not None:
                raise fail(*problem)
        return value

    @field_validator("dest")
    @classmethod
    def _dest_confined(cls, value: str) -> str:
        if "\x00" in value:
            raise fail("dest must not contain a NUL character", "remove it")
        if not value.startswith("/"):
            raise fail(
                f"dest {value!r} is relative; it must be an absolute path in the image",
                f"write it from the image root, e.g. /{value.lstrip('./') or 'etc/motd'}",
            )
        if ".." in value.split("/"):
            raise fail(f"dest {value!r} contains '..'", "write the final path without '..'")
        if PurePosixPath(value) == PurePosixPath("/"):
            raise fail("dest must not be '/' itself", "name the file to create, e.g. /etc/motd")
        if value.endswith("/"):
            raise fail(
                f"dest {value!r} ends with '/'; it must name the file, not its directory",
                "append the file name, e.g. /var/www/html/index.html",
            )
        return value


class PackagesStep(BaseModel):
    """Install Debian packages (apt)."""

    model_config = STRICT
    kind: ClassVar[str] = "packages"

    packages: list[PackageName] = Field(min_length=1)

    def describe(self) -> str:
        return shorten(f"packages: {' '.join(self.packages)}")


class FileStep(BaseModel):
    """Copy one file from the recipe's folder into the image."""

    model_config = STRICT
    kind: ClassVar[str] = "file"

    file: FileSpec

    def describe(self) -> str:
        return f"file {self.file.src} -> {self.file.dest}"


class ShellStep(BaseModel):
    """Run a shell script in the image (chroot locally, the build instance on AWS)."""

    model_config = STRICT
    kind: ClassVar[str] = "shell"

    shell: NonEmptyStr

    def describe(self) -> str:
        return shorten(f"shell: {self.shell}")


class ServiceSpec(BaseModel):
    model_config = STRICT

    enable: list[UnitName] = Field(default_factory=list)
    disable: list[UnitName] = Field(default_factory=list)

    @model_validator(mode="after")
    def _something_to_do(self) -> ServiceSpec:
        if not self.enable and not self.disable:
            raise fail("service step enables and disables nothing", "add enable: [unit] and/or disable: [unit]")
        both = sorted(set(self.enable) & set(self.disable))
        if both:
            raise fail(f"units both enabled and disabled: {', '.join(both)}", "keep each unit in one list")
        return self


class ServiceStep(BaseModel):
    """Enable or disable systemd units."""

    model_config = STRICT
    kind: ClassVar[str] = "service"

    service: ServiceSpec

    def describe(self) -> str:
        parts = []
        if self.service.enable:
            parts.append("enable " + " ".join(self.service.enable))
        if self.service.disable:
            parts.append("disable " + " ".join(self.service.disable))
        return shorten("service: " + "; ".join(parts))


def _check_authorized_key(value: str) -> str:
    # Public keys only: docs/architecture.md §8 keeps secrets out of recipes and images.
    if "PRIVATE KEY" in value:
        raise fail("this is a private key; recipes must never hold secrets", "use the matching .pub line instead")
    if not value.strip() or "\n" in value.strip() or "\x00" in value:
        raise fail("an authorized key must be one non-empty line", "paste the single line of the .pub file")
    return value


class UserSpec(BaseModel):
    model_config = STRICT

    name: PosixName
    groups: list[PosixName] = Field(default_factory=list)
    shell: AbsPath = "/bin/bash"
    ssh_authorized_keys: list[Annotated[str, AfterValidator(_check_authorized_key)]] = Field(default_factory=list)


class UserStep(BaseModel):
    """Create a local user."""

    model_config = STRICT
    kind: ClassVar[str] = "user"

    user: UserSpec

    def describe(self) -> str:
        return f"user: {self.user.name}"


# ----------------------------------------------------------------------------------------------------------
# The union: one key per step, checked before pydantic tries


_STEP_CLASSES: dict[str, type[PackagesStep | FileStep | ShellStep | ServiceStep | UserStep]] = {
    cls.kind: cls for cls in (PackagesStep, FileStep, ShellStep, ServiceStep, UserStep)
}
_STEP_KINDS = ", ".join(_STEP_CLASSES)

# The union tags of `Step` (see yamlfile.YamlKind.tagged): the model each one stands for.
STEP_TAGS: dict[str, type[BaseModel]] = {f"<{kind}>": cls for kind, cls in _STEP_CLASSES.items()}


def _check_step(value: object) -> object:
    """Each step is a mapping with exactly one known key; say which rule was broken before pydantic tries."""
    if isinstance(value, tuple(_STEP_CLASSES.values())):
        return value
    if not isinstance(value, dict):
        raise fail(
            f"a step must be a mapping with one key ({_STEP_KINDS}), got {yaml_type(value)}",
            "write it as e.g. '- packages: [nginx]'",
        )
    if not value:
        raise fail(
            f"empty step; each step has exactly one of: {_STEP_KINDS}",
            "fill it in (e.g. '- packages: [nginx]') or delete the line",
        )
    keys = [str(k) for k in value]
    if len(keys) > 1:
        raise fail(
            f"step has {len(keys)} keys ({', '.join(keys)}); each step must have exactly one of: {_STEP_KINDS}",
            "split it into separate list items, one '- <kind>: …' per step (check the '-' indentation)",
        )
    key = keys[0]
    if key not in _STEP_CLASSES:
        close = difflib.get_close_matches(key, list(_STEP_CLASSES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise fail(f"unknown step kind {key!r}; allowed: {_STEP_KINDS}", f"{hint}use one of: {_STEP_KINDS}")
    return value


def _step_tag(value: object) -> str | None:
    if isinstance(value, BaseModel) and hasattr(value, "kind"):
        return f"<{value.kind}>"
    if isinstance(value, dict) and len(value) == 1:
        return f"<{next(iter(value))}>"
    return None


Step = Annotated[
    Annotated[PackagesStep, Tag("<packages>")]
    | Annotated[FileStep, Tag("<file>")]
    | Annotated[ShellStep, Tag("<shell>")]
    | Annotated[ServiceStep, Tag("<service>")]
    | Annotated[UserStep, Tag("<user>")],
    Discriminator(_step_tag),
    BeforeValidator(_check_step),
]
