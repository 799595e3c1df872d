#!/usr/bin/env bash
# Fetches axe-core (the accessibility rules tests/unit/test_console_browser.py runs in the console's pages) from the
# npm registry at a pinned version, checks the tarball against the pinned sha512 integrity, and unpacks it into
# .cache/axe-core/package/ (axe.min.js). Nothing of it is committed, and the test never fetches it itself.
# Idempotent: with the pinned version already unpacked, it does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=4.11.0
# npm view axe-core@4.11.0 dist.integrity
INTEGRITY=sha512-ilYanEU8vxxBexpJd8cWM4ElSQq4QctCLKih0TSfjIfCQTeyH/6zVrmIJfLPrKTKJRbiG+cfnZbQIjAlJmF1jQ==
DEST=.cache/axe-core

installed() {
    [ -s "$DEST/package/axe.min.js" ] && [ -f "$DEST/package/package.json" ] &&
        python3 -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["version"] != sys.argv[2])' \
            "$DEST/package/package.json" "$VERSION"
}

if installed; then
    exit 0
fi
command -v npm >/dev/null || { echo "fetch_axe: npm is needed (apt-get install npm)" >&2; exit 1; }

mkdir -p .cache
work=$(mktemp -d .cache/axe-core.XXXXXX)
trap 'rm -rf "$work"' EXIT

echo "fetch_axe: npm pack axe-core@$VERSION"
(cd "$work" && npm pack --silent "axe-core@$VERSION" >/dev/null)
tarball="$work/axe-core-$VERSION.tgz"
[ -f "$tarball" ] || { echo "fetch_axe: npm pack made no $tarball" >&2; exit 1; }

actual="sha512-$(python3 -c 'import base64, hashlib, sys; print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tarball")"
if [ "$actual" != "$INTEGRITY" ]; then
    echo "fetch_axe: axe-core-$VERSION.tgz is $actual, not the pinned $INTEGRITY: refusing it" >&2
    exit 1
fi

mkdir "$work/unpacked"
tar -xzf "$tarball" -C "$work/unpacked" package/axe.min.js package/package.json package/LICENSE
rm -rf "$DEST"
mv "$work/unpacked" "$DEST"
echo "fetch_axe: axe-core $VERSION in $DEST/package/axe.min.js"
