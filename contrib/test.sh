#!/usr/bin/env bash
# Run the whole test suite the way CI does: set up, lint, check layers, test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/setup.sh
.venv/bin/ruff check .
(cd /tmp && "$OLDPWD/.venv/bin/lint-imports" --config "$OLDPWD/pyproject.toml")
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
