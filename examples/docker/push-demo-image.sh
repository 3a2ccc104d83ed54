#!/usr/bin/env bash
# Build the demo image (the drover binary and its shared libraries, FROM scratch, entrypoint
# /drover) and push it as drover-demo:v1 and :v2 to the registry at $REGISTRY (default
# 127.0.0.1:5000). When no registry answers there, start one: Debian's docker-registry
# (apt-get install -y docker-registry), storing in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
REGISTRY=${REGISTRY:-127.0.0.1:5000}
BIN=${DROVER_BIN:-target/release/drover}
[ -x "$BIN" ] || cargo build --release -p drover

answers() { python3 - "$1" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://{sys.argv[1]}/v2/", timeout=1); sys.exit(0)
except Exception:
    sys.exit(1)
PY
}

if ! answers "$REGISTRY"; then
  command -v docker-registry >/dev/null || {
    echo "no registry on $REGISTRY: apt-get install -y docker-registry, or start one there" >&2
    exit 1
  }
  dir=$(mktemp -d /tmp/drover-registry.XXXXXX)
  printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s/storage\nhttp:\n  addr: %s\n' \
    "$dir" "$REGISTRY" > "$dir/config.yml"
  nohup docker-registry serve "$dir/config.yml" > "$dir/registry.log" 2>&1 &
  echo "registry started on $REGISTRY (pid $!; data and log in $dir)"
  for _ in $(seq 100); do answers "$REGISTRY" && break; sleep 0.1; done
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs"
cp "$BIN" "$ctx/rootfs/drover"
for lib in $(ldd "$BIN" | grep -o '/[^ ]*'); do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
printf 'FROM scratch\nCOPY rootfs/ /\nENTRYPOINT ["/drover"]\n' > "$ctx/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q -t "$REGISTRY/drover-demo:v1" "$ctx" >/dev/null 2>"$ctx/build.log" ||
  { cat "$ctx/build.log" >&2; exit 1; }
docker tag "$REGISTRY/drover-demo:v1" "$REGISTRY/drover-demo:v2"
for tag in v1 v2; do
  docker push -q "$REGISTRY/drover-demo:$tag" >/dev/null
done
echo "pushed $REGISTRY/drover-demo:v1 and :v2"
