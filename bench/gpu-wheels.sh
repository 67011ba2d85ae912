#!/usr/bin/env bash
# The wheels bench/gpu.sh needs on the device image (Python 3.12, torch and transformers already there;
# no network): pyzmq and cryptography with cffi and pycparser, into .whl/ (ignored by git; carried).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pyzmq cryptography cffi pycparser
ls -la .whl
