#!/usr/bin/env bash
# Run an export's heads under the real aarch64 onnxruntime (Raspberry Pi 4 CPU, emulated by
# QEMU user mode) and compare them with x86 onnxruntime on the same real images.
#
#   tools/arm64_check.sh EXPORT_DIR [IMAGES_DIR]   full check: every head selects equal indices; fp32/tok8/
#                                                  tok16 tokens within 1e-4 / one int8 step / 1e-4 + 1 ulp;
#                                                  int8 heads: same top-1 through the tail on >= 0.9
#   tools/arm64_check.sh --build-root              only build (or reuse) the cached arm64 root
#   tools/arm64_check.sh --run-arm EXPORT_DIR WORK_DIR -- ARGS...
#                                                  run `python3 tools/arm64_run_heads.py ARGS...` in the
#                                                  arm64 root, EXPORT_DIR at /mnt/export, WORK_DIR at /mnt/work
#   tools/arm64_check.sh --probe EXPORT_DIR [IMAGES_DIR]
#                                                  where x86 and aarch64 part in the int8 heads: their integer
#                                                  activations and LayerNorm outputs, compared tensor by tensor
#   tools/arm64_check.sh --profile EXPORT_DIR [OUT.json]
#                                                  `mercury-onnx profile` (what `bench --device pi` runs on a Pi)
#                                                  under emulation: a functional check, its timings meaningless
#
# MERCURY_ARM64_IMAGES: how many real images (default 32). MERCURY_ARM64_JSON=FILE: also write the
# comparison table as JSON (benchmarks/reproduce.sh edge writes docs/results/edge.json). MERCURY_ARM64_LENIENT_INT8=1: only report
# an int8 (QDQ) head's unequal indices (older S8S8 exports; their end-to-end top-1 is still gated).
# Exit codes: 0 pass, 1 outputs differ, 2 bad usage, 77 this machine cannot build or enter the
# arm64 root (not root, no Debian mirror, ...): the pytest wrapper skips with the message.
#
# The root (Debian bookworm arm64 minbase + python3, qemu-aarch64-static, onnxruntime and the
# [edge] extra's wheels for aarch64) is cached in $MERCURY_ARM64_ROOT, default
# ${XDG_CACHE_HOME:-$HOME/.cache}/mercury-onnx/arm64-root: 450 MB, 1-2.5 min from nothing on a
# 2-core machine (measured 99 s for the base + 43 s for the wheels under load), then reused.
# Emulated timings say nothing about a Pi's speed: the point is the arithmetic of the aarch64 build.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/mercury-onnx
ROOT=${MERCURY_ARM64_ROOT:-$CACHE/arm64-root}
SUITE=bookworm
PY=${PYTHON:-$(command -v python || command -v python3)}
SKIP=77
BASE_VERSION=2  # bump when build_base changes: a cached root of another version is rebuilt

log() { echo "arm64-check: $*" >&2; }
skip() { log "SKIP: $*"; exit $SKIP; }
usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

check_host() {
  [ "$(uname -m)" = x86_64 ] || skip "host is $(uname -m): this check emulates aarch64 on an x86_64 host"
  [ "$(id -u)" = 0 ] || skip "needs root (debootstrap, unshare -m, chroot); CI runs as root"
  command -v unshare >/dev/null || skip "unshare (util-linux) not found"
  unshare -m -- true 2>/dev/null || skip "unshare -m is not permitted here (a container without CAP_SYS_ADMIN?)"
  "$PY" -c "import onnxruntime, numpy" 2>/dev/null || skip "$PY has no onnxruntime/numpy (the x86 side)"
}

# The Debian mirror this machine's apt already uses (no new hosts), else deb.debian.org.
debian_mirror() {
  if [ -n "${MERCURY_DEBIAN_MIRROR:-}" ]; then echo "$MERCURY_DEBIAN_MIRROR"; return; fi
  local m
  m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | grep -v '^\s*#' | grep -o -E 'https?://[^ ]*/debian/?( |$)' | grep -v security | head -n 1 | tr -d ' ')
  echo "${m:-http://deb.debian.org/debian}"
}

apt_ready=0
apt_get() {  # apt-get install/download, running apt-get update once if the lists are stale
  if [ $apt_ready = 0 ]; then
    apt-get update -qq >/dev/null 2>&1 || skip "apt-get update failed (no network to the Debian mirror?)"
    apt_ready=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get -qq "$@" >/dev/null
}

# A Pi 4's /proc/cpuinfo. onnxruntime's cpuinfo reads it and /sys/devices/system/cpu: with the
# host's x86 file seen from aarch64 code, `import onnxruntime` segfaults. Neither /proc nor /sys
# is mounted in the root: they hold only these Pi-like files.
pi4_cpuinfo() {
  local i
  for i in 0 1 2 3; do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
    printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
  done
  printf 'Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n'
}

# Debian arm64 minbase + python3, without the emulated second stage: debootstrap --foreign only
# downloads and verifies the .debs; unpacking them with dpkg-deb -x is enough to run python3.
build_base() {
  local base_ok="$ROOT/.base-ok"
  [ -f "$base_ok" ] && [ "$(cat "$base_ok")" = "$BASE_VERSION" ] && return 0
  local t0=$SECONDS tmp="$ROOT.tmp" mirror
  mirror=$(debian_mirror)
  command -v debootstrap >/dev/null || apt_get install -y debootstrap || skip "cannot install debootstrap"
  rm -rf "$tmp" && mkdir -p "$tmp"
  log "building the arm64 root in $ROOT (debootstrap $SUITE from $mirror) ..."
  debootstrap --arch=arm64 --variant=minbase --include=python3 --foreign "$SUITE" "$tmp" "$mirror" \
    >"$CACHE/debootstrap.log" 2>&1 || skip "debootstrap failed (see $CACHE/debootstrap.log)"
  local deb
  for deb in "$tmp"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$tmp"; done
  rm -f "$tmp"/var/cache/apt/archives/*.deb

  local q; q=$(mktemp -d) && chmod 0777 "$q"  # apt downloads as user _apt
  (cd "$q" && apt_get download qemu-user-static) || skip "cannot download qemu-user-static"
  dpkg-deb --fsys-tarfile "$q"/qemu-user-static_*.deb | tar -x -C "$q" ./usr/bin/qemu-aarch64-static
  install -m 0755 "$q/usr/bin/qemu-aarch64-static" "$tmp/usr/bin/qemu-aarch64-static"
  rm -rf "$q"

  rm -rf "$tmp/proc" "$tmp/sys" && mkdir -p "$tmp/proc" "$tmp/sys" "$tmp/mnt/repo" "$tmp/mnt/export" "$tmp/mnt/work"
  pi4_cpuinfo >"$tmp/proc/cpuinfo"
  mkdir -p "$tmp/sys/devices/system/cpu"  # cpuinfo's processor lists: 4 cores, like the Pi
  echo 0-3 >"$tmp/sys/devices/system/cpu/possible"
  echo 0-3 >"$tmp/sys/devices/system/cpu/present"
  [ -x "$tmp/usr/bin/python3" ] || skip "the arm64 root has no python3 (debootstrap incomplete)"
  rm -rf "$ROOT" && mv "$tmp" "$ROOT"
  echo "$BASE_VERSION" >"$base_ok"
  log "arm64 base root built in $((SECONDS - t0)) s ($(du -sm "$ROOT" | cut -f1) MB)"
}

# aarch64 wheels for the root's python (3.11): the [edge] extra plus the core dependencies,
# resolved by pip for the Pi's platform, with onnxruntime and numpy pinned to the x86 versions.
build_site() {
  local ort np want site="$ROOT/opt/site"
  ort=$("$PY" -c "import onnxruntime; print(onnxruntime.__version__)")
  np=$("$PY" -c "import numpy; print(numpy.__version__)")
  [ "$ort" != 1.21.0 ] || { log "onnxruntime 1.21.0 crashes on Cortex-A72 (Illegal instruction): not used"; exit 2; }
  local reqs
  reqs=$("$PY" "$HERE/arm64_run_heads.py" edge-requirements "$REPO/pyproject.toml")
  want="onnxruntime==$ort numpy==$np $reqs"
  [ -f "$site/.site-ok" ] && [ "$(cat "$site/.site-ok")" = "$want" ] && return 0
  local t0=$SECONDS
  log "installing aarch64 wheels into the root: $want"
  rm -rf "$site.tmp"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --disable-pip-version-check --only-binary=:all: \
    --implementation cp --python-version 3.11 --abi cp311 \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 \
    --target "$site.tmp" "onnxruntime==$ort" "numpy==$np" $reqs >"$CACHE/pip-arm64.log" 2>&1 \
    || skip "pip could not fetch the aarch64 wheels (see $CACHE/pip-arm64.log)"
  local heavy
  heavy=$(cd "$site.tmp" && ls -d torch timm onnx torchvision 2>/dev/null || true)
  if [ -n "$heavy" ]; then log "FAIL: the [edge] extra pulled in: $heavy"; exit 1; fi
  rm -rf "$site" && mv "$site.tmp" "$site"
  echo "$want" >"$site/.site-ok"
  log "aarch64 wheels installed in $((SECONDS - t0)) s (no torch, timm or onnx among them)"
}

build_root() {
  mkdir -p "$CACHE"
  exec 9>"$CACHE/arm64-root.lock"
  flock 9  # one builder at a time
  build_base
  build_site
}

# python3 ARGS in the arm64 root, on an emulated Cortex-A72 (the Pi 4's core: only its CPU features).
# Private mount namespace: the bind mounts vanish with the process.
run_arm() {
  local export_dir work_dir
  export_dir=$(cd "$1" && pwd); work_dir=$(cd "$2" && pwd); shift 2
  unshare -m -- /bin/sh -euc '
    root=$1; shift
    mount --bind -o ro "$1" "$root/mnt/repo"
    mount --bind -o ro "$2" "$root/mnt/export"
    mount --bind "$3" "$root/mnt/work"
    shift 3
    exec env -i PATH=/usr/bin:/bin HOME=/tmp PYTHONPATH=/opt/site:/mnt/repo unshare -R "$root" \
      /usr/bin/qemu-aarch64-static -cpu cortex-a72 /usr/bin/python3 -s -B "$@"
  ' sh "$ROOT" "$REPO" "$export_dir" "$work_dir" "$@"
}

main() {
  [ $# -ge 1 ] || usage
  case "$1" in
    -h|--help) usage ;;
    --build-root)
      check_host; build_root; return 0 ;;
    --run-arm)
      [ $# -ge 4 ] && [ "$4" = -- ] || usage
      check_host; build_root
      local e=$2 w=$3; shift 4
      run_arm "$e" "$w" /mnt/repo/tools/arm64_run_heads.py "$@"; return ;;
    --profile)
      [ $# -ge 2 ] && [ -f "$2/manifest.json" ] || usage
      check_host; build_root
      local w; w=$(mktemp -d)
      # The device CLI itself on (emulated) aarch64 with only the [edge] wheels: the same code
      # path as `bench --device pi` on a Pi (measure_device), one timed run per graph.
      run_arm "$2" "$w" -m mercury_onnx.cli profile --export /mnt/export --out /mnt/work/profile.json \
        --name "qemu-cortex-a72-emulated-not-a-pi-latency" --repeats 1
      cp "$w/profile.json" "${3:-./arm64-emulated-profile.json}" && rm -rf "$w"
      log "wrote ${3:-./arm64-emulated-profile.json}: EMULATED timings, functional check only, never Pi latency"
      return ;;
    --probe)
      [ $# -ge 2 ] && [ -f "$2/manifest.json" ] || usage
      check_host; build_root
      w=$(mktemp -d); trap 'rm -rf "$w"' EXIT  # global: the trap runs after main returns
      "$PY" "$HERE/arm64_run_heads.py" batch "$2" "${3:-$REPO/../shared/data/cifar10/test}" "$w/batch.npy" \
        --n "${MERCURY_ARM64_IMAGES:-32}"
      "$PY" "$HERE/arm64_run_heads.py" probe "$2" "$w/graphs"
      "$PY" "$HERE/arm64_run_heads.py" tensors "$w/graphs" "$w/batch.npy" "$w/x86_64.npz"
      run_arm "$w" "$w" /mnt/repo/tools/arm64_run_heads.py tensors /mnt/work/graphs /mnt/work/batch.npy /mnt/work/aarch64.npz
      "$PY" "$HERE/arm64_run_heads.py" compare-tensors "$w/x86_64.npz" "$w/aarch64.npz"
      return ;;
  esac
  local export_dir=$1
  local images=${2:-$REPO/../shared/data/cifar10/test}
  [ -f "$export_dir/manifest.json" ] || { log "$export_dir has no manifest.json: not an export folder"; exit 2; }
  [ -d "$images" ] || { log "images folder $images not found"; exit 2; }
  check_host
  build_root

  # MERCURY_ARM64_KEEP=DIR keeps the batch and both runs' outputs there (for a closer look).
  work=${MERCURY_ARM64_KEEP:-}
  if [ -n "$work" ]; then mkdir -p "$work"; else work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi
  "$PY" "$HERE/arm64_run_heads.py" batch "$export_dir" "$images" "$work/batch.npy" --n "${MERCURY_ARM64_IMAGES:-32}"
  "$PY" "$HERE/arm64_run_heads.py" run "$export_dir" "$work/batch.npy" "$work/x86_64.npz"
  run_arm "$export_dir" "$work" /mnt/repo/tools/arm64_run_heads.py run /mnt/export /mnt/work/batch.npy /mnt/work/aarch64.npz \
    || { log "FAIL: the emulated aarch64 run crashed (exit $?)"; exit 1; }
  "$PY" "$HERE/arm64_run_heads.py" compare "$work/x86_64.npz" "$work/aarch64.npz" "$export_dir" \
    ${MERCURY_ARM64_LENIENT_INT8:+--lenient-int8} ${MERCURY_ARM64_JSON:+--json "$MERCURY_ARM64_JSON"}
}

main "$@"; exit $?  # one line: bash reads no further, so editing this file mid-run is safe
