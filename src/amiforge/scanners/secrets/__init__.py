"""Secrets and build residue inside an image: what must never ship in a golden image (docs/architecture.md §8).

- `scan_tree(rootfs)` reads the files of an image's root filesystem (a directory) and reports credentials
  (kind SECRET, source "secrets") and leftovers that break clones (kind RESIDUE, source "residue").
- `scan_raw(disk)` reads a disk image file as bytes and reports key material, including what sits in blocks a
  filesystem has freed: deleted is not erased.

Findings are values; the scan gate decides what they mean. A finding never carries a secret: `redacted` holds
at most a recognisable prefix of a token (e.g. "ghp_") and its length, or a PEM header.

The package, by seam:
- `findings`: the closed rule table, redaction, and how a match becomes one Finding per place (reporting);
- `content`: detectors that recognise a credential by what a file says (keys, tokens, URLs, key files);
- `paths`: detectors that recognise a credential or residue by where a file is (histories, ~/.aws/credentials,
  .env, host keys, machine-id, cloud-init state, …);
- `tree`: the walk of a root filesystem that never leaves it and never blocks, and `scan_tree()`;
- `raw`: the chunked scan of a disk image's bytes, and `scan_raw()`.

Where each rule comes from:
- detect-secrets supplies the token formats it maintains: AWS access key ids (AWSKeyDetector), GitHub tokens
  (GitHubTokenDetector), GitLab tokens (GitLabTokenDetector), Slack tokens and webhooks (SlackDetector). We run
  their `denylist` patterns ourselves with `finditer`, because `analyze_line` may call a plugin's `verify()` (a
  network request to AWS or Slack from a build host) and `analyze_string` yields capture groups ("ghp") rather
  than the token and where it is.
- Own rules for the rest: private keys (a PEM/PGP/PuTTY header *followed by a key body*, so the many programs and
  documents that merely mention "BEGIN RSA PRIVATE KEY" stay quiet; detect-secrets' PrivateKeyDetector matches the
  bare header and misses PKCS#8 "ENCRYPTED PRIVATE KEY"), the AWS secret key next to an id, GitHub fine-grained
  tokens (github_pat_), database URLs with a password, Azure client secrets, GCP service-account keys, and the
  file formats that are credentials by where they live (~/.aws/credentials, .netrc, kubeconfig, .env, Docker and
  Azure token caches), plus every residue rule.
- Not used: detect-secrets' high-entropy and keyword plugins. On a Debian root filesystem they fire on every
  checksum, base64 blob and manual page that says "password".

Speed: a root filesystem is tens of thousands of files. Each content rule is gated by literal-prefixed byte
patterns (CPython's regex engine searches a literal prefix at memory speed, while an alternation of many
alternatives is an order of magnitude slower), so the detailed patterns only run on the few files that can match.
"""

from __future__ import annotations

from amiforge.scanners.secrets.raw import DEFAULT_RAW_CHUNK, data_extents, scan_raw
from amiforge.scanners.secrets.tree import DEFAULT_MAX_FILE_BYTES, scan_tree

__all__ = ["DEFAULT_MAX_FILE_BYTES", "DEFAULT_RAW_CHUNK", "data_extents", "scan_raw", "scan_tree"]
