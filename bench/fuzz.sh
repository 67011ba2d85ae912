#!/usr/bin/env bash
# A long random fuzz of the server (tests/server/test_fuzz_server.py), apart from the README's test command, which
# runs it derandomized. Each round draws a new seed and prints it first; a failure reruns as
#   TSQP_HYPOTHESIS_PROFILE=random python -m pytest tests/server/test_fuzz_server.py --hypothesis-seed=SEED
# Usage: bash bench/fuzz.sh [MINUTES] (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
deadline=$(( $(date +%s) + 60 * ${1:-10} ))
round=0
while [ "$(date +%s)" -lt "$deadline" ]; do
    seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
    round=$((round + 1))
    echo "fuzz round $round: --hypothesis-seed=$seed"
    TSQP_HYPOTHESIS_PROFILE=random python -m pytest -q -p no:cacheprovider tests/server/test_fuzz_server.py \
        --hypothesis-seed="$seed" --durations=0 -o addopts=""
done
echo "fuzz: $round rounds passed"
