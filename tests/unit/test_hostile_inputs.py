"""Bad input as a hostile user chooses it, through the CLI: each class a probe of ~2,000 inputs found ending in an
internal error (exit 70), a hang, memory exhaustion or a write outside the data dir, with the exit code and the
message it gets now. A FIFO in place of a file would hang the test if the command blocked on it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from amiforge.model import Artifact, Status
from amiforge.scanners.sbom import sbom_digest
from amiforge.settings import load_settings
from amiforge.store.sql import open_store
from tests.cli_harness import Cli, Result, isolate, make_cli

AWS_RECIPE = "name: web\nprovider: {type: aws, region: eu-west-1, source: {owners: [amazon], name: debian-12-*}}\n"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    isolate(tmp_path, monkeypatch)
    yield make_cli(monkeypatch, capsys)


def _refused(result: Result, code: int, *fragments: str) -> None:
    assert result.code == code, result.out + result.err
    text = result.out + result.err
    assert "Traceback" not in text and "internal error" not in text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in:\n{text}"


def _seeded(tmp_path: Path, *, corrupt: str | None = None) -> None:
    """web@1 built with an artifact and an event; `corrupt` runs one SQL statement on the registry afterwards."""
    with open_store(load_settings().registry_url) as store:
        v = store.create_version(name="web", recipe_digest="a" * 64, recipe_path="/r.yaml", provider="local",
                                 tags={}, parent=None, recipe="{}")  # fmt: skip
        store.transition(v.id, Status.BUILT, expect=Status.BAKING, digest="d" * 64, size_bytes=1)
        store.add_artifact(v.id, Artifact("local", "local", str(tmp_path / "disk.qcow2"), "d" * 64, 1))
        store.append_event("bake.built", actor="TEST", ref="web@1", data={"digest": "d" * 64})
    if corrupt is not None:
        db = sqlite3.connect(tmp_path / "data" / "registry.db")
        db.execute(corrupt)
        db.commit()
        db.close()


# --- files of the wrong kind or size --------------------------------------------------------------------------


def _fifo(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    os.mkfifo(path)
    return path


def _to_dev_zero(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.symlink_to("/dev/zero")
    return path


@pytest.mark.parametrize("make", [_fifo, _to_dev_zero], ids=["fifo", "dev-zero"])
@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (("recipe", "validate", "{}"), "recipe.yaml"),
        (("vulndb", "import", "{}"), "advisories.json"),
        (("vulndb", "import", "{}"), "advisories.zip"),
        (("keys", "trust", "{}"), "team.pub"),
        (("import", "packer", "{}", "--recipe", "aws.yaml"), "manifest.json"),
        (("rollout", "start", "--target", "local:web", "--version", "web@1", "--strategy", "{}"), "strategy.yaml"),
    ],
)
def test_a_file_that_is_not_a_regular_file_is_refused_at_once(
    env: Cli, tmp_path: Path, make: Callable[[Path, str], Path], argv: tuple[str, ...], name: str
) -> None:
    (tmp_path / "aws.yaml").write_text(AWS_RECIPE)
    path = make(tmp_path, name)
    _refused(env(*(a.replace("{}", str(path)) for a in argv)), 2, str(path))


def test_oversized_and_bomb_files_are_refused_before_they_are_read(env: Cli, tmp_path: Path) -> None:
    huge = tmp_path / "all.json"
    with open(huge, "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB that cost nothing on disk, and must not be read
    _refused(env("vulndb", "import", str(huge)), 2, "is larger than 256 MiB")
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("all/TEST-0001.json", "w") as m:
        for _ in range(64):
            m.write(b"\0" * (1 << 20))  # 64 MiB of zeros: a few hundred KiB compressed
    assert bomb.stat().st_size < 1 << 20
    _refused(env("vulndb", "import", str(bomb)), 2, "unpacks to more than 16 MiB")


def test_a_zip_member_zipfile_cannot_unpack_is_a_config_error(env: Cli, tmp_path: Path) -> None:
    archive_path = tmp_path / "odd.zip"
    with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("TEST-0001.json", "{}")
    data = bytearray(archive_path.read_bytes())
    for header in (b"PK\x03\x04", b"PK\x01\x02"):  # method field: local header +8, central directory +10
        at = data.index(header)
        offset = at + (8 if header == b"PK\x03\x04" else 10)
        data[offset : offset + 2] = (99).to_bytes(2, "little")  # a compression method zipfile does not have
    archive_path.write_bytes(bytes(data))
    _refused(env("vulndb", "import", str(archive_path)), 2, "not a readable zip file")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[" * 100_000, "nested too deeply to be a real document"),
        ('{"a": ' + "1" * 5000 + "}", "integer string conversion"),
        ('{"id": NaN}', "NaN is not a JSON value"),
    ],
    ids=["deep", "huge-integer", "nan"],
)
def test_json_that_would_break_the_parser_is_a_config_error(
    env: Cli, tmp_path: Path, content: str, fragment: str
) -> None:
    for argv in (("vulndb", "import", "{}"), ("import", "packer", "{}", "--recipe", "aws.yaml")):
        path = tmp_path / "input.json"
        path.write_text(content)
        (tmp_path / "aws.yaml").write_text(AWS_RECIPE)
        _refused(env(*(a.replace("{}", str(path)) for a in argv)), 2, fragment)


def test_a_yaml_number_too_long_to_convert_is_a_config_error(env: Cli, tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("name: web\nchecks: {ready_within: " + "9" * 5000 + "}\n")
    _refused(env("recipe", "validate", "r.yaml"), 2, "more digits than amiforge reads")


def test_packer_manifests_are_checked_field_by_field(env: Cli, tmp_path: Path) -> None:
    (tmp_path / "aws.yaml").write_text(AWS_RECIPE)
    build = {"builder_type": "amazon-ebs", "artifact_id": "eu-west-1:ami-00000000000000001", "build_time": "yesterday"}
    (tmp_path / "m.json").write_text(json.dumps({"builds": [build]}))
    _refused(env("import", "packer", "m.json", "--recipe", "aws.yaml"), 2, "builds[0].build_time", "fix:")
    # A missing manifest is bad input, the same exit code as a missing recipe.
    _refused(env("import", "packer", "missing.json", "--recipe", "aws.yaml"), 2, "does not exist")
    _refused(env("recipe", "validate", "missing.yaml"), 2)


# --- numbers, durations, names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ("images", "show", "web@99999999999999999999999"),
        ("images", "show", "web@" + "9" * 5000),
        ("events", "--limit", "9223372036854775808"),
        ("rollout", "status", "9223372036854775808"),
    ],
)
def test_numbers_beyond_the_registry_are_bad_input(env: Cli, argv: tuple[str, ...]) -> None:
    _refused(env(*argv), 2, "beyond what the registry can hold")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("gc", "--min-age", "999999999999h"), "is longer than 366d"),
        (("gc", "--min-age", "inf"), "is not a positive duration"),
        (("gc", "--min-age", "0"), "is not a positive duration"),
        (("incident", "web@1", "--hours", "inf"), "is not a number of hours"),
        (("incident", "web@1", "--hours", "nan"), "is not a number of hours"),
        (("incident", "web@1", "--hours", "30m"), "is not a number of hours"),
        (("incident", "web@1", "--hours", "99999999"), "is longer than 366d"),
        (("rollout", "start", "--target", "local:web", "--version", "web@1", "--bake-time", "999999999999h"), "366d"),
    ],
)
def test_durations_are_finite_and_bounded(env: Cli, argv: tuple[str, ...], fragment: str) -> None:
    _refused(env(*argv), 2, fragment)


def test_strategy_numbers_are_finite_and_bounded(env: Cli, tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(
        "waves: [1000000000000000000000000000000, 100%]\nbake_time: .inf\n"
        "gates: {time_to_ready_p95: .nan}\nerror_budget: {max_burn_rate: .inf}\n"
    )
    result = env("rollout", "start", "--target", "local:web", "--version", "web@1", "--strategy", "s.yaml")
    _refused(result, 2, "more members than any fleet has", "bake_time", "time_to_ready_p95", "finite number")
    assert "no image version" not in result.err  # the strategy is judged before anything is looked up


@pytest.mark.parametrize(
    "argv",
    [
        ("gc", "--region", "x y"),
        ("gc", "--region", "eu-west-1/../x"),
        ("doctor", "--aws", "--region", "[/]"),
        ("keys", "trust", "--kms-key", "alias/TEST", "--kms-region", "eu-west-1\n"),
        ("rollout", "start", "--target", "aws:x y/web", "--version", "web@1"),
    ],
)
def test_aws_region_names_are_checked_before_boto3_sees_them(env: Cli, argv: tuple[str, ...]) -> None:
    result = env(*argv)
    assert result.code == 2, result.out + result.err
    assert "not an AWS region name" in result.err or "is not local:NAME or aws:REGION/GROUP" in result.err


@pytest.mark.parametrize("target", ["local:../../etc", "local:[/]", "aws:eu-west-1/", "aws:", "ftp:web"])
def test_rollout_targets_are_names_not_paths(env: Cli, target: str) -> None:
    _refused(env("rollout", "start", "--target", target, "--version", "web@1"), 2, "is not local:NAME")


def test_an_option_value_that_is_an_option_is_refused_as_json(env: Cli) -> None:
    result = env("images", "list", "--name", "--json")
    assert result.code == 2 and json.loads(result.out)["message"] == "--name '--json' is not an image name"


# --- settings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("AMIFORGE_DATA_DIR", "", "AMIFORGE_DATA_DIR"),
        ("AMIFORGE_STORE_URL", "postgresql://x:notaport/db", "is not a database URL"),
        ("AMIFORGE_STORE_URL", "sqlite+pysqlcipher:///x.db", "SQLite (sqlite:///PATH) or PostgreSQL"),
        ("AMIFORGE_STORE_URL", "sqlite:///", "without a file"),
        ("AMIFORGE_AWS_ROLES", "{not json", "AMIFORGE_AWS_ROLES"),
        ("AMIFORGE_CONFIG", "missing.toml", "does not exist"),
        ("AMIFORGE_CONFIG", "/dev/null", "is not a regular file"),
        ("AMIFORGE_KMS_REGION", "x y", "kms_region"),
    ],
)
def test_settings_errors_name_their_source(
    env: Cli, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(variable, value)
    result = env("images", "list")
    _refused(result, 2, fragment)
    assert "amiforge.toml" not in result.err or variable == "AMIFORGE_CONFIG"  # never blamed on an absent file


@pytest.mark.parametrize("odd", ["what?x=1", "a%41b", "hash#frag"])
def test_the_data_dir_is_a_path_never_a_url_fragment(
    env: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, odd: str
) -> None:
    data = tmp_path / odd
    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(data))
    assert env("images", "list").code == 0
    assert (data / "registry.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([odd, "tmp"])  # nothing written beside it


def test_markup_in_paths_and_registry_values_is_shown_as_text(
    env: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMIFORGE_DATA_DIR", str(tmp_path / "br[/]"))
    monkeypatch.setenv("AMIFORGE_ACTOR", "[/]")
    _seeded(tmp_path / "br[/]")
    with open_store(load_settings().registry_url) as store:
        store.move_channel("web", "dev", 1, expect_current=None, actor="[/]", reason="TEST")
        store.create_rollout("aws:eu-west-1/web[/]asg", 1, strategy={}, waves=[1], actor="[bold]")
    for argv in (("doctor",), ("channels",), ("rollout", "status"), ("rollout", "status", "1"), ("incident", "web@1")):
        result = env(*argv)
        assert result.code in (0, 5), result.out + result.err  # doctor may find tools missing (5); never 70
        assert "internal error" not in result.err
    assert "web[/]asg" in env("rollout", "status").out


# --- a damaged registry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("corrupt", "argv", "fragment"),
    [
        ("UPDATE versions SET status = 'exploded'", ("images", "list"), "versions row id=1 is damaged"),
        ("UPDATE versions SET tags = '{oops'", ("images", "show", "web@1"), "versions row id=1: tags is not JSON"),
        ("UPDATE versions SET created_at = 'yesterday'", ("images", "list"), "created_at is not a date and time"),
        ("UPDATE artifacts SET size_bytes = 'big'", ("images", "show", "web@1"), "artifacts row id=1 is damaged"),
        ("UPDATE events SET data = '[1, 2]'", ("events",), "events row seq=1 is damaged"),
        ("UPDATE events SET data = '{not json'", ("events",), "events row seq=1: data is not JSON"),
    ],
)
def test_a_damaged_registry_is_exit_5_naming_the_row(
    env: Cli, tmp_path: Path, corrupt: str, argv: tuple[str, ...], fragment: str
) -> None:
    _seeded(tmp_path, corrupt=corrupt)
    _refused(env(*argv), 5, fragment, "restore it from a backup")


def test_a_damaged_recipe_kept_with_a_version_is_exit_5_naming_the_row(env: Cli, tmp_path: Path) -> None:
    _seeded(tmp_path, corrupt="""UPDATE versions SET recipe = '{"checks": {"ready_within": "soon"}}'""")
    _refused(env("test", "web@1"), 5, "versions row id=1", "its checks do not validate")


@pytest.mark.parametrize("corrupt", ["UPDATE events SET data = '{not json'", "UPDATE events SET at = 'garbage'"])
def test_tampered_event_rows_fail_the_chain_check_instead_of_crashing_it(
    env: Cli, tmp_path: Path, corrupt: str
) -> None:
    _seeded(tmp_path, corrupt=corrupt)
    _refused(env("events", "--verify"), 4, "seq 1: its data or time cannot be read")


def test_damaged_fleet_files_are_exit_5_and_destroy_still_cleans_up(env: Cli, tmp_path: Path) -> None:
    fleet = tmp_path / "data" / "fleets" / "web"
    fleet.mkdir(parents=True)
    (fleet / "fleet.json").write_bytes(b"\xff\xfe binary garbage \x00")
    _refused(env("fleet", "show", "web"), 5, "fleet destroy web")
    (fleet / "fleet.json").write_text(
        json.dumps({"name": "web", "created": datetime.now(UTC).isoformat(), "members": ["../../../etc"]})
    )
    _refused(env("fleet", "show", "web"), 5, "damaged")
    assert env("fleet", "destroy", "web").code == 0
    assert not fleet.exists()


# --- messages that say what to do -----------------------------------------------------------------------------


def test_keys_generate_into_something_that_is_not_a_directory(env: Cli) -> None:
    _refused(env("keys", "generate", "--dir", "/dev/null"), 2, "/dev/null is not a directory", "fix:")


def test_a_channel_ref_names_the_version_or_says_there_is_no_such_channel(env: Cli, tmp_path: Path) -> None:
    _seeded(tmp_path)
    _refused(env("images", "show", "web:dev"), 3, "image 'web' has no channel 'dev'", "amiforge channels")
    with open_store(load_settings().registry_url) as store:
        store.move_channel("web", "dev", 1, expect_current=None, actor="TEST", reason="TEST")
    assert env("images", "show", "web:dev", "--json").json()["version"]["ref"] == "web@1"


def test_sbom_output_onto_a_fifo_is_refused(env: Cli, tmp_path: Path) -> None:
    fifo = _fifo(tmp_path, "out.json")
    _seeded(tmp_path)
    from amiforge.model import ScanRecord

    with open_store(load_settings().registry_url) as store:
        store.add_scan(1, ScanRecord(datetime.now(UTC), (), "{}", sbom_digest("{}"), (), "TEST"))
    _refused(env("sbom", "web@1", "-o", str(fifo)), 2, "is not a regular file")


def test_a_key_the_registry_could_not_trust_is_not_left_on_disk(
    env: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from amiforge.errors import InfraError
    from amiforge.store.sql import SqlStore

    def locked(*_args: object, **_kwargs: object) -> None:
        raise InfraError("registry error while trying to trust a key: database is locked (TEST)", retryable=True)

    trusting = SqlStore.add_key
    monkeypatch.setattr(SqlStore, "add_key", locked)
    _refused(env("keys", "generate", "--dir", "k"), 5, "database is locked")
    assert not (tmp_path / "k" / "amiforge.key").exists() and not (tmp_path / "k" / "amiforge.pub").exists()
    monkeypatch.setattr(SqlStore, "add_key", trusting)
    assert env("keys", "generate", "--dir", "k").code == 0  # the retry is not blocked by a half-made key
    assert (tmp_path / "k" / "amiforge.key").is_file()


def test_an_option_swallowing_json_still_answers_in_json(env: Cli) -> None:
    result = env("doctor", "--region", "--json")
    assert result.code == 2 and json.loads(result.out)["message"] == "--region '--json' is not an AWS region name"
