#!/usr/bin/env bash
# Run the whole test suite the way CI does: set up, lint, check layers, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/setup.sh
.venv/bin/ruff check .
.venv/bin/lint-imports  # from the checkout: cdpfs/mount and cdpfs/tools lead to the front ends
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
