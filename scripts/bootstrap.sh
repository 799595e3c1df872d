#!/usr/bin/env bash
# Installs what amiforge needs on a Debian machine, only what is missing, then the Python venv.
#   scripts/bootstrap.sh          tools for `make demo` (mmdebstrap, QEMU, e2fsprogs, busybox-static, …)
#   scripts/bootstrap.sh --test   the same, plus what the test suite needs (PostgreSQL server; an OpenSSH server
#                                 and sudo, which the SSH communicator's tests run on loopback; systemd-analyze,
#                                 which checks the units amiforge bakes in; Prometheus and Alertmanager, whose
#                                 promtool and amtool check the rules and routes amiforge exports, and whose server
#                                 the telemetry e2e scrapes amiforge with; Chromium, in which the web console's
#                                 tests run, headless; axe-core from the npm registry, pinned, for their
#                                 accessibility checks)
# Idempotent: a second run with nothing missing takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(mmdebstrap qemu-system-x86 qemu-utils e2fsprogs busybox-static cpio util-linux coreutils ca-certificates)
if [ "${1:-}" = "--test" ]; then
    packages+=(postgresql openssh-server sudo systemd prometheus prometheus-alertmanager chromium)
    command -v npm >/dev/null || packages+=(npm)
fi
python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "bootstrap: run as root (or install sudo) to install ${missing[*]}" >&2; exit 1; }
        sudo="sudo"
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp=.venv/.amiforge-installed
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    echo "bootstrap: creating .venv with amiforge and the dependency versions of constraints.txt"
    python3 -m venv .venv
    # (this machine's pip config names extra local indexes that may be absent: keep their warnings out)
    .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,postgres]' 2>&1 \
        | { grep -v '^WARNING: Location' || true; }
    touch "$stamp"
fi

if [ "${1:-}" = "--test" ]; then
    scripts/fetch_axe.sh
fi
