#!/usr/bin/env bash
# The legacy lane: the test suite in an environment with torch 2.8, IPEX 2.8, transformers 4.48
# and optimum 1.27, where the ipex and bettertransformer backends run for real (tests of backends
# absent there skip). Builds .venv-legacy once (~7 GB; a marker keyed by the constraints and
# pyproject.toml makes reruns skip the install); the main .venv's python, when there, serves the
# cross-environment plan test. Arguments go to pytest, e.g. tests/test_backend_ipex.py.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-legacy
marker="$venv/.autocpu-legacy-complete"
stamp=$(cat ci/legacy-constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$marker" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -c ci/legacy-constraints.txt -e '.[ipex,bettertransformer,test]'
  echo "$stamp" >"$marker"
fi
if [ -x .venv/bin/python ]; then
  export AUTOCPU_OTHER_PYTHON="$PWD/.venv/bin/python"
fi
"$venv/bin/python" -m pytest -q "$@"
