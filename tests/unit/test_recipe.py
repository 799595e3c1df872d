"""Recipe schema, loading with every problem at once, path confinement and digests (durations: test_durations.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amiforge.errors import ConfigError
from amiforge.imagefs import resolve_inside
from amiforge.recipe import (
    AwsProvider,
    FileStep,
    LocalProvider,
    OwnersSource,
    PackagesStep,
    Recipe,
    ServiceStep,
    ShellStep,
    UserStep,
    load_recipe,
    parse_recipe,
    recipe_digest,
    recipe_json_schema,
    step_fingerprint,
)

FULL = """\
name: web
description: nginx web tier
base:
  distro: debian
  suite: bookworm
  packages: [ca-certificates]
provider: {type: local}
steps:
  - packages: [nginx]
  - file: {src: files/index.html, dest: /var/www/html/index.html, mode: "0644", owner: root}
  - shell: |
      echo "web tier" > /etc/motd
  - service: {enable: [nginx]}
  - user: {name: deploy, groups: [sudo]}
checks:
  ready_within: 90s
  units: [nginx]
  commands:
    - {run: "nginx -t", expect_exit: 0}
  http:
    - {port: 80, path: /, expect_status: 200, expect_body: "web tier"}
tags: {team: web, cost-center: "42"}
"""


def _folder(tmp_path: Path) -> Path:
    """A recipe folder one level down, so that tmp_path itself is "outside" it."""
    folder = tmp_path / "recipe"
    (folder / "files").mkdir(parents=True, exist_ok=True)
    (folder / "files" / "index.html").write_text("<h1>web tier</h1>\n")
    (tmp_path / "secret.txt").write_text("not yours\n")
    return folder


def _write(tmp_path: Path, text: str | bytes, name: str = "recipe.yaml") -> Path:
    path = _folder(tmp_path) / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _file_step(**spec: str) -> str:
    fields = {"src": "files/index.html", "dest": "/var/www/html/index.html", **spec}
    inner = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return f"name: web\nsteps:\n  - packages: [nginx]\n  - file: {{{inner}}}\n"


def _escaping_link(folder: Path) -> None:
    (folder / "files" / "link.html").symlink_to(Path("..") / ".." / "secret.txt")


def _nothing(folder: Path) -> None:
    pass


# (id, recipe text, setup in the recipe folder, expected field, expected 1-based line or None)
MALFORMED: list[tuple[str, str | bytes, Callable[[Path], None], str | None, int | None]] = [
    ("bad name", "name: Web_Tier!\n", _nothing, "name", 1),
    ("unknown top-level key", "name: web\ncolour: blue\n", _nothing, "colour", 2),
    ("unknown key in a step", _file_step(color="red"), _nothing, "steps[1].file.color", 4),
    (
        "step with two kinds",
        "name: web\nsteps:\n  - packages: [nginx]\n  - packages: [curl]\n    shell: echo hi\n",
        _nothing,
        "steps[1]",
        4,
    ),
    ("empty step", "name: web\nsteps:\n  - packages: [nginx]\n  - {}\n", _nothing, "steps[1]", 4),
    ("unknown step kind", "name: web\nsteps:\n  - pakages: [nginx]\n", _nothing, "steps[0]", 3),
    (
        "bad package name",
        "name: web\nsteps:\n  - packages:\n      - nginx\n      - Nginx_Full\n",
        _nothing,
        "steps[0].packages[1]",
        5,
    ),
    ("src outside via ..", _file_step(src="../secret.txt"), _nothing, "steps[1].file.src", 4),
    ("absolute src", _file_step(src="/etc/passwd"), _nothing, "steps[1].file.src", 4),
    ("src symlink escaping", _file_step(src="files/link.html"), _escaping_link, "steps[1].file.src", 4),
    ("missing src", _file_step(src="files/nope.html"), _nothing, "steps[1].file.src", 4),
    ("src is a directory", _file_step(src="files"), _nothing, "steps[1].file.src", 4),
    ("relative dest", _file_step(dest="var/www/index.html"), _nothing, "steps[1].file.dest", 4),
    ("dest with ..", _file_step(dest="/var/www/../../etc/shadow"), _nothing, "steps[1].file.dest", 4),
    ("dest is /", _file_step(dest="/"), _nothing, "steps[1].file.dest", 4),
    (
        "missing dest",
        "name: web\nsteps:\n  - file:\n      src: files/index.html\n",
        _nothing,
        "steps[0].file.dest",
        3,
    ),
    ("bad mode", _file_step(mode='"0999"'), _nothing, "steps[1].file.mode", 4),
    ("unquoted mode", _file_step(mode="0644"), _nothing, "steps[1].file.mode", 4),
    ("empty service", "name: web\nsteps:\n  - service: {}\n", _nothing, "steps[0].service", 3),
    (
        "bad duration",
        "name: web\nchecks:\n  ready_within: 2 minutes\n",
        _nothing,
        "checks.ready_within",
        3,
    ),
    ("ready_within too long", "name: web\nchecks:\n  ready_within: 2h\n", _nothing, "checks.ready_within", 3),
    (
        "http port 0",
        "name: web\nchecks:\n  http:\n    - {port: 80}\n    - {port: 0}\n",
        _nothing,
        "checks.http[1].port",
        5,
    ),
    (
        "http path without slash",
        "name: web\nchecks:\n  http:\n    - port: 80\n      path: healthz\n",
        _nothing,
        "checks.http[0].path",
        5,
    ),
    (
        "aws source with a name but no owners",
        "name: web\nprovider:\n  type: aws\n  region: eu-west-1\n  source:\n    name: debian-12-amd64-*\n",
        _nothing,
        "provider.source.owners",
        5,
    ),
    ("unknown provider type", "name: web\nprovider: {type: gcp}\n", _nothing, "provider.type", 2),
    ("unsupported suite", "name: web\nbase:\n  suite: trixie\n", _nothing, "base.suite", 3),
    (
        "tag value as int",
        "name: web\ntags:\n  team: web\n  cost-center: 42\n",
        _nothing,
        "tags.cost-center",
        4,
    ),
    (
        "reserved tag key",
        "name: web\ntags:\n  amiforge:managed: 'true'\n",
        _nothing,
        'tags["amiforge:managed"]',
        3,
    ),
    ("yaml syntax error", "name: web\nsteps:\n  - packages: [nginx\n  - shell: x\n", _nothing, None, 4),
    ("top-level list", "- name: web\n", _nothing, None, 1),
    ("empty file", "", _nothing, None, None),
    ("binary junk", bytes(range(256)) * 4, _nothing, None, None),
    ("control character", "name: we\x01b\n", _nothing, None, 1),
    ("duplicate key", "name: web\nname: api\n", _nothing, "name", 2),
]


@pytest.mark.parametrize(
    ("text", "setup", "field", "line"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_recipe_is_one_precise_problem(
    tmp_path: Path,
    text: str | bytes,
    setup: Callable[[Path], None],
    field: str | None,
    line: int | None,
) -> None:
    path = _write(tmp_path, text)
    setup(path.parent)

    with pytest.raises(ConfigError) as caught:
        load_recipe(path)

    problems = caught.value.problems
    assert len(problems) == 1, [p.render() for p in problems]
    problem = problems[0]
    assert problem.file == str(path)
    assert problem.field == field
    assert problem.line == line
    assert problem.message.strip()
    assert problem.fix and problem.fix.strip()
    assert caught.value.exit_code == 2


def test_unknown_key_lists_the_allowed_keys_and_suggests_one(tmp_path: Path) -> None:
    path = _write(tmp_path, _file_step(dets="/x"))
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    by_field = {p.field: p for p in caught.value.problems}
    unknown = by_field["steps[1].file.dets"]
    for key in ("src", "dest", "mode", "owner", "group"):
        assert key in unknown.message
    assert unknown.fix is not None and "dest" in unknown.fix


def test_whoami_message_explains_name_squatting(tmp_path: Path) -> None:
    text = "name: web\nprovider: {type: aws, region: us-east-1, source: {name: 'debian-*', most_recent: true}}\n"
    with pytest.raises(ConfigError) as caught:
        load_recipe(_write(tmp_path, text))
    (problem,) = caught.value.problems
    assert "whoAMI" in problem.message
    assert problem.fix is not None and "owners" in problem.fix
    assert "136693071363" in problem.fix  # Debian publishes from its own account, not amazon


def test_tag_int_says_quote_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_recipe(_write(tmp_path, "name: web\ntags: {cost-center: 42}\n"))
    (problem,) = caught.value.problems
    assert problem.fix is not None and '"42"' in problem.fix


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = (
        "name: Web\n"  # 1: bad name
        "steps:\n"
        "  - file: {src: ../secret.txt, dest: /etc/x}\n"  # 3: confinement
        "checks:\n"
        "  tcp: [{port: 70000}]\n"  # 5: port range
    )
    with pytest.raises(ConfigError) as caught:
        load_recipe(_write(tmp_path, text))
    got = [(p.line, p.field) for p in caught.value.problems]
    assert got == [(1, "name"), (3, "steps[0].file.src"), (5, "checks.tcp[0].port")]
    assert "3 problem(s)" in caught.value.message
    assert "steps[0].file.src" in caught.value.diagnostics()


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    assert str(path) in caught.value.message
    with pytest.raises(ConfigError):
        load_recipe(tmp_path)  # a directory


def test_full_recipe_loads_and_round_trips(tmp_path: Path) -> None:
    path = _write(tmp_path, FULL)
    recipe = load_recipe(path)

    assert recipe.source_path == path.absolute()
    assert recipe.folder == path.parent.absolute()
    assert recipe.name == "web"
    assert isinstance(recipe.provider, LocalProvider)
    expected_types: list[type] = [PackagesStep, FileStep, ShellStep, ServiceStep, UserStep]
    assert [type(s) for s in recipe.steps] == expected_types
    assert [s.kind for s in recipe.steps] == ["packages", "file", "shell", "service", "user"]
    assert [s.describe() for s in recipe.steps] == [
        "packages: nginx",
        "file files/index.html -> /var/www/html/index.html",
        'shell: echo "web tier" > /etc/motd',
        "service: enable nginx",
        "user: deploy",
    ]
    assert recipe.checks.ready_within == 90.0
    assert recipe.checks.http[0].expect_body == "web tier"
    assert recipe.tags == {"team": "web", "cost-center": "42"}

    dumped = recipe.model_dump(mode="json")
    again = _write(tmp_path, yaml.safe_dump(dumped), name="again.yaml")
    reloaded = load_recipe(again)
    assert reloaded.model_dump(mode="json") == dumped
    assert recipe_digest(reloaded) == recipe_digest(recipe)


def test_defaults_and_aws_provider(tmp_path: Path) -> None:
    text = (
        "name: api\n"
        "provider:\n"
        "  type: aws\n"
        "  region: eu-west-1\n"
        "  source: {owners: [amazon, '136693071363'], name: debian-12-amd64-*}\n"
    )
    recipe = load_recipe(_write(tmp_path, text))
    assert isinstance(recipe.provider, AwsProvider)
    assert recipe.provider.instance_type == "t3.micro"
    assert isinstance(recipe.provider.source, OwnersSource)
    assert recipe.provider.source.most_recent is True
    assert recipe.steps == []
    assert recipe.checks.ready_within == 90.0
    assert recipe.base.suite == "bookworm"


AWS_FULL = """\
name: api
provider:
  type: aws
  region: eu-west-1
  source: {ssm_parameter: /aws/service/debian/release/bookworm/latest/amd64}
  subnet_id: subnet-0123456789abcdef0
  security_group_ids: [sg-0123456789abcdef0]
  instance_profile: amiforge-builder
  boot_test_instance_type: t3.small
  distribution:
    regions: [{region: us-east-1, kms_key: alias/images}, {region: eu-central-1}]
    accounts: ["111122223333"]
    organizations: ["arn:aws:organizations::111122223333:organization/o-abcdefghij"]
    organizational_units: ["arn:aws:organizations::111122223333:ou/o-abcdefghij/ou-abcd-abcdefgh"]
  publish: {parameter_prefix: /images, launch_template: api-lt}
"""


def test_aws_placement_distribution_and_publication(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, AWS_FULL))
    provider = recipe.provider
    assert isinstance(provider, AwsProvider)
    assert (provider.subnet_id, provider.security_group_ids) == ("subnet-0123456789abcdef0", ["sg-0123456789abcdef0"])
    assert [(r.region, r.kms_key) for r in provider.distribution.regions] == [
        ("us-east-1", "alias/images"),
        ("eu-central-1", None),
    ]
    assert provider.distribution.public is False
    assert (provider.publish.parameter_prefix, provider.publish.launch_template) == ("/images", "api-lt")
    minimal = load_recipe(_write(tmp_path, "name: api\nprovider: {type: aws, region: eu-west-1, source: "
                                            "{owners: [amazon], name: debian-*}}\n", name="min.yaml"))  # fmt: skip
    assert isinstance(minimal.provider, AwsProvider)
    assert minimal.provider.distribution.regions == [] and minimal.provider.publish.parameter_prefix == "/amiforge"


def test_aws_block_problems_name_line_field_and_fix(tmp_path: Path) -> None:
    bad = (
        AWS_FULL.replace("subnet-0123456789abcdef0", "subnet-zz")
        .replace("region: eu-central-1", "region: nowhere")
        .replace('accounts: ["111122223333"]', 'accounts: ["12345"]')
        .replace("parameter_prefix: /images", "parameter_prefix: images/")
    )
    with pytest.raises(ConfigError) as caught:
        load_recipe(_write(tmp_path, bad))
    found = {(p.field, p.line) for p in caught.value.problems}
    assert found == {
        ("provider.subnet_id", 6),
        ("provider.distribution.regions[1].region", 11),
        ("provider.distribution.accounts[0]", 12),
        ("provider.publish.parameter_prefix", 15),
    }
    assert all(p.fix for p in caught.value.problems)


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        ("[{region: eu-west-1}]", "the region the image is baked in"),
        ("[{region: us-east-1}, {region: us-east-1}]", "twice"),
    ],
)
def test_distribution_regions_are_other_regions_each_once(tmp_path: Path, regions: str, message: str) -> None:
    text = AWS_FULL.replace(
        "regions: [{region: us-east-1, kms_key: alias/images}, {region: eu-central-1}]", f"regions: {regions}"
    )
    with pytest.raises(ConfigError) as caught:
        load_recipe(_write(tmp_path, text))
    (problem,) = caught.value.problems
    assert problem.field == "provider.distribution.regions" and problem.line == 11 and message in problem.message


AWS_MIN = "name: api\nprovider:\n  type: aws\n  region: eu-west-1\n  source: {ssm_parameter: /aws/service/x}\n"


def _aws_problems(tmp_path: Path, extra: str) -> dict[str, tuple[int | None, str, str | None]]:
    with pytest.raises(ConfigError) as caught:
        load_recipe(_write(tmp_path, AWS_MIN + extra))
    return {p.field or "": (p.line, p.message, p.fix) for p in caught.value.problems}


def test_aws_communicator_root_volume_and_imds_defaults(tmp_path: Path) -> None:
    provider = load_recipe(_write(tmp_path, AWS_MIN)).provider
    assert isinstance(provider, AwsProvider)
    assert (provider.communicator, provider.ssh_username, provider.ssh_interface) == ("ssm", "admin", "public_ip")
    assert provider.root_volume is None and provider.imds_support == "v2.0"


def test_aws_ssh_communicator_and_root_volume(tmp_path: Path) -> None:
    text = AWS_MIN + (
        "  communicator: ssh\n"
        "  ssh_username: debian\n"
        "  ssh_interface: private_ip\n"
        "  security_group_ids: [sg-0123456789abcdef0]\n"
        "  root_volume: {size_gib: 20, type: gp3, iops: 4000, kms_key: alias/ebs}\n"
        "  imds_support: none\n"
    )
    provider = load_recipe(_write(tmp_path, text)).provider
    assert isinstance(provider, AwsProvider)
    assert (provider.communicator, provider.ssh_username, provider.ssh_interface) == ("ssh", "debian", "private_ip")
    assert provider.root_volume is not None
    volume = provider.root_volume
    assert (volume.size_gib, volume.type, volume.iops, volume.encrypted, volume.kms_key) == (
        20, "gp3", 4000, None, "alias/ebs"
    )  # fmt: skip
    assert provider.imds_support == "none"
    assert (
        load_recipe(_write(tmp_path, AWS_MIN + "  imds_support: null\n", "null.yaml")).provider.model_dump()[
            "imds_support"
        ]
        is None
    )


def test_ssh_without_security_groups_names_the_field_and_the_fix(tmp_path: Path) -> None:
    """amiforge creates no group open to the world: the recipe must name one that lets this host in on 22."""
    ((field, (line, message, fix)),) = _aws_problems(tmp_path, "  communicator: ssh\n").items()
    assert field == "provider.security_group_ids" and line == 2
    assert "communicator ssh needs security_group_ids" in message
    assert fix is not None and "TCP 22" in fix and "communicator: ssm" in fix


def test_ssh_settings_with_the_ssm_communicator_are_refused(tmp_path: Path) -> None:
    ((field, (_line, message, fix)),) = _aws_problems(tmp_path, "  ssh_username: debian\n").items()
    assert field == "provider.ssh_username" and "only apply to communicator: ssh" in message
    assert fix is not None and "communicator: ssh" in fix


@pytest.mark.parametrize("communicator", ["ssm", "ssh"])
def test_an_aws_provider_block_survives_its_own_dump(tmp_path: Path, communicator: str) -> None:
    """The registry keeps the baked recipe as dumped JSON (every default written out) and validates it again."""
    extra = "  communicator: ssh\n  security_group_ids: [sg-0123456789abcdef0]\n" if communicator == "ssh" else ""
    recipe = load_recipe(_write(tmp_path, AWS_MIN + extra))
    dumped = recipe.model_dump(mode="json")
    assert Recipe.model_validate(dumped).model_dump(mode="json") == dumped


@pytest.mark.parametrize(
    ("volume", "field", "message"),
    [
        ("{kms_key: alias/ebs, encrypted: false}", "provider.root_volume.encrypted", "only applies to an encrypted"),
        ("{type: io2, size_gib: 10}", "provider.root_volume.iops", "a io2 volume needs iops"),
        ("{type: gp2, iops: 3000}", "provider.root_volume.iops", "not gp2"),
        ("{size_gib: 0}", "provider.root_volume.size_gib", "greater than or equal to 1"),
        ("{type: st1}", "provider.root_volume.type", "gp3"),
    ],
)
def test_root_volume_problems(tmp_path: Path, volume: str, field: str, message: str) -> None:
    problems = _aws_problems(tmp_path, f"  root_volume: {volume}\n")
    assert list(problems) == [field] and message in problems[field][1], problems


def test_imds_support_is_v2_or_none(tmp_path: Path) -> None:
    problems = _aws_problems(tmp_path, "  imds_support: v1.0\n")
    assert list(problems) == ["provider.imds_support"]


def test_schema_says_what_each_communicator_needs_and_whose_debian_images_are() -> None:
    text = json.dumps(recipe_json_schema())
    for needed in (
        "AmazonSSMManagedInstanceCore",
        "SSM agent",
        "ssmmessages",
        "ec2messages",
        "NAT",
        "TCP 22",
        "public IP",
        "private address",
        "cloud-init",
        "host keys",
        "136693071363",
    ):
        assert needed in text, needed
    assert "owners: [amazon], name: 'debian" not in text


def test_long_shell_step_is_truncated() -> None:
    step = ShellStep(shell="apt-get update && apt-get install -y " + "x " * 100)
    assert step.describe().startswith("shell: apt-get update")
    assert len(step.describe()) <= 60


def test_recipe_not_loaded_from_a_file_has_no_folder() -> None:
    recipe = Recipe.model_validate({"name": "web"})
    with pytest.raises(ConfigError):
        _ = recipe.folder


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    for d in ("etc", "srv/www", "usr/lib", "opt"):
        (root / d).mkdir(parents=True)
    (root / "etc" / "motd").write_text("hello\n")
    (root / "var").mkdir()
    (root / "var" / "www").symlink_to("/srv/www")  # absolute: re-rooted
    (root / "etc" / "motd.alt").symlink_to("motd")  # relative, same directory
    (root / "usr" / "lib" / "conf").symlink_to("../../etc")  # relative, climbing but staying inside
    (root / "etc" / "passwd").symlink_to("/etc/shadow")  # absolute host-looking path stays in the image
    (root / "opt" / "escape").symlink_to("../../../../../etc")  # climbs out of the root
    (root / "opt" / "abs-escape").symlink_to("/../../etc")
    (root / "loop-a").symlink_to("loop-b")
    (root / "loop-b").symlink_to("/loop-a")
    return root


@pytest.mark.parametrize(
    ("dest", "expected"),
    [
        ("/etc/motd", "etc/motd"),
        ("/new/dir/file.txt", "new/dir/file.txt"),
        ("/var/www/index.html", "srv/www/index.html"),
        ("/etc/motd.alt", "etc/motd"),
        ("/usr/lib/conf/motd", "etc/motd"),
        ("/etc/passwd", "etc/shadow"),
        ("//etc/./motd", "etc/motd"),
    ],
)
def test_resolve_inside_follows_symlinks_within_the_root(rootfs: Path, dest: str, expected: str) -> None:
    resolved = resolve_inside(rootfs, dest)
    assert resolved == rootfs.resolve() / expected
    assert resolved.is_relative_to(rootfs.resolve())


@pytest.mark.parametrize(
    "dest",
    ["/opt/escape/passwd", "/opt/abs-escape/passwd", "/loop-a", "/loop-a/x", "relative/path", "/etc/\x00"],
)
def test_resolve_inside_refuses_to_leave_the_root(rootfs: Path, dest: str) -> None:
    with pytest.raises(ConfigError):
        resolve_inside(rootfs, dest)


def test_recipe_digest_tracks_copied_bytes_and_steps(tmp_path: Path) -> None:
    path = _write(tmp_path, FULL)
    first = recipe_digest(load_recipe(path))
    assert recipe_digest(load_recipe(path)) == first  # stable

    index = path.parent / "files" / "index.html"
    index.write_text("<h1>changed</h1>\n")
    changed_bytes = recipe_digest(load_recipe(path))
    assert changed_bytes != first

    path.write_text(FULL.replace("packages: [nginx]", "packages: [nginx, curl]"))
    assert recipe_digest(load_recipe(path)) not in (first, changed_bytes)


def test_step_fingerprint(tmp_path: Path) -> None:
    path = _write(tmp_path, FULL)
    recipe = load_recipe(path)
    packages, file_step = recipe.steps[0], recipe.steps[1]
    before = step_fingerprint(file_step, recipe.folder)
    assert step_fingerprint(packages, recipe.folder) == step_fingerprint(packages, tmp_path)
    assert step_fingerprint(packages, recipe.folder) != step_fingerprint(recipe.steps[2], recipe.folder)
    assert len(before) == 64

    (recipe.folder / "files" / "index.html").write_bytes(b"other")
    assert step_fingerprint(file_step, recipe.folder) != before

    os.remove(recipe.folder / "files" / "index.html")
    with pytest.raises(ConfigError):  # re-checked at read time
        step_fingerprint(file_step, recipe.folder)


def test_json_schema_has_the_top_level_properties() -> None:
    schema = recipe_json_schema()
    assert str(schema["$schema"]).startswith("https://json-schema.org/")
    assert schema["title"] == "amiforge recipe"
    properties = schema["properties"]
    assert isinstance(properties, dict)
    assert set(properties) == {"name", "description", "base", "provider", "steps", "checks", "tags"}
    assert schema["required"] == ["name"]
    assert schema["additionalProperties"] is False


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["name", "steps", "file", "src", "checks", "http", "port", "tags", "x"]),
                    children,
                    max_size=4,
                )
            ),
            max_leaves=20,
        ).map(lambda data: yaml.safe_dump(data)),
    )
)
def test_any_input_gives_a_recipe_or_a_config_error(text: str) -> None:
    try:
        parse_recipe(text, Path("/nonexistent/recipe.yaml"))
    except ConfigError as e:
        assert e.problems
        assert all(p.message and p.fix for p in e.problems)


def test_symlink_escape_is_named_as_such(tmp_path: Path) -> None:
    path = _write(tmp_path, _file_step(src="files/link.html"))
    _escaping_link(path.parent)
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    (problem,) = caught.value.problems
    assert "outside the recipe's folder" in problem.message
