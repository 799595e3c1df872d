"""import packer: adopt AMIs that Packer baked (its `manifest` post-processor's JSON) as a version of a recipe.

The recipe gives the version its name, checks, distribution and publication; Packer gives the images. The imported
version is `built`, then goes through the same gates as a bake: `test` boots it on EC2, `scan` reads its snapshot's
bytes (EBS direct APIs), `sign`, `promote`. Importing the same image twice returns the version it already belongs to.

The manifest format (Packer's post-processor/manifest `Artifact`): {"builds": [{"name", "builder_type",
"build_time", "artifact_id": "us-east-1:ami-…,eu-west-1:ami-…", "packer_run_uuid", "custom_data"}],
"last_run_uuid"}. Without --build the newest amazon-* build of the last run is taken.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from amiforge.errors import ConfigError, NotFound, Problem
from amiforge.inputs import MIB, parse_json, read_input
from amiforge.lifecycle.bake import BUILT_STATES
from amiforge.model import AWS_REGION_PATTERN, Artifact, ImageVersion, Status
from amiforge.providers import provider_for
from amiforge.providers.interface import Adopter
from amiforge.recipe import AwsProvider as AwsSpec
from amiforge.recipe import Recipe, recipe_digest
from amiforge.settings import Settings
from amiforge.store.interface import Store
from amiforge.yamlfile import short

_ARTIFACT_RE = re.compile(rf"({AWS_REGION_PATTERN}):(ami-[0-9a-f]{{8,17}})")
# A manifest lists a few builds of a few regions each: a few KiB. Anything this big is not one.
MAX_MANIFEST = 16 * MIB

# Packer builders that produce AMIs (the amazon plugin's; ebssurrogate/ebsvolume/chroot too).
_AMAZON_BUILDERS = ("amazon-ebs", "amazon-ebssurrogate", "amazon-chroot", "amazon-instance")


@dataclass(frozen=True)
class PackerBuild:
    name: str
    builder_type: str
    run_uuid: str
    build_time: int
    images: tuple[tuple[str, str], ...]  # (region, image id), in manifest order


def parse_manifest(path: Path, *, build: str | None = None) -> PackerBuild:
    """The build to import from a Packer manifest, or ConfigError naming the file, the entry and the fix."""
    fix = "pass the JSON file Packer's manifest post-processor wrote (its `output`, manifest.json by default)"
    raw = read_input(path, what="Packer manifest", max_bytes=MAX_MANIFEST, fix=fix)
    data = parse_json(raw, file=str(path), what="Packer manifest", fix=fix)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} is not a Packer manifest",
            problems=[Problem("expected a JSON object with `builds`", file=str(path))],
            fix=fix,
        )
    builds = data.get("builds")
    if not isinstance(builds, list) or not builds:
        raise ConfigError(
            f"{path} has no builds",
            problems=[Problem("expected a non-empty list", file=str(path), field="builds")],
            fix="pass the file Packer's manifest post-processor wrote after a successful build",
        )
    candidates: list[PackerBuild] = []
    problems: list[Problem] = []

    def bad(field: str, message: str, fix: str) -> None:
        problems.append(Problem(message, file=str(path), field=field, fix=fix))

    for i, entry in enumerate(builds):
        where = f"builds[{i}]"
        if not isinstance(entry, dict):
            bad(where, "not an object", "each build is a JSON object")
            continue
        builder = str(entry.get("builder_type", ""))
        if not builder.startswith(_AMAZON_BUILDERS):
            continue  # a docker or qemu build in the same manifest is not ours to import
        pairs = str(entry.get("artifact_id", "")).split(",")
        images = [_ARTIFACT_RE.fullmatch(p.strip()) for p in pairs]
        if not pairs or any(m is None for m in images):
            bad(
                f"{where}.artifact_id",
                f"artifact_id {short(entry.get('artifact_id'))} is not region:ami-id[,region:ami-id…]",
                "Packer writes e.g. eu-west-1:ami-0123456789abcdef0; was the manifest edited?",
            )
            continue
        build_time = entry.get("build_time", 0)
        if isinstance(build_time, bool) or not isinstance(build_time, int) or not 0 <= build_time < 2**63:
            bad(
                f"{where}.build_time",
                f"build_time {short(build_time)} is not a Unix time",
                "Packer writes the build's end as whole seconds since 1970; was the manifest edited?",
            )
            continue
        candidates.append(
            PackerBuild(
                name=str(entry.get("name", "")),
                builder_type=builder,
                run_uuid=str(entry.get("packer_run_uuid", "")),
                build_time=build_time,
                images=tuple((m.group(1), m.group(2)) for m in images if m is not None),
            )
        )
    if problems:
        raise ConfigError(f"{path} has {len(problems)} unreadable build(s)", problems=problems, fix=fix)
    if build is not None:
        candidates = [c for c in candidates if c.name == build]
    elif isinstance(data.get("last_run_uuid"), str):
        last = [c for c in candidates if c.run_uuid == data["last_run_uuid"]]
        candidates = last or candidates
    if not candidates:
        names = ", ".join(sorted({str(b.get("name")) for b in builds if isinstance(b, dict)}))
        raise NotFound(
            f"{path} has no AMI build{f' named {build!r}' if build else ''} (builds: {names or 'none'})",
            fix="pass --build NAME of an amazon-* build",
        )
    return max(candidates, key=lambda c: c.build_time)


def import_packer(
    manifest: Path, recipe: Recipe, *, store: Store, settings: Settings, build: str | None = None
) -> tuple[ImageVersion, bool]:
    """Register the build's AMIs as a `built` version of `recipe`; (version, created). The image in the recipe's
    region is the version's artifact (its digest is the version's); the others are recorded as its copies."""
    spec = recipe.provider
    if not isinstance(spec, AwsSpec):
        raise ConfigError(
            f"recipe {recipe.name!r} is for provider {spec.type!r}; Packer AMIs need an aws recipe",
            fix="use a recipe with provider: {type: aws, region: …, source: …}",
        )
    packer = parse_manifest(manifest, build=build)
    regions = dict(packer.images)
    if spec.region not in regions:
        raise ConfigError(
            f"the Packer build {packer.name!r} made no image in {spec.region}, the recipe's region "
            f"(it has {', '.join(sorted(regions))})",
            fix="set provider.region in the recipe to one of those regions",
        )
    existing = _version_holding(store, recipe.name, set(regions.values()))
    if existing is not None:
        return existing, False
    provider = provider_for("aws", settings)
    if not isinstance(provider, Adopter):
        raise ConfigError("this amiforge's aws provider cannot adopt images")
    # Read every image before writing anything: a missing or unavailable one leaves the registry untouched.
    primary = provider.adopt(spec.region, regions[spec.region])
    others = [provider.adopt(region, image) for region, image in packer.images if region != spec.region]
    parent = store.latest(recipe.name, BUILT_STATES)
    version = store.create_version(
        name=recipe.name,
        recipe_digest=recipe_digest(recipe),
        recipe_path=str(recipe.source_path),
        provider="aws",
        tags=recipe.tags,
        parent=parent.ref if parent else None,
        recipe=recipe.model_dump_json(),
    )
    for artifact in (primary, *others):
        store.add_artifact(version.id, artifact)
    version = store.transition(
        version.id, Status.BUILT, expect=Status.BAKING, digest=primary.digest, size_bytes=primary.size_bytes
    )
    store.append_event(
        "import.packer",
        actor=settings.actor,
        ref=version.ref,
        data={
            "manifest": str(manifest),
            "build": packer.name,
            "packer_run_uuid": packer.run_uuid,
            "images": dict(packer.images),
        },
    )
    return version, True


def _version_holding(store: Store, name: str, image_ids: set[str]) -> ImageVersion | None:
    for version in store.list_versions(name):
        held: list[Artifact] = store.artifacts(version.id)
        if any(a.provider == "aws" and a.location in image_ids for a in held):
            return version
    return None
