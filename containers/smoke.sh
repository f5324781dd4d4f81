#!/usr/bin/env bash
# Smoke test of containers/Dockerfile, built and run for real (CPU variant).
#
#   bash containers/smoke.sh            # as root, on a Debian/Ubuntu host; about 5-10 minutes
#
# 1. Installs podman, buildah and debootstrap with apt-get when they are missing.
# 2. Makes a local base image from Debian's packages (debootstrap --variant=minbase), unless
#    it exists from an earlier run: Debian 13 (trixie) with Python, pip and Debian's CPU builds
#    of torch and torchvision. It stands in for `python:3.11-slim-bookworm` + PyTorch's CPU
#    index (PyPI's x86_64 torch wheels are CUDA builds of several GB, and PyPI's torchvision
#    does not load its operators beside a CPU-only torch). The Dockerfile's CPU torch step
#    keeps the base's torch and torchvision, because they are the versions it is given.
# 3. Builds containers/Dockerfile, every stage, with VARIANT=cpu on that base. The host's pip
#    settings (its CA bundle, read from pip's configuration) are build-time mounts, never part
#    of the Dockerfile.
# 4. In the built image, as its non-root user and through its entry point: `--help`, then the
#    README's CPU `docker run` line (its arguments after the image name: the default
#    experiment) with /out bind-mounted from a host folder; checks that metrics.json and
#    manifest.json (with the image's name) appear on the host, owned by the image's user.
# 5. Removes its container, its image and its temporary folders; keeps the base for next time
#    (PML_SMOKE_FRESH_BASE=1 makes it again).
#
# `podman run` is not used: buildah's chroot isolation builds and runs the image on hosts whose
# sandbox refuses an OCI runtime. Users run the images with `docker run`/`podman run`.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=localhost/pml-plugins-smoke/debian-torch:trixie
IMAGE=localhost/pml-plugins-smoke/pml-plugins:cpu
EXPECTED_TAG=ghcr.io/pml-plugins/pml-plugins:0.1.0-cpu
SUITE=trixie
PACKAGES=python3,python3-pip,python-is-python3,ca-certificates,python3-torch,python3-torchvision

T0=$SECONDS
say() { printf '\n== [%4ds] %s\n' "$((SECONDS - T0))" "$*"; }
run() {
    printf '+ %s\n' "$*"
    "$@"
}
declare -A TIMES=()

[ "$(id -u)" = 0 ] || {
    echo "containers/smoke.sh: run it as root (rootful podman/buildah, debootstrap)" >&2
    exit 2
}

WORK=$(mktemp -d /var/tmp/pml-plugins-smoke.XXXXXX)
CONTAINER=""
cleanup() {
    status=$?
    set +e
    say "cleaning up"
    [ -n "$CONTAINER" ] && run buildah rm "$CONTAINER" >/dev/null
    podman image exists "$IMAGE" && run podman rmi -f "$IMAGE" >/dev/null
    run rm -rf "$WORK"
    if [ "$status" = 0 ]; then
        say "smoke test passed"
    else
        say "smoke test FAILED (exit status $status)"
    fi
    for phase in base build run; do
        [ -n "${TIMES[$phase]:-}" ] && printf '   %-6s %4d s\n' "$phase" "${TIMES[$phase]}"
    done
    printf '   %-6s %4d s\n' total "$((SECONDS - T0))"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- 1. tools
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    run apt-get update -qq
    DEBIAN_FRONTEND=noninteractive run apt-get install -y -qq "${missing[@]}"
fi
podman --version
buildah --version

# ---------------------------------------------------------------- host settings
# The CA bundle that pip uses on this host (pip's `cert` setting, else the system's bundle),
# mounted over the image's system bundle during the build only.
pip_setting() {
    python3 -m pip config list 2>/dev/null |
        sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" | tail -n 1
}
CA_BUNDLE=${PIP_CERT:-$(pip_setting cert || true)}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$CA_BUNDLE" ] || {
    echo "containers/smoke.sh: CA bundle $CA_BUNDLE not found" >&2
    exit 2
}
# The Debian mirror that apt already uses.
MIRROR=$(grep -h -o -E 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list \
    /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    head -n 1 | tr -d ' ' || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
echo "CA bundle for the build: $CA_BUNDLE"
echo "Debian mirror: $MIRROR"

# ---------------------------------------------------------------- 2. the base image
t=$SECONDS
if [ "${PML_SMOKE_FRESH_BASE:-0}" = 1 ] && podman image exists "$BASE"; then
    run podman rmi -f "$BASE"
fi
if podman image exists "$BASE"; then
    say "reusing the base image $BASE"
else
    say "making the base image $BASE (debootstrap $SUITE, minbase + $PACKAGES)"
    run debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$WORK/rootfs" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 || {
        tail -n 30 "$WORK/debootstrap.log"
        exit 1
    }
    # like python:*-slim: pip installs into the system's Python (/usr/local)
    run rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
    run chroot "$WORK/rootfs" apt-get clean
    run rm -rf "$WORK"/rootfs/var/lib/apt/lists/*
    numpy=$(chroot "$WORK/rootfs" python -c "import numpy; print(numpy.__version__)")
    tar -C "$WORK/rootfs" -c . |
        run podman import --change 'CMD ["/bin/bash"]' - "$BASE-debootstrap"
    run rm -rf "$WORK/rootfs"
    # Debian's NumPy has no RECORD file, so pip cannot upgrade it when a dependency asks for a
    # newer one; the same version from PyPI in /usr/local (as in python:*-slim) can be.
    CONTAINER=$(buildah from --pull-never "$BASE-debootstrap")
    run buildah run --isolation chroot -v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
        "$CONTAINER" -- python -m pip install --no-cache-dir --no-deps --ignore-installed \
        --root-user-action=ignore "numpy==$numpy"
    run buildah commit --rm "$CONTAINER" "$BASE" >/dev/null
    CONTAINER=""
    run podman rmi "$BASE-debootstrap" >/dev/null
fi
TIMES[base]=$((SECONDS - t))

# The versions the base provides, passed as the Dockerfile's pins.
CONTAINER=$(buildah from --pull-never "$BASE")
read -r PYTHON_VERSION TORCH_VERSION TORCHVISION_VERSION < <(
    buildah run --isolation chroot "$CONTAINER" -- python -c \
        "import sys, torch, torchvision; v = lambda m: m.__version__.split('+')[0]; \
print('%d.%d' % sys.version_info[:2], v(torch), v(torchvision))" 2>/dev/null
)
buildah rm "$CONTAINER" >/dev/null
CONTAINER=""
echo "base: Python $PYTHON_VERSION, torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION"

# ---------------------------------------------------------------- 3. build
say "building containers/Dockerfile (VARIANT=cpu) as $IMAGE"
t=$SECONDS
run podman build --isolation chroot --layers=false --force-rm --pull=never \
    -f containers/Dockerfile -t "$IMAGE" \
    --build-arg VARIANT=cpu \
    --build-arg BASE_IMAGE="$BASE" \
    --build-arg PYTHON_VERSION="$PYTHON_VERSION" \
    --build-arg TORCH_VERSION="$TORCH_VERSION" \
    --build-arg TORCHVISION_VERSION="$TORCHVISION_VERSION" \
    --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
    -v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
    .
TIMES[build]=$((SECONDS - t))
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep pml-plugins-smoke

# ---------------------------------------------------------------- 4. run
say "running the image as its user, through its entry point"
t=$SECONDS
USER_SPEC=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
ENTRYPOINT=$(podman image inspect --format '{{join .Config.Entrypoint " "}}' "$IMAGE")
TAG_IN_IMAGE=$(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" |
    sed -n 's/^PML_PLUGINS_IMAGE=//p')
echo "user $USER_SPEC, entry point [$ENTRYPOINT], PML_PLUGINS_IMAGE=$TAG_IN_IMAGE"
[ "$TAG_IN_IMAGE" = "$EXPECTED_TAG" ] || {
    echo "expected PML_PLUGINS_IMAGE=$EXPECTED_TAG" >&2
    exit 1
}
case "$USER_SPEC" in "" | root | 0 | 0:*)
    echo "the image runs as root" >&2
    exit 1
    ;;
esac

OUT="$WORK/out"
mkdir -p "$OUT"
chown "$USER_SPEC" "$OUT" # what `--user` or a writable out/ does for docker run
# The README's CPU line: what follows the image name is the command line that runs.
mapfile -t CLI_ARGS < <(
    python3 - "$EXPECTED_TAG" <<'EOF'
import re, shlex, sys
tag = sys.argv[1]
text = open("README.md").read().replace("\\\n", " ")
for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    for line in block.splitlines():
        argv = shlex.split(line) if line.startswith("docker run ") else []
        if tag in argv and "train" in argv:
            print("\n".join(argv[argv.index(tag) + 1 :]))
            sys.exit(0)
sys.exit(f"README.md has no `docker run ... {tag} train ...` line")
EOF
)
RUN_DIR=""
for i in "${!CLI_ARGS[@]}"; do
    [ "${CLI_ARGS[$i]}" = --out ] && RUN_DIR=${CLI_ARGS[$((i + 1))]}
done
case "$RUN_DIR" in /out/?*) ;; *)
    echo "the README's CPU line writes to '$RUN_DIR', not below /out" >&2
    exit 1
    ;;
esac
echo "README's CPU line, after the image name: ${CLI_ARGS[*]}"

CONTAINER=$(buildah from --pull-never "$IMAGE")
in_image() {
    # shellcheck disable=SC2086  # the entry point is words
    run buildah run --isolation chroot --user "$USER_SPEC" -v "$OUT:/out" "$CONTAINER" -- \
        $ENTRYPOINT "$@"
}
in_image --help | head -n 5
in_image "${CLI_ARGS[@]}"
TIMES[run]=$((SECONDS - t))

HOST_RUN="$OUT/${RUN_DIR#/out/}"
say "checking the run folder on the host: $HOST_RUN"
for f in metrics.json manifest.json; do
    [ -s "$HOST_RUN/$f" ] || {
        echo "$HOST_RUN/$f is missing" >&2
        exit 1
    }
    owner=$(stat -c %u:%g "$HOST_RUN/$f")
    [ "$owner" = "$USER_SPEC" ] || [ "${owner%%:*}" = "${USER_SPEC%%:*}" ] || {
        echo "$f is owned by $owner, not by the image's user $USER_SPEC" >&2
        exit 1
    }
    echo "$HOST_RUN/$f: owner $owner"
done
python3 - "$HOST_RUN" "$EXPECTED_TAG" <<'EOF'
import json, sys
from pathlib import Path
run, tag = Path(sys.argv[1]), sys.argv[2]
manifest = json.loads((run / "manifest.json").read_text())
metrics = json.loads((run / "metrics.json").read_text())
assert manifest["container_image"] == tag, manifest["container_image"]
assert metrics["trained"], metrics
print("manifest.json: container_image", manifest["container_image"])
print("metrics.json: trained", json.dumps(metrics["trained"])[:300])
EOF
