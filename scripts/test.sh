#!/usr/bin/env bash
# Sets up (packages) and runs the whole test suite. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --deps
swift build --build-tests
swift test --skip-build
# cluster/slurm/train.sbatch on a real one-host Slurm (skipped, saying so, where the machine cannot run one).
cluster/slurm/test-local.sh
