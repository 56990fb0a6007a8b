"""Shared output for benchmarks: a JSON file, a markdown table and a PNG plot per run."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path


def machine() -> dict:
    import os

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **cpu_isa()}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    return info


def cpu_isa() -> dict:
    """The CPU model and the instruction-set facts that pick vLLM's CPU kernels (machines of
    our kind differ: some have AVX-512, some only AVX2)."""
    import torch

    model, flags = "", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags |= {f for f in line.split(":", 1)[1].split() if f.startswith(("avx512", "amx"))}
    except OSError:
        pass
    return {"cpu_model": model, "cpu_isa": " ".join(sorted(flags)) or "AVX2 only (no AVX-512)",
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs; floats get 3 significant decimals."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out_dir: str | Path, name: str, *, title: str, rows: list[dict],
                 columns: list[tuple[str, str]], notes: str = "", extra: dict | None = None,
                 plot=None) -> Path:
    """Write ``name.json``, ``name.md`` and (if ``plot(ax)`` is given) ``name.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "machine": machine(), "rows": rows, **(extra or {})}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
    md = [f"## {title}", "", markdown_table(rows, columns), ""]
    if notes:
        md += [notes, ""]
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        plot(ax)
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)
        md += [f"![{title}]({name}.png)", ""]
    m = payload["machine"]
    md.append(f"_Machine: {m['cpus']} CPUs ({m['cpu_model']}; {m['cpu_isa']}), {m['platform']}, "
              f"torch {m['torch']}, vLLM {m.get('vllm', '-')}; {m['date']}_")
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    return out / f"{name}.md"


def run_child(spec_path: str | None, phase) -> bool:
    """In a child process started with ``--child SPEC``: run ``phase(spec)`` and write its
    result to ``spec["out"]`` (True); in the parent, nothing (False)."""
    if not spec_path:
        return False
    spec = json.loads(Path(spec_path).read_text())
    Path(spec["out"]).write_text(json.dumps(phase(spec)))
    return True



def spawn_child(script: str, spec: dict, work: Path, name: str, env: dict, timeout: float = 3600):
    """In the parent: run ``script --child SPEC`` (``spec`` written to ``work/NAME.spec.json``,
    its output to ``work/NAME.json``, its log to ``work/NAME.log``) and return its result;
    a child that fails ends the run with the tail of its log."""
    import subprocess
    import sys

    spec = {**spec, "out": str(work / f"{name}.json")}
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = work / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, script, "--child", str(spec_path)], env=env, stdout=f,
                              stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"{name} failed; log {log}:\n{log.read_text()[-3000:]}")
    return json.loads(Path(spec["out"]).read_text())
