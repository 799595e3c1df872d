"""Real images through the supply-chain gates: scan, sign, verify, promote, tamper, planted secrets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.e2e.conftest import REPO, Cli

pytestmark = pytest.mark.slow

OSV = REPO.parent / "shared" / "data" / "osv-debian"


def test_pipeline_promotes_then_a_flipped_byte_fails_verify_and_promotion(
    cli: Cli, web_recipe: Path, no_leftovers: None
) -> None:
    if OSV.is_dir():
        cli.run("vulndb", "import", str(OSV))
    out = cli.json("pipeline", "run", str(web_recipe), "--promote", "dev")
    ref = out["version"]
    assert out["promoted"]["current"] == ref and out["promoted"]["channel"] == "dev"
    assert out["packages"] > 100
    scan = cli.json("scan", ref)
    assert scan["gate"]["passed"] is True
    assert [f for f in scan["findings"] if f["kind"] in ("secret", "residue")] == []
    cli.json("sign", ref)  # the rescan changed the scan record: sign again
    assert cli.json("verify", ref)["ok"] is True
    spdx = json.loads(cli.run("sbom", ref, "--format", "spdx").stdout)
    assert any(p["name"] == "nginx" for p in spdx["packages"])

    # Tamper: one byte of the stored qcow2 flips after signing.
    disk = Path(cli.json("images", "show", ref)["artifacts"][0]["location"])
    data = bytearray(disk.read_bytes()[:4096])
    with open(disk, "r+b") as fh:
        fh.seek(1000)
        fh.write(bytes([data[1000] ^ 0xFF]))
    bad = cli.json("verify", ref, check=4)
    assert bad["error"] == "gate" and "artifact" in json.dumps(bad["failures"])
    refused = cli.json("promote", ref, "--channel", "dev", check=4)
    assert any(f["name"] == "signature" for f in refused["failures"]) or "signature" in json.dumps(refused)

    # The fix line works: baking again notices the damaged cached disk (every layer hits) and builds it again,
    # so the new version is whole, verifies and is promoted — it is not registered on the flipped bytes.
    assert f"amiforge bake {web_recipe}" in bad["fix"]
    again = cli.json("pipeline", "run", str(web_recipe), "--promote", "dev")
    assert again["version"] != ref and again["promoted"]["current"] == again["version"]
    rebuilt = cli.json("images", "show", again["version"], "--log")
    assert all(layer["hit"] for layer in rebuilt["layers"])
    assert "no longer has the bytes it was made with" in rebuilt["log"]
    assert cli.json("verify", again["version"])["ok"] is True


def _pem(
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat
) -> str:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()


def test_planted_secrets_are_each_found_deleted_ones_leave_nothing_and_no_secret_is_printed(
    cli: Cli, tmp_path: Path, no_leftovers: None
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    rsa_key = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048), serialization.PrivateFormat.PKCS8)
    ed_key = _pem(ed25519.Ed25519PrivateKey.generate(), serialization.PrivateFormat.OpenSSH)
    ec_key = _pem(ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.TraditionalOpenSSL)
    pgp = (
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\n"
        + "lQOYBF"
        + "TestOnlyPgpKeyMaterial" * 3
        + "\n-----END PGP PRIVATE KEY BLOCK-----\n"
    )
    # Obviously synthetic token material, one per kind the scanner knows.
    github = "ghp_" + ("TestOnly" * 5)[:36]
    gitlab = "glpat-" + ("TestOnlyGl" * 3)[:24]
    slack = "xoxb-1234567890-1234567890123-" + "testonly" * 3
    aws_id, aws_secret = "AKIATESTONLY00000000", ("TestOnlySecret/Key+" * 3)[:40]
    gcp = {"type": "service_account", "project_id": "amiforge-test", "private_key_id": "0" * 40,
           "private_key": rsa_key, "client_email": "test-only@amiforge-test.iam.gserviceaccount.com"}  # fmt: skip
    pub = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    planted = {
        "/home/deploy/keys/deploy_ed25519": ed_key,  # OpenSSH
        "/opt/app/server.key": rsa_key,  # PKCS#8
        "/opt/app/ec.key": ec_key,  # EC
        "/etc/app/signing.asc": pgp,  # PGP
        "/etc/app/github-token": f"GITHUB_TOKEN={github}\n",
        "/opt/ci/gitlab.txt": f"token {gitlab}\n",
        "/etc/app/slack.conf": f"webhook_token = {slack}\n",
        "/home/deploy/.aws/credentials": (
            f"[default]\naws_access_key_id = {aws_id}\naws_secret_access_key = {aws_secret}\n"
        ),
        "/opt/app/gcp-sa.json": json.dumps(gcp),
        "/etc/app/azure.env": (
            "AZURE_TENANT_ID=test\nAZURE_CLIENT_ID=test\nAZURE_CLIENT_SECRET=TestOnly~AzureSecret~00\n"
        ),
        "/home/deploy/.kube/config": (
            "apiVersion: v1\nusers:\n- name: d\n  user:\n    token: TestOnlyKubeBearerToken7\n"
        ),
        "/home/deploy/.netrc": "machine example.invalid login deploy password TEST-not-a-real-password\n",
        "/opt/app/.env": "DB_PASSWORD=TEST-synthetic-password\n",
        "/opt/app/database.yml": "production:\n  url: postgres://app:TestOnlyPgPw1@db.internal:5432/app\n",
        "/home/deploy/.ssh/authorized_keys": pub.decode() + " test-only\n",  # not installed by a user step
    }
    build_key = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                     serialization.PrivateFormat.TraditionalOpenSSL)  # fmt: skip
    # Deleted by a later step, or removed by generalisation: a build key in root's .ssh, histories, SSH host keys,
    # cloud-init state, a machine id. None of it may reach the image, as a file or in a free block.
    deleted = {
        "/tmp/build-key.pem": build_key,
        "/root/.ssh/id_rsa": build_key,
        "/root/.bash_history": f"export GITHUB_TOKEN={github}\n",
        "/etc/ssh/ssh_host_ed25519_key": ed_key,
        "/var/lib/cloud/instances/i-test/user-data.txt": f"#cloud-config\npassword: {aws_secret}\n",
    }
    steps = ["  - user: {name: deploy}"]
    for i, (dest, text) in enumerate({**planted, **deleted}.items()):
        (files / f"f{i}").write_text(text)
        steps.append(f'  - file: {{src: files/f{i}, dest: {dest}, mode: "0600"}}')
    steps.append("  - shell: rm -f /tmp/build-key.pem && echo 0123456789abcdef0123456789abcdef > /etc/machine-id")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: leaky\nsteps:\n" + "\n".join(steps) + "\n")
    baked = cli.json("bake", str(recipe))
    # Generalisation says which credentials and histories a step left behind (path and kind, never content).
    assert baked["generalised"] == [
        {"path": "/root/.bash_history", "kind": "shell history"},
        {"path": "/root/.ssh/id_rsa", "kind": "ssh key"},
    ]
    assert build_key not in json.dumps(baked)
    result = cli.run("scan", "leaky@1", "--json", check=4)
    out = json.loads(result.stdout)
    assert out["gate"]["passed"] is False
    paths = {f.get("path") for f in out["findings"]}
    for dest in planted:
        assert dest in paths, f"no finding for {dest}: {out['findings']}"
    # The deleted key is in no file and — because mkfs builds the disk from a directory — in no free block either.
    for gone in [*deleted, "/etc/machine-id"]:
        assert gone not in paths, f"{gone} should be gone: {out['findings']}"
    assert not any(f["source"] == "raw-disk" for f in out["findings"]), out["findings"]
    # Nothing secret in any output: not the scan's, not the registry's.
    shown = cli.run("images", "show", "leaky@1", "--json").stdout + result.stdout + result.stderr
    for secret in (github, gitlab, slack, aws_secret, "TEST-not-a-real-password", "TEST-synthetic-password",
                   "TestOnlyPgPw1", "TestOnlyKubeBearerToken7"):  # fmt: skip
        assert secret not in shown
    for key in (rsa_key, ed_key, ec_key, build_key):
        body = key.splitlines()[1]
        assert body not in shown
    assert os.environ.get("AMIFORGE_DEBUG") is None
