"""The secrets and residue scanner: one planted example of every rule, what must stay quiet (public keys,
certificates, placeholders, templates, apt lists, a real host's /etc and copyright files), symlinks that leave
the tree, redaction, and the raw-disk scan of a deleted file in a real ext4 image.

Every key is generated here with `cryptography`; every token is built from obviously synthetic text.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from amiforge.errors import NotFound
from amiforge.model import Finding, FindingKind, Severity
from amiforge.scanners.secrets import scan_raw, scan_tree
from tests.conftest import required_or_skip

PEM = serialization.Encoding.PEM
NO_PW = serialization.NoEncryption()


@dataclass(frozen=True)
class Keys:
    rsa_traditional: str  # -----BEGIN RSA PRIVATE KEY-----
    ed25519_openssh: str  # -----BEGIN OPENSSH PRIVATE KEY-----
    ed25519_public: str  # ssh-ed25519 AAAA…
    ec_traditional: str  # -----BEGIN EC PRIVATE KEY-----
    pkcs8: str  # -----BEGIN PRIVATE KEY-----
    pkcs8_encrypted: str  # -----BEGIN ENCRYPTED PRIVATE KEY-----
    dsa_traditional: str  # -----BEGIN DSA PRIVATE KEY-----
    public_pem: str  # -----BEGIN PUBLIC KEY-----
    host_key: str  # another OpenSSH private key


@pytest.fixture(scope="module")
def keys() -> Keys:
    r = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    e = ed25519.Ed25519PrivateKey.generate()
    c = ec.generate_private_key(ec.SECP256R1())
    d = dsa.generate_private_key(key_size=1024)
    h = ed25519.Ed25519PrivateKey.generate()
    trad, openssh, pkcs8 = (
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.PrivateFormat.OpenSSH,
        serialization.PrivateFormat.PKCS8,
    )
    return Keys(
        rsa_traditional=r.private_bytes(PEM, trad, NO_PW).decode(),
        ed25519_openssh=e.private_bytes(PEM, openssh, NO_PW).decode(),
        ed25519_public=e.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode(),
        ec_traditional=c.private_bytes(PEM, trad, NO_PW).decode(),
        pkcs8=c.private_bytes(PEM, pkcs8, NO_PW).decode(),
        pkcs8_encrypted=r.private_bytes(PEM, pkcs8, serialization.BestAvailableEncryption(b"test-only")).decode(),
        dsa_traditional=d.private_bytes(PEM, trad, NO_PW).decode(),
        public_pem=r.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        host_key=h.private_bytes(PEM, openssh, NO_PW).decode(),
    )


def synthetic_pgp_block() -> str:
    body = base64.encodebytes(b"amiforge test material, not a key " * 8).decode()
    return f"-----BEGIN PGP PRIVATE KEY BLOCK-----\n\n{body}=AbCd\n-----END PGP PRIVATE KEY BLOCK-----\n"


# Obviously synthetic token material.
GITHUB = "ghp_" + ("TestOnly" * 5)[:36]
GITHUB_PAT = "github_pat_" + ("TestOnly_" * 10)[:82]
GITLAB = "glpat-" + ("TestOnlyGl" * 3)[:24]
SLACK = "xoxb-1234567890-1234567890123-" + "testonly" * 3
AWS_ID = "AKIATESTONLY00000000"
AWS_ID_2 = "ASIATESTONLY11111111"
AWS_SECRET = ("TestOnlySecret/Key+" * 3)[:40]
AWS_SECRET_2 = ("TestOnlyCredential+" * 3)[:40]
AZURE_SECRET = "TestOnly~AzureClientSecret~0000"
PASSWORDS = {
    "pg": "TestOnlyPgPw1",
    "mysql": "TestOnlyMyPw2",
    "mongo": "TestOnlyMongoPw3",
    "redis": "TestOnlyRedisPw4",
    "netrc": "TestOnlyNetrcPw5",
    "dotenv": "TestOnlyDotenvSecret6",
    "kube": "TestOnlyKubeBearerToken7",
    "docker": base64.b64encode(b"deploy:TestOnlyDockerPw8").decode(),
}


@dataclass(frozen=True)
class Plant:
    path: str  # image-absolute
    content: str
    rule: str
    kind: FindingKind
    line: int | None
    severity: Severity | None = None


def plants(k: Keys) -> list[Plant]:
    S, R = FindingKind.SECRET, FindingKind.RESIDUE
    gcp = {
        "type": "service_account",
        "project_id": "amiforge-test",
        "private_key_id": "0" * 40,
        "private_key": k.pkcs8,
        "client_email": "test-only@amiforge-test.iam.gserviceaccount.com",
    }
    return [
        # Private keys, in every armour.
        Plant("/root/.ssh/id_rsa", k.rsa_traditional, "private-key", S, 1, Severity.CRITICAL),
        Plant("/home/deploy/.ssh/id_ed25519", k.ed25519_openssh, "private-key", S, 1),
        Plant("/opt/app/certs/ec.key", "# test only\n\n" + k.ec_traditional, "private-key", S, 3),
        Plant("/etc/ssl/private/service.pk8", k.pkcs8, "private-key", S, 1),
        Plant("/opt/app/certs/encrypted.pk8", k.pkcs8_encrypted, "private-key", S, 1),
        Plant("/etc/legacy/dsa.key", k.dsa_traditional, "private-key", S, 1),
        Plant("/home/deploy/secring.asc", "# exported\n" + synthetic_pgp_block(), "private-key", S, 2),
        # AWS: an id alone, an id with its secret nearby, a credentials file.
        Plant(
            "/opt/app/config.py",
            f'"""Settings."""\nimport os\n\nAWS_ACCESS_KEY_ID = "{AWS_ID}"\n',
            "aws-access-key",
            S,
            4,
            Severity.HIGH,
        ),
        Plant(
            "/etc/backup/s3.ini",
            f"[s3]\naccess_key = {AWS_ID_2}\nbucket = test\nsecret_key = {AWS_SECRET}\n",
            "aws-access-key",
            S,
            2,
            Severity.CRITICAL,
        ),
        Plant(
            "/root/.aws/credentials",
            f"[default]\naws_access_key_id = {AWS_ID}\naws_secret_access_key = {AWS_SECRET_2}\n",
            "aws-credentials",
            S,
            3,
            Severity.CRITICAL,
        ),
        # GCP, Azure.
        Plant("/opt/gcp/service-account.json", json.dumps(gcp, indent=2), "gcp-service-account-key", S, 5),
        Plant(
            "/etc/default/azure-app",
            f"AZURE_TENANT_ID=test\nAZURE_CLIENT_ID=test\nAZURE_CLIENT_SECRET={AZURE_SECRET}\n",
            "azure-client-secret",
            S,
            3,
        ),
        Plant(
            "/home/deploy/.azure/accessTokens.json",
            '[{"accessToken": "TestOnlyAzureAccessToken"}]',
            "azure-token-cache",
            S,
            None,
        ),
        Plant("/root/.azure/msal_token_cache.json", '{"AccessToken": {"x": {}}}', "azure-token-cache", S, None),
        # netrc, kubeconfig (by path and by content), .env, Docker.
        Plant(
            "/root/.netrc",
            f"machine git.example.test\n  login deploy\n  password {PASSWORDS['netrc']}\n",
            "netrc-password",
            S,
            3,
        ),
        Plant(
            "/home/deploy/.kube/config",
            f"apiVersion: v1\nclusters: []\nusers:\n- name: deploy\n  user:\n    token: {PASSWORDS['kube']}\n",
            "kubeconfig-credentials",
            S,
            6,
        ),
        Plant(
            "/opt/cluster/admin.yaml",
            "apiVersion: v1\nkind: Config\nusers:\n- name: admin\n  user:\n"
            f"    client-key-data: {base64.b64encode(k.rsa_traditional.encode()).decode()}\n",
            "kubeconfig-credentials",
            S,
            6,
        ),
        Plant(
            "/opt/app/.env",
            f"DEBUG=1\nEMPTY_TOKEN=\nDB_PASSWORD={PASSWORDS['dotenv']}\nOTHER_KEY=${{FROM_ELSEWHERE}}\n",
            "dotenv-secret",
            S,
            3,
        ),
        Plant(
            "/root/.docker/config.json",
            json.dumps({"auths": {"registry.example.test": {"auth": PASSWORDS["docker"]}}}, indent=1),
            "docker-config-auth",
            S,
            4,
        ),
        # Tokens.
        Plant("/home/deploy/notes.txt", f"todo\n\ngh token: {GITHUB}\n", "github-token", S, 3),
        Plant("/opt/ci/pat.txt", f"{GITHUB_PAT}\n", "github-token", S, 1),
        Plant("/etc/gitlab-runner/token", f"# runner\ntoken = {GITLAB}\n", "gitlab-token", S, 2),
        Plant("/opt/bot/slack.conf", f"[slack]\nbot_token={SLACK}\n", "slack-token", S, 2),
        # Database URLs.
        Plant(
            "/opt/app/database.yml",
            f"production:\n  url: postgres://app:{PASSWORDS['pg']}@db.internal:5432/app\n",
            "database-url-password",
            S,
            2,
        ),
        Plant(
            "/etc/myapp/db.conf",
            f"# db\nDSN=mysql://app:{PASSWORDS['mysql']}@127.0.0.1/app\n",
            "database-url-password",
            S,
            2,
        ),
        Plant(
            "/opt/app/mongo.txt",
            f"mongodb+srv://svc:{PASSWORDS['mongo']}@cluster0.example.test/db\n",
            "database-url-password",
            S,
            1,
        ),
        Plant(
            "/home/deploy/cache.conf",
            f"\n\n\nurl = redis://:{PASSWORDS['redis']}@cache:6379/0\n",
            "database-url-password",
            S,
            4,
        ),
        # Residue.
        Plant("/etc/ssh/ssh_host_ed25519_key", k.host_key, "ssh-host-key", R, None),
        Plant("/etc/machine-id", "0123456789abcdef0123456789abcdef\n", "machine-id", R, None),
        Plant("/var/lib/systemd/credential.secret", "x" * 32, "systemd-credential-secret", R, None),
        Plant("/root/.bash_history", "ls\napt-get update\n", "shell-history", R, None),
        Plant("/root/.lesshst", ".less-history-file:\n", "shell-history", R, None),
        Plant("/root/.viminfo", "# viminfo\n", "shell-history", R, None),
        Plant("/root/.mysql_history", "select 1;\n", "shell-history", R, None),
        Plant("/home/deploy/.zsh_history", ": 1:0;ls\n", "shell-history", R, None),
        Plant("/home/deploy/.python_history", "print(1)\n", "shell-history", R, None),
        Plant("/var/lib/postgresql/.psql_history", "\\dt\n", "shell-history", R, None),
        Plant(
            "/var/lib/cloud/instances/i-0test/user-data.txt",
            "#cloud-config\nhostname: test\n",
            "cloud-init-user-data",
            R,
            None,
        ),
        Plant(
            "/root/.ssh/authorized_keys",
            f"# added by hand\n{k.ed25519_public} stranger@test\n",
            "unexpected-authorized-keys",
            R,
            2,
        ),
    ]


def quiet_files(k: Keys) -> dict[str, str]:
    """Files that look a bit like secrets and are not."""
    return {
        "/etc/ssl/certs/test.pem": k.public_pem,
        "/home/deploy/.ssh/id_ed25519.pub": k.ed25519_public + "\n",
        "/etc/ssh/ssh_host_ed25519_key.pub": k.ed25519_public + "\n",
        "/home/deploy/.ssh/authorized_keys": k.ed25519_public + " deploy@test\n",  # expected: the recipe put it
        "/usr/share/doc/openssl/README": 'A key file starts with "-----BEGIN RSA PRIVATE KEY-----".\n',
        "/usr/lib/python3/dist-packages/x.py": 'HEADER = b"-----BEGIN OPENSSH PRIVATE KEY-----"\n',
        # A self-test key compiled into a library (as in libgnutls): a C string, after a NUL.
        "/usr/lib/x86_64-linux-gnu/libtest.so.1": "\x7fELF\x00\x00" + k.pkcs8 + "\x00\x00",
        "/usr/share/doc/app/README": "connect with postgres://user:password@localhost/db or ${DATABASE_URL}\n"
        "mysql://root:<password>@host/db  redis://:${REDIS_PASSWORD}@cache\n",
        "/usr/share/doc/aws/example.txt": "aws_access_key_id = AKIASYNTHETICEXAMPLE\n",
        "/opt/app/.env.example": "DB_PASSWORD=changeme\nAPI_TOKEN=\n",
        "/opt/app/.env.local": "DEBUG=true\nSECRET_KEY=${SECRET_FROM_VAULT}\n",
        "/etc/machine-id.bak": "",
        "/home/deploy/.bash_history": "",  # empty: nothing leaked
        "/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages": "Package: x\n",
        "/etc/environment": 'PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"\n',
        "/etc/passwd": "root:x:0:0:root:/root:/bin/bash\n"
        "postgres:x:105:110::/var/lib/postgresql:/bin/bash\n"
        "deploy:x:1000:1000::/home/deploy:/bin/bash\n",
        "/proc/1/environ": f"GITHUB_TOKEN={GITHUB}",  # runtime filesystems are not the image
        "/run/secrets/token": GITHUB,
        "/opt/app/hashes.txt": "da39a3ee5e6b4b0d3255bfef95601890afd80709  AKIA-not-a-key.txt\n",
    }


def write(root: Path, image_path: str, content: str) -> Path:
    host = root / image_path.lstrip("/")
    host.parent.mkdir(parents=True, exist_ok=True)
    host.write_text(content)
    return host


@pytest.fixture
def planted(tmp_path: Path, keys: Keys) -> tuple[Path, list[Plant]]:
    root = tmp_path / "rootfs"
    items = plants(keys)
    for p in items:
        write(root, p.path, p.content)
    for path, content in quiet_files(keys).items():
        write(root, path, content)
    (root / "var/lib/cloud/instance").symlink_to("instances/i-0test")  # the usual link: reported via its target
    (root / "var/lib/cloud/seed/nocloud").mkdir(parents=True)
    (root / "var/lib/cloud/seed/nocloud/user-data").write_text("#cloud-config\n")  # shipped on purpose
    return root, items


def scan(root: Path) -> list[Finding]:
    return scan_tree(root, expected_authorized_keys=["/home/deploy/.ssh/authorized_keys"])


def test_every_planted_kind_is_found_once_with_rule_kind_and_line(planted: tuple[Path, list[Plant]]) -> None:
    root, items = planted
    findings = scan(root)
    by_path: dict[str, list[Finding]] = {}
    for f in findings:
        assert f.path is not None
        by_path.setdefault(f.path, []).append(f)

    for p in items:
        got = by_path.pop(p.path, [])
        assert len(got) == 1, f"{p.path}: expected one {p.rule}, got {got}"
        f = got[0]
        assert (f.id, f.kind, f.line) == (p.rule, p.kind, p.line), f"{p.path}: {f}"
        assert f.source == ("residue" if p.kind is FindingKind.RESIDUE else "secrets")
        if p.severity is not None:
            assert f.severity is p.severity, f"{p.path}: {f.severity}"
    # Beyond the planted files, only the cloud-init instance directory itself.
    assert [(path, [f.id for f in fs]) for path, fs in by_path.items()] == [
        ("/var/lib/cloud/instances/i-0test", ["cloud-init-state"])
    ]


def test_no_secret_value_leaks_into_findings(planted: tuple[Path, list[Plant]], keys: Keys) -> None:
    root, _ = planted
    findings = scan(root)
    dumped = json.dumps([dataclasses.asdict(f) for f in findings]) + repr(findings)
    values = [GITHUB, GITHUB_PAT, GITLAB, SLACK, AWS_SECRET, AWS_SECRET_2, AZURE_SECRET, *PASSWORDS.values()]
    for value in values:
        assert value not in dumped
        assert value[4:] not in dumped  # not even the part after a token's well-known prefix
    for pem in (keys.rsa_traditional, keys.ed25519_openssh, keys.pkcs8, keys.host_key, keys.dsa_traditional):
        body_line = pem.splitlines()[1]
        assert body_line not in dumped
        assert body_line[:16] not in dumped
    # The redacted text still says what was found.
    redacted = {f.path: f.redacted for f in findings}
    assert redacted["/root/.ssh/id_rsa"] == "-----BEGIN RSA PRIVATE KEY----- …"
    assert redacted["/home/deploy/notes.txt"] == "ghp_…(40 chars)"
    assert redacted["/opt/app/database.yml"] == "postgres://app:…(13 chars)@db.internal:5432"


def test_symlinks_out_of_the_tree_and_special_files_are_not_followed(tmp_path: Path, keys: Keys) -> None:
    outside = tmp_path / "host"
    write(outside, "/secret/id_rsa", keys.rsa_traditional)
    write(outside, "/secret/.bash_history", "history\n")
    root = tmp_path / "rootfs"
    (root / "opt").mkdir(parents=True)
    (root / "root").mkdir()
    (root / "opt/key.pem").symlink_to(outside / "secret/id_rsa")  # absolute, pointing at the host
    (root / "opt/dir").symlink_to(outside / "secret")  # a directory link: os.walk must not descend
    (root / "opt/rel").symlink_to("../../host/secret/id_rsa")  # relative, climbing out
    (root / "root/.bash_history").symlink_to(outside / "secret/.bash_history")
    os.mkfifo(root / "opt/fifo")  # reading it would block forever
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "opt/sock"))
        assert scan_tree(root) == []


def test_size_cap_skips_content_but_path_rules_still_apply(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    write(root, "/opt/big.txt", "x" * 200 + " " + GITHUB)
    write(root, "/root/.bash_history", "y" * 500)
    write(root, "/root/.aws/credentials", "[default]\n" + "z" * 500)
    findings = scan_tree(root, max_file_bytes=100)
    assert [(f.path, f.id) for f in findings] == [
        ("/root/.aws/credentials", "aws-credentials"),
        ("/root/.bash_history", "shell-history"),
    ]
    assert "not read" in findings[0].title
    assert [f.id for f in scan_tree(root)] == ["github-token", "shell-history"]  # credentials lack a secret


def test_machine_id_empty_or_uninitialized_is_clean(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    write(root, "/etc/machine-id", "")
    assert scan_tree(root) == []
    write(root, "/etc/machine-id", "uninitialized\n")
    assert scan_tree(root) == []
    write(root, "/var/lib/dbus/machine-id", "0123456789abcdef0123456789abcdef\n")
    assert [f.id for f in scan_tree(root)] == ["machine-id"]


def test_expected_keys_and_homes_follow_the_images_own_symlinks(tmp_path: Path, keys: Keys) -> None:
    root = tmp_path / "rootfs"
    write(root, "/var/home/ops/.ssh/authorized_keys", keys.ed25519_public + "\n")
    write(root, "/var/home/ops/.bash_history", "ls\n")
    (root / "home").symlink_to("var/home")  # as on an image whose /home is a link
    findings = scan_tree(root, expected_authorized_keys=["/home/ops/.ssh/authorized_keys"])
    assert [(f.path, f.id) for f in findings] == [("/var/home/ops/.bash_history", "shell-history")]
    unexpected = scan_tree(root)
    assert {f.id for f in unexpected} == {"shell-history", "unexpected-authorized-keys"}
    key = next(f for f in unexpected if f.id == "unexpected-authorized-keys")
    assert key.redacted is not None and key.redacted.startswith("ssh-ed25519 SHA256:")


def test_missing_root_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        scan_tree(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------------------
# False positives on real files


def host_sample() -> Iterator[tuple[Path, str]]:
    """Readable regular files from the host: /etc/*.conf, /etc/ssl/certs, /usr/share/doc/*/copyright."""
    patterns = [
        ("/etc", "*.conf"),
        ("/etc", "*/*.conf"),
        ("/etc/ssl/certs", "*.pem"),
        ("/usr/share/doc", "*/copyright"),
    ]
    for base, pattern in patterns:
        for src in sorted(Path(base).glob(pattern))[:400]:
            if src.is_file() and os.access(src, os.R_OK) and src.stat().st_size < 1024 * 1024:
                yield src, str(src)


def test_real_debian_files_do_not_drown_in_false_positives(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    copied = 0
    for src, image_path in host_sample():
        dest = root / image_path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src, dest)  # resolves the host's symlinks (certs) into plain copies
        except OSError:
            continue
        copied += 1
    required_or_skip(copied >= 100, f"only {copied} host files to sample", "run on a Debian host with /etc and /usr")
    findings = scan_tree(root)
    for f in findings:
        print(f"false positive? {f.id} {f.path}:{f.line} {f.redacted}")
    print(f"{len(findings)} finding(s) in {copied} real files")
    assert len(findings) <= 1


# ----------------------------------------------------------------------------------------------------------
# Raw disk


def mkfs(image: Path, source: Path) -> None:
    tool = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    required_or_skip(Path(tool).exists(), "e2fsprogs is not installed", "scripts/bootstrap.sh installs e2fsprogs")
    with image.open("wb") as fh:
        fh.truncate(16 * 1024 * 1024)
    subprocess.run([tool, "-q", "-F", "-d", str(source), str(image)], check=True, capture_output=True)


def test_raw_scan_finds_a_deleted_key_and_a_fresh_filesystem_has_none(tmp_path: Path, keys: Keys) -> None:
    src = tmp_path / "src"
    write(src, "/key", keys.rsa_traditional)
    write(src, "/etc/motd", "hello\n")
    dirty = tmp_path / "dirty.img"
    mkfs(dirty, src)
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
    subprocess.run([debugfs, "-w", "-R", "rm /key", str(dirty)], check=True, capture_output=True)
    listing = subprocess.run([debugfs, "-R", "ls -l /", str(dirty)], check=True, capture_output=True, text=True)
    assert " key" not in listing.stdout  # deleted from the filesystem…

    found = scan_raw(dirty)  # …but not from the disk
    assert [(f.id, f.kind, f.severity, f.source) for f in found] == [
        ("private-key", FindingKind.SECRET, Severity.CRITICAL, "raw-disk")
    ]
    assert found[0].path is not None and found[0].path.startswith(f"{dirty}@")
    offset = int(found[0].path.rsplit("@", 1)[1])
    assert dirty.read_bytes()[offset:].startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert found[0].redacted == "-----BEGIN RSA PRIVATE KEY----- …"
    assert scan_raw(dirty, chunk=8 * 1024) == found  # small chunks: many boundaries, same answer

    (src / "key").unlink()
    clean = tmp_path / "clean.img"
    mkfs(clean, src)
    assert scan_raw(clean) == []  # what every amiforge bake relies on


def test_raw_scan_across_chunk_boundaries(tmp_path: Path, keys: Keys) -> None:
    key = keys.pkcs8.encode()
    blob = b"openssh-key-v1\x00\x00\x00\x00\x04none\x00\x00\x00\x04none"
    disk = bytearray(200_000)
    # A key file's data starts on a block boundary (1024) or a key follows text (8190); one that follows a NUL
    # off a boundary is a C string compiled into a binary (30_001), like libgnutls' self-test keys.
    offsets = {
        1024: key,
        4093: AWS_ID.encode(),
        8189: b"\n" + key,
        16_380: blob,
        30_001: key,
        40_000: AWS_ID_2.encode(),
    }
    for at, data in offsets.items():
        disk[at : at + len(data)] = data
    disk[60_000:60_021] = b"XAKIATESTONLY22222222"  # inside a longer run: not an id
    disk[70_000:70_020] = b"openssh-key-v1\x00%s: "  # the bare magic, as in the ssh binaries
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(disk))
    expected = [
        (f"{path}@1024", "private-key"),
        (f"{path}@4093", "aws-access-key"),
        (f"{path}@8190", "private-key"),
        (f"{path}@16380", "private-key"),
        (f"{path}@40000", "aws-access-key"),
    ]
    for chunk in (2048, 4096, 5000, 8192, 1 << 20):
        assert [(f.path, f.id) for f in scan_raw(path, chunk=chunk)] == expected, chunk


def test_raw_scan_of_a_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        scan_raw(tmp_path / "nope.qcow2")
