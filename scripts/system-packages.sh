#!/usr/bin/env bash
# Install the Debian packages the test suite uses for real, when they are missing:
#   dataset-fashion-mnist  Fashion-MNIST IDX files under /usr/share/datasets/fashion-mnist
#   postgresql             a private PostgreSQL server that the scale-out tests start on loopback
#   chromium               the browser that drives the MLflow UI tests (through Playwright)
#   default-jre-headless   Java, for the local Spark that runs docs/spark.md's job (tests/test_spark.py)
# As root it installs them with apt-get; otherwise it uses `sudo -n` when that needs no
# password, and else prints the exact command to run and exits 1.
set -euo pipefail

missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v chromium >/dev/null || missing+=(chromium)
command -v java >/dev/null || missing+=(default-jre-headless)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "The tests need these Debian packages: ${missing[*]}" >&2
  echo "Install them as root, then run the tests again:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi

echo "Installing Debian packages the tests use: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
