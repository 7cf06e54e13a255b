"""``qlora-ray cluster check``: can every node of a Ray cluster run 4-bit QLoRA?"""

from __future__ import annotations

import json

import typer
from rich.table import Table

from qlora_ray.cli.app import app, console, err_console, user_errors

cluster_app = typer.Typer(help="Inspect a Ray cluster before sending a sweep to it.",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command()
@user_errors
def check(
    address: str = typer.Argument("auto", help="Ray address: auto (the cluster on this machine), "
                                  "host:port (the head's GCS port, 6379) or ray://host:10001."),
    timeout: float = typer.Option(180.0, "--timeout", help="Seconds to wait for every node's probe."),
    allow_cpu: bool = typer.Option(False, "--allow-logical-gpus",
                                   help="Accept nodes whose Ray GPUs are labels without CUDA "
                                        "(CI, one-machine test clusters); check them on the CPU."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """List the cluster's nodes and GPUs by type, and run an NF4 matmul on every alive node.

    Exit status 2 if any node fails, naming the node and its error.

    Examples:
      qlora-ray cluster check auto
      RAY_AUTH_MODE=token qlora-ray cluster check 10.128.0.5:6379
      qlora-ray cluster check ray://localhost:10001 --timeout 600
    """
    from qlora_ray.cluster import check_cluster

    report = check_cluster(address, timeout_s=timeout, allow_cpu=allow_cpu)
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    else:
        console.print(_table(report))
        gpus = ", ".join(f"{t} x{g:g}" for t, g in sorted(report.gpus_by_type.items())) or "none"
        console.print(f"Ray {report.ray_version} at {report.address}: {len(report.alive)} alive "
                      f"node(s), GPUs by type: {gpus}")
    if report.failures:
        for node in report.failures:
            for error in node.errors:
                err_console.print(f"[bold red]FAIL[/] {node.name}: ", end="")
                err_console.print(error, markup=False, highlight=False, soft_wrap=True)
        err_console.print(f"{len(report.failures)} of {len(report.alive)} node(s) cannot run 4-bit QLoRA")
        raise typer.Exit(2)
    if not as_json:
        console.print(f"[green]ok[/]: all {len(report.alive)} alive node(s) ran an NF4 matmul")


def _table(report) -> Table:
    table = Table(title=f"Ray cluster at {report.address}")
    for column in ("node", "role", "CPU", "GPU", "type", "custom", "4-bit", "device", "detail"):
        table.add_column(column, justify="right" if column in ("CPU", "GPU") else "left")
    for node in report.nodes:
        custom = " ".join(f"{k}={v:g}" for k, v in sorted(node.custom.items()))
        verdict = {True: "[green]ok[/]", False: "[bold red]FAIL[/]", None: "-"}[node.ok]
        devices = ", ".join(dict.fromkeys(p.device for p in node.probes)) or "-"
        if not node.alive:
            detail = "dead"
        elif node.ok is False:
            detail = "error below"
        else:
            detail = "; ".join(dict.fromkeys(
                p.note or f"bnb {p.versions.get('bitsandbytes', '?')} {p.seconds:.0f}s" for p in node.probes))
        table.add_row(f"{node.address} {node.node_id[:8]}", "head" if node.is_head else "worker",
                      f"{node.cpus:g}", f"{node.gpus:g}", node.accelerator or "-", custom or "-",
                      verdict, devices, detail or "-")
    return table
