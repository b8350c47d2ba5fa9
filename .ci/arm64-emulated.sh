#!/usr/bin/env bash
# Build and test gptgen's native kernels (src/gptgen/native: the portable C++ int8 path and the C sampler) for
# ARM64 on an x86-64 Debian 12 machine, under user-mode emulation (qemu-aarch64), from scratch:
#   - host tools from apt: qemu-user and the aarch64 cross compilers (gcc/g++ 12);
#   - a private aarch64 sysroot (Debian 12 python3.11 and the libraries it needs): .debs fetched by apt with its
#     own config/lists/cache under the work dir, unpacked by dpkg -x (the host's dpkg and apt state stay untouched);
#   - aarch64 wheels from PyPI installed with pip --target (torch 2.10.0: the newest PyPI aarch64 wheel that is
#     CPU-only; 2.11+ on PyPI are CUDA builds that need the nvidia-* wheels to import);
#   - the emulated Python runs the tests; gptgen builds its libraries with CXX/CC = the cross compilers.
# Usage: .ci/arm64-emulated.sh [WORK_DIR]  (default /tmp/gptgen-arm64). Idempotent: reuses what WORK_DIR holds.
# Not part of .ci/run: slow (emulation is ~10-50x slower than native). Runs itself at nice 19 (ARM64_NICE=N to change).
# ARM64_MCPU=<core> (e.g. neoverse-v1) builds as -mcpu=native would on that core (the default cross build has
# no -mcpu: a cross compiler rejects -mcpu=native and gptgen falls back to the baseline armv8-a).
# Exits non-zero when the libraries do not build or load, or any test fails.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mkdir -p "${1:-/tmp/gptgen-arm64}" && cd "${1:-/tmp/gptgen-arm64}" && pwd)"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
TORCH_VERSION="${ARM64_TORCH:-2.10.0}"
renice -n "${ARM64_NICE:-19}" -p $$ >/dev/null
log() { printf '\n== %s\n' "$*"; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

log "host tools"
need=()
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ "${#need[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
QEMU="$(command -v qemu-aarch64)"
"$QEMU" --version | head -n1
aarch64-linux-gnu-g++ --version | head -n1

log "aarch64 sysroot ($WORK/sysroot)"
SYSROOT="$WORK/sysroot"
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
  APT="$WORK/apt"
  mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/parts"
  key=/usr/share/keyrings/debian-archive-keyring.gpg
  cat > "$APT/sources.list" <<EOF
deb [arch=arm64 signed-by=$key] $MIRROR bookworm main
deb [arch=arm64 signed-by=$key] $MIRROR bookworm-updates main
deb [arch=arm64 signed-by=$key] $SECURITY bookworm-security main
EOF
  # An empty dpkg status: apt resolves the whole dependency closure, as for an empty arm64 system.
  cat > "$APT/apt.conf" <<EOF
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
Dir::Etc::SourceList "$APT/sources.list";
Dir::Etc::SourceParts "$APT/parts";
Dir::State::Lists "$APT/lists";
Dir::Cache "$APT/cache";
Dir::State::status "/dev/null";
Debug::NoLocking "true";
EOF
  APT_CONFIG="$APT/apt.conf" apt-get update -qq
  APT_CONFIG="$APT/apt.conf" apt-get install -y -qq --download-only --no-install-recommends \
    python3.11 libstdc++6 libgcc-s1 libgomp1 >/dev/null
  rm -rf "$SYSROOT.partial" && mkdir -p "$SYSROOT.partial"
  for deb in "$APT"/cache/archives/*.deb; do dpkg -x "$deb" "$SYSROOT.partial"; done
  rm -rf "$SYSROOT" && mv "$SYSROOT.partial" "$SYSROOT"
fi

log "emulated python ($WORK/bin/python3.11)"
# A script in place of the interpreter: argv[0] (and so sys.executable) stays this script, so subprocesses that run
# sys.executable (tests do) go through qemu too, with or without a binfmt_misc handler on the host.
mkdir -p "$WORK/bin"
cat > "$WORK/bin/python3.11" <<EOF
#!/bin/sh
PYTHONHOME="$SYSROOT/usr" exec "$QEMU" -L "$SYSROOT" -0 "$WORK/bin/python3.11" "$SYSROOT/usr/bin/python3.11" "\$@"
EOF
chmod +x "$WORK/bin/python3.11"
PY="$WORK/bin/python3.11"
"$PY" -c 'import platform, sys; assert platform.machine() == "aarch64", platform.machine(); print(sys.version)'

log "aarch64 wheels ($WORK/site)"
SITE="$WORK/site"
STAMP="$SITE/.installed-torch-$TORCH_VERSION"
if [ ! -e "$STAMP" ]; then
  [ -x "$WORK/host-venv/bin/pip" ] || python3 -m venv "$WORK/host-venv"
  PIP=("$WORK/host-venv/bin/pip" install -q --disable-pip-version-check --target "$SITE.partial" --only-binary=:all:
       --implementation cp --python-version 3.11 --abi cp311 --platform manylinux_2_28_aarch64
       --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 --platform linux_aarch64)
  rm -rf "$SITE.partial"
  # torch without its dependency resolution (pip evaluates its platform_machine markers for the host), then its
  # dependencies by name; the rest: gptgen's dependencies and the test runner, resolved for aarch64.
  "${PIP[@]}" --no-deps "torch==$TORCH_VERSION"
  "${PIP[@]}" filelock typing-extensions sympy networkx jinja2 fsspec setuptools \
    "numpy>=1.24" "tokenizers>=0.19" "safetensors>=0.4" "huggingface_hub>=0.23" "tqdm>=4.66" "pytest>=8"
  rm -rf "$SITE" && mv "$SITE.partial" "$SITE" && touch "$STAMP"
fi

log "cross compilers"
# gptgen tries -mcpu=native (-march=native for the sampler) first; a cross compiler rejects it and gptgen retries
# without (its fallback, exercised here). ARM64_MCPU=<core> turns native into that core instead.
for tool in g++ gcc; do
  cat > "$WORK/bin/cross-$tool" <<EOF
#!/bin/sh
mcpu="${ARM64_MCPU:-}"
for a in "\$@"; do
  shift
  case "\$a" in
    -mcpu=native|-march=native) if [ -n "\$mcpu" ]; then set -- "\$@" "-mcpu=\$mcpu"; else set -- "\$@" "\$a"; fi ;;
    *) set -- "\$@" "\$a" ;;
  esac
done
exec aarch64-linux-gnu-$tool "\$@"
EOF
  chmod +x "$WORK/bin/cross-$tool"
done

export PYTHONPATH="$SITE:$REPO/src"
export CXX="$WORK/bin/cross-g++" CC="$WORK/bin/cross-gcc"
export GPTGEN_CACHE_DIR="$WORK/cache" TMPDIR="$WORK/tmp"
export PYTHONDONTWRITEBYTECODE=1
unset GPTGEN_NATIVE GPTGEN_CPU_FEATURES
rm -rf "$WORK/cache" "$WORK/tmp" && mkdir -p "$WORK/tmp"  # build from this checkout's sources every run

log "build and load the native libraries"
cd "$REPO"
"$PY" - <<'EOF'
import platform
import torch
from gptgen.native import int8, sampler

def machine(path):
    with open(path, "rb") as f:
        head = f.read(20)
    return int.from_bytes(head[18:20], "little")  # ELF e_machine: 183 = AArch64

print("torch", torch.__version__, "on", platform.machine())
ok = int8.available()
print("int8:", int8.status())
lib = sampler.library()
print("sampler:", sampler.status())
assert ok, "the int8 library did not build or load"
assert int8.current_path() == "portable", int8.current_path()
assert lib is not None, "the sampler library did not build or load"
for path in (int8.status()["detail"], sampler.status()["detail"]):
    assert machine(path) == 183, f"{path} is not an AArch64 ELF"
EOF

log "tests under emulation"
failed=0
start=$SECONDS
run() { "$PY" -m pytest -q -p no:cacheprovider "$@" || failed=1; }
run tests/test_int8_dynamic.py -k "kernel_equals_reference or minus_128 or vector_quantization or rows_are_independent or quantize_rows or greedy_tokens"
run tests/test_native_kernels.py
run tests/test_int8_decoder.py -k "every_instruction_set_path or greedy_tokens or weight_only"
run tests/test_cpu_speed_paths.py -k "dequantized_product"
echo "emulated tests: $((SECONDS - start)) s"
[ "$failed" -eq 0 ] && echo "arm64 (emulated): all passed" || echo "arm64 (emulated): FAILURES" >&2
exit "$failed"
