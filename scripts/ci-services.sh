#!/usr/bin/env bash
# Installs and starts what the image tests (tests/packaging) need, on a Debian 12 machine, as root:
#   - a Docker engine (Debian's docker.io; dockerd in the background, log in $STATE/log/dockerd.log)
#   - a Distribution registry on 127.0.0.1:5000 (Debian's docker-registry; storage in $STATE/registry)
#   - a Python 3.11 base image built from Debian's packages (no image can be pulled from the internet
#     here), with the host's extra CA certificates, as $BASE in the engine and pushed to the registry
#     as $REGISTRY/$BASE (where the daemonless builder takes it from).
# Idempotent: what runs already is left alone, the base image is built only when missing (its
# rootfs tarball is cached in $STATE). Fails loudly: any step that does not work stops the script
# with a message and a non-zero exit.
set -euo pipefail

STATE=${SERVE_KIT_CI_STATE:-/var/lib/serve-kit-ci}
REGISTRY=${SERVE_KIT_TEST_REGISTRY:-127.0.0.1:5000}
BASE=${SERVE_KIT_TEST_BASE:-serve-kit/python:3.11-bookworm}
MIRROR=${SERVE_KIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SERVE_KIT_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

die() { echo "ci-services: ERROR: $*" >&2; exit 1; }
say() { echo "ci-services: $*" >&2; }
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

[ "$(id -u)" = 0 ] || die "must run as root (installs Debian packages and starts dockerd)"
mkdir -p "$STATE/log" "$STATE/registry"

# -- packages ------------------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Debian's docker-registry starts its own service where systemd runs; we start ours below.
    apt-get install -y -qq "${need[@]}" >"$STATE/log/apt.log" 2>&1 \
        || { tail -20 "$STATE/log/apt.log" >&2; die "apt-get install ${need[*]} failed"; }
fi

# -- Docker engine -------------------------------------------------------------------------------
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq "$seconds"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    return 1
}

if ! docker info >/dev/null 2>&1; then
    if [ -S /var/run/docker.sock ] && ! pgrep -x dockerd >/dev/null; then
        rm -f /var/run/docker.sock /var/run/docker.pid  # left by an engine that is gone
    fi
    if ! pgrep -x dockerd >/dev/null; then
        say "starting dockerd (log: $STATE/log/dockerd.log)"
        # setsid: the engine outlives this script (the test run that follows uses it).
        setsid dockerd --host=unix:///var/run/docker.sock >>"$STATE/log/dockerd.log" 2>&1 </dev/null &
    fi
    wait_for 60 "docker info" docker info \
        || { tail -30 "$STATE/log/dockerd.log" >&2; die "the Docker engine did not answer within 60 s"; }
fi
say "docker engine: $(docker version --format '{{.Server.Version}}')"

# -- registry on 127.0.0.1 -----------------------------------------------------------------------
registry_up() { python3 -c "import urllib.request; urllib.request.urlopen('http://$REGISTRY/v2/', timeout=2)"; }
if ! registry_up 2>/dev/null; then
    # It only ever holds test pushes and the base (pushed again below): start empty, so that runs do
    # not pile up image layers.
    rm -rf "$STATE/registry" && mkdir -p "$STATE/registry"
    cat >"$STATE/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $STATE/registry
  delete:
    enabled: true
http:
  addr: $REGISTRY
EOF
    say "starting docker-registry on $REGISTRY (log: $STATE/log/registry.log)"
    setsid docker-registry serve "$STATE/registry.yml" >>"$STATE/log/registry.log" 2>&1 </dev/null &
    wait_for 30 "registry" registry_up \
        || { tail -30 "$STATE/log/registry.log" >&2; die "the registry on $REGISTRY did not answer within 30 s"; }
fi

# -- base image: Python 3.11 from Debian's packages ----------------------------------------------
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    rootfs="$STATE/python-3.11-bookworm.tar"
    if [ ! -f "$rootfs" ] || [ ! -s "$rootfs" ]; then
        rm -rf "$rootfs" "$rootfs.partial"
        say "building the base rootfs with mmdebstrap (about a minute)"
        hooks=()
        if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
            # pip inside the image must trust what the host trusts (e.g. a proxy's CA).
            hooks+=(--customize-hook='mkdir -p "$1/usr/local/share/ca-certificates"'
                    --customize-hook='sync-in /usr/local/share/ca-certificates /usr/local/share/ca-certificates'
                    --customize-hook='chroot "$1" update-ca-certificates')
        fi
        mmdebstrap --variant=apt --mode=root --format=tar \
            --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
            --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
            --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
            "${hooks[@]}" \
            bookworm "$rootfs.partial" \
            "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
            "deb $SECURITY_MIRROR bookworm-security main" >"$STATE/log/mmdebstrap.log" 2>&1 \
            || { tail -30 "$STATE/log/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
        mv "$rootfs.partial" "$rootfs"
    fi
    say "importing $rootfs as $BASE"
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        "$rootfs" "$BASE" >/dev/null
fi
docker run --rm --network=none "$BASE" python3 -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11)' \
    || die "the base image $BASE does not run python3.11"

# The daemonless builder reads the base from the registry (OCI distribution API).
docker tag "$BASE" "$REGISTRY/$BASE"
docker push -q "$REGISTRY/$BASE" >/dev/null || die "could not push the base image to $REGISTRY"
say "ready: engine, registry $REGISTRY, base $BASE (also $REGISTRY/$BASE)"
