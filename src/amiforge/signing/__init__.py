"""Signed manifests: DSSE envelopes over in-toto statements; Ed25519 key files or AWS KMS."""
