"""Host keys read from an EC2 serial console as cloud-init prints them, and the throw-away key pair.

The console excerpts follow cloud-init's own output: tools/write-ssh-key-fingerprints logs the fingerprints through
`logger -s -t cloud-init` (the `<14>… cloud-init:` lines) and echoes the key block itself, `cat` of each
/etc/ssh/ssh_host_*key.pub between the BEGIN/END lines; cc_keys_to_console writes that to the console, among the
kernel's and systemd's own lines. The keys are made here.
"""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from amiforge.errors import ConfigError
from amiforge.providers.aws.ssh import host_keys_from_console, new_key_pair

HOST = "root@ip-172-31-5-10"


def public_line(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    """'TYPE BASE64', as host_keys_from_console returns a key."""
    raw = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode()


ED25519 = public_line(ed25519.Ed25519PrivateKey.generate())
ECDSA = public_line(ec.generate_private_key(ec.SECP256R1()))
RSA = public_line(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def console(*blocks: str, boot: str = "") -> str:
    return (
        f"{boot}[    0.000000] Linux version 6.1.0-28-cloud-amd64 (debian-kernel@lists.debian.org)\n"
        "[   11.482113] cloud-init[598]: Cloud-init v. 22.4.2 running 'modules:config' at Sun, 06 Dec 2026 09:31:01\n"
        + "".join(blocks)
        + "[   13.902417] cloud-init[640]: Cloud-init v. 22.4.2 finished at Sun, 06 Dec 2026 09:31:03 +0000.\n"
        "\nDebian GNU/Linux 12 ip-172-31-5-10 ttyS0\n\nip-172-31-5-10 login: "
    )


def fingerprints() -> str:
    log = "<14>Dec  6 09:31:02 cloud-init: "
    return (
        f"{log}#############################################################\n"
        f"{log}-----BEGIN SSH HOST KEY FINGERPRINTS-----\n"
        f"{log}256 SHA256:Jv1Hq4zWQmH2mQ4C2vHcdl3b8cO8n1v0i3S9n0lUQ8Y {HOST} (ECDSA)\n"
        f"{log}256 SHA256:0qkzV4oA3tJbqN2W1mvcRWc8x9kX3bq0bG9dqM3eQ3k {HOST} (ED25519)\n"
        f"{log}3072 SHA256:r3GxQ8qkq4mB1w8v2a5o3b6c7d8e9f0g1h2i3j4k5l6 {HOST} (RSA)\n"
        f"{log}-----END SSH HOST KEY FINGERPRINTS-----\n"
        f"{log}#############################################################\n"
    )


def key_block(*lines: str) -> str:
    return (
        "-----BEGIN SSH HOST KEY KEYS-----\n"
        + "".join(f"{line}\n" for line in lines)
        + "-----END SSH HOST KEY KEYS-----\n"
    )


def test_keys_between_the_markers_without_their_comments() -> None:
    text = console(fingerprints(), key_block(f"{ECDSA} {HOST}", f"{ED25519} {HOST}", f"{RSA} {HOST}"))
    assert host_keys_from_console(text) == [ECDSA, ED25519, RSA]


def test_nothing_before_cloud_init_printed_the_whole_block() -> None:
    assert host_keys_from_console("") == []
    assert host_keys_from_console(console(fingerprints())) == []
    cut = console(fingerprints(), key_block(f"{ECDSA} {HOST}", f"{ED25519} {HOST}"))
    assert host_keys_from_console(cut[: cut.index("-----END SSH HOST KEY KEYS-----")]) == []


def test_the_last_complete_block_counts() -> None:
    # Booted twice: the keys printed last are the ones the server has now; a block still being printed is not yet.
    old = key_block(f"{public_line(ed25519.Ed25519PrivateKey.generate())} {HOST}")
    text = console(old, boot="") + console(fingerprints(), key_block(f"{ED25519} {HOST}"))
    assert host_keys_from_console(text) == [ED25519]
    assert host_keys_from_console(text + "-----BEGIN SSH HOST KEY KEYS-----\n" + ECDSA) == [ED25519]


def test_carriage_returns_and_prefixes_are_tolerated() -> None:
    block = key_block(f"{ECDSA} {HOST}", f"[   12.1] cloud-init[612]: {ED25519} {HOST}").replace("\n", "\r\n")
    assert host_keys_from_console(console(block)) == [ECDSA, ED25519]


def test_a_line_broken_by_kernel_messages_is_left_out() -> None:
    kind, blob = ED25519.split()
    broken = f"{kind} {blob[:30]}[   12.734410] random: crng init done\n{blob[30:]} {HOST}"
    assert host_keys_from_console(console(key_block(f"{ECDSA} {HOST}", broken))) == [ECDSA]


def test_a_blob_of_another_type_than_it_claims_is_left_out() -> None:
    _kind, ecdsa_blob = ECDSA.split()
    forged = f"ssh-ed25519 {ecdsa_blob} {HOST}"
    assert host_keys_from_console(console(key_block(forged, f"{RSA} {HOST}"))) == [RSA]


def test_new_key_pair_is_a_matching_ed25519_pair() -> None:
    private, public = new_key_pair("amiforge-run42")
    kind, blob, comment = public.split(" ")
    assert (kind, comment) == ("ssh-ed25519", "amiforge-run42")
    key = serialization.load_ssh_private_key(private.encode(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert public_line(key) == f"{kind} {blob}"
    assert private.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert base64.b64decode(blob)[4:15] == b"ssh-ed25519"
    assert new_key_pair("x")[0] != new_key_pair("x")[0]


@pytest.mark.parametrize("comment", ["", "two\nlines", "tab\there", " leading", "é"])
def test_new_key_pair_refuses_comments_that_break_the_line(comment: str) -> None:
    with pytest.raises(ConfigError):
        new_key_pair(comment)
