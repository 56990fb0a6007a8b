"""Unpack the Python sources of a vLLM release wheel (no compiled parts), for the contract
test against the current CUDA release on this CPU-only machine (tests/unit/test_vllm_contract.py).

    python ci/vllm_sources.py VERSION DEST   # downloads vllm==VERSION (no dependencies) into DEST
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def main(version: str, dest: str) -> None:
    dest_dir = Path(dest)
    if (dest_dir / "vllm" / "__init__.py").exists():
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--dest", tmp, f"vllm=={version}"], check=True)
        (wheel,) = Path(tmp).glob("vllm-*.whl")
        staging = Path(tempfile.mkdtemp(dir=dest_dir.parent, prefix=".vllm-sources-"))
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith("vllm/") and name.endswith((".py", ".json", ".jinja")):
                    z.extract(name, staging)
    shutil.rmtree(dest_dir, ignore_errors=True)
    staging.rename(dest_dir)  # whole or not at all: a cut download leaves no half tree


if __name__ == "__main__":
    main(*sys.argv[1:])
