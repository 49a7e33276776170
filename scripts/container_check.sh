#!/usr/bin/env bash
# Build the CPU server image (deploy/containers/cpu.Containerfile) and check it as an operator would
# (scripts/container_check.py: serve the demo MiniLM mounted read-only, embed over HTTP and gRPC against the
# offline Embedder, health, refusals of bad mounts and settings, `podman stop` under load, the baked image).
#
# For root on Debian 12 (CI's machines): installs podman, runc and debootstrap with apt when missing, and
# builds a local Debian base image with debootstrap when absent (no container registry is reachable here;
# users build FROM python:3.11-slim). Idempotent: the base image and the build cache are kept, everything
# else it makes (containers, the baked image, the exported artifact, the previous check image) is removed.
# About 7 minutes on a fresh machine, 2-3 when the base image exists.
#
#   bash scripts/container_check.sh
#   MRL_CONTAINER_BASE=python:3.11-slim bash scripts/container_check.sh   # where a registry is reachable
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=build/container-check
BASE=${MRL_CONTAINER_BASE:-localhost/mrl-debian-py:bookworm-slim}
IMAGE=localhost/mrl-serve:cpu-check
mkdir -p "$STATE"
exec 3>&2  # timings go to the terminal even where a step's own output is redirected
t() { local s=$SECONDS; "$@"; echo "[container-check] $1 ${2:-}: $((SECONDS - s)) s" >&3; }

# 1. The engine. runc, not crun (crun fails on these hosts' hybrid cgroups); limits the host allows (root
#    cannot raise nofile here, and podman's defaults ask for more). Our own config file, so /etc is untouched.
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "[container-check] installing ${missing[*]} with apt" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    t apt-get install -y -qq podman runc debootstrap >/dev/null
fi
cat > "$STATE/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$PWD/$STATE/containers.conf"

# 2. The base image: Debian 12 with python3 and venv, from the mirror apt already uses; slim as Docker's
#    debian:bookworm-slim (under python:3.11-slim) is: no docs, man pages or translations, now or later.
if ! podman image exists "$BASE"; then
    [[ "$BASE" == localhost/* ]] || { podman pull "$BASE"; }
fi
if ! podman image exists "$BASE"; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    rootfs=$(mktemp -d "$PWD/$STATE/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    t debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
        "${mirror:-http://deb.debian.org/debian}" >"$STATE/debootstrap.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/man/*' 'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/info/*' \
        >"$rootfs/etc/dpkg/dpkg.cfg.d/slim"
    find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
    rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/info/*
    tar --numeric-owner -C "$rootfs" -c . | t podman import --change 'ENV LANG=C.UTF-8' - "$BASE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi

# 3. The image, built as a user would (pip gets the host's CA bundle: egress TLS is intercepted here), with
#    no layer cache, so no stage image is left behind.
old=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
t podman build --layers=false --format docker -f deploy/containers/cpu.Containerfile --build-arg "BASE=$BASE" \
    --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt --iidfile "$STATE/image-id" -t "$IMAGE" . \
    >"$STATE/build.log" 2>&1 || { tail -40 "$STATE/build.log" >&2; exit 1; }
new=$(cat "$STATE/image-id")
if [ -n "$old" ] && [ "$old" != "sha256:$new" ] && [ "$old" != "$new" ]; then
    podman rmi "$old" >/dev/null 2>&1 || true  # the previous run's image; no other tag points at it
fi

# 4. The host side: .venv (the lock keeps a concurrent scripts/test.sh from building it twice), the artifact.
mkdir -p build
flock build/.setup.lock bash scripts/setup.sh
. "${MRL_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1
exec python scripts/container_check.py --image "$new" --state "$STATE"
