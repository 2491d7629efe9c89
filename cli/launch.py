"""`glm-mlx launch`: run chat / generate / serve as a pipeline over several Macs with mlx.launch."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from typing_extensions import Annotated

from glm_mlx.errors import GlmMlxError
from glm_mlx.quantize.pipeline_plan import ENV_CONTEXT, ENV_MACS, parse_macs


def mlx_launch() -> str | None:
    """mlx.launch of this environment: beside sys.executable (a venv need not be on PATH), else on PATH."""
    beside = Path(sys.executable).parent / "mlx.launch"
    return str(beside) if beside.is_file() else shutil.which("mlx.launch")


def launch(
    command: Annotated[List[str], typer.Argument(help="The glm-mlx command to run on every rank, e.g. generate MODEL -p hi.")],
    hosts: Annotated[Optional[str], typer.Option("--hosts", help="Comma-separated hosts (one rank each).")] = None,
    hostfile: Annotated[Optional[Path], typer.Option("--hostfile", help="An mlx.launch host file (JSON).")] = None,
    ranks: Annotated[int, typer.Option("-n", help="Ranks per host (e.g. -n 2 on one machine to try it).")] = 1,
    backend: Annotated[str, typer.Option("--backend", help="ring (TCP: Ethernet/Thunderbolt) or jaccl (TB5 RDMA).")] = "ring",
    macs: Annotated[Optional[str], typer.Option("--macs", help="The Mac of each rank in order, e.g. m3-ultra-512,m3-ultra-256 (default: each rank detects its own).")] = None,
    context: Annotated[Optional[int], typer.Option("--context", "-c", help="Context the layer split reserves KV cache for (default: the model's maximum, as in fit).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the mlx.launch command, do not run it.")] = False,
):
    """Run a command pipeline-parallel: each rank loads only its layers; rank 0 talks to you.

    The layers are split as `glm-mlx fit --model MODEL --pipeline MACS` plans them: in proportion to
    what each Mac can wire. Each rank prints its layers, its resident weights and the plan's figure.

    Example: glm-mlx launch --hosts mac1.local,mac2.local --macs m3-ultra-512,m3-ultra-256 -- chat ~/models/GLM-5.1-8bit
    Every host needs the same Python environment and the model at the same path (each reads only its shards).
    """
    if command and command[0] not in ("chat", "generate", "serve", "bench"):
        raise GlmMlxError(f"cannot launch {command[0]!r}", "Launch one of: chat, generate, serve, bench.")
    exe = mlx_launch()
    if exe is None:
        raise GlmMlxError("mlx.launch is neither beside this Python nor on PATH", "Install MLX in this environment (pip install mlx).")
    cmd = [exe, "--backend", backend, "--python", sys.executable]
    # The split is the planner's (glm-mlx fit --pipeline) for these Macs; every rank reads the same values.
    if macs:
        plan_macs = parse_macs(macs)  # unknown names fail here, before any rank starts
        cmd += ["--env", f"{ENV_MACS}={','.join(m.name for m in plan_macs)}"]
    if context is not None:
        cmd += ["--env", f"{ENV_CONTEXT}={context}"]
    if hostfile:
        cmd += ["--hostfile", str(hostfile)]
    elif hosts:
        cmd += ["--hosts", hosts]
    entry = Path(__file__).resolve().parent / "launch_entry.py"
    cmd += ["-n", str(ranks), "--", str(entry), *command]  # "--": the command's own options are not mlx.launch's
    Console(stderr=True).print(" ".join(shlex.quote(c) for c in cmd), soft_wrap=True, highlight=False)
    if not dry_run:
        raise typer.Exit(subprocess.call(cmd))
