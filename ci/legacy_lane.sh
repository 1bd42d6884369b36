#!/usr/bin/env bash
# The legacy lane: the test suite in an environment with torch 2.8, IPEX 2.8, transformers 4.48
# and optimum 1.27, where the ipex and bettertransformer backends run for real (tests of backends
# absent there skip). Builds .venv-legacy once (~7 GB; a marker keyed by the constraints and
# pyproject.toml makes reruns skip the install); the main .venv's python, when there, serves the
# cross-environment plan test. Arguments go to pytest, e.g. tests/test_backend_ipex.py; without
# any it runs the tests of what differs there: the two legacy backends, the PyTorch backends,
# tunes and tasks on transformers 4.48, and plans across the two environments.
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
if [ "$#" -eq 0 ]; then
  set -- tests/test_backend_ipex.py tests/test_backend_bettertransformer.py \
    tests/test_backends_torch.py tests/test_tune.py tests/test_tasks.py \
    tests/test_cross_environment.py
fi
"$venv/bin/python" -m pytest -q "$@"
