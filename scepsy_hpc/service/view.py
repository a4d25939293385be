"""`scepsy status --watch`: a live terminal view of every deployment, refreshed from the daemon's /v1/watch.

One table per deployment, one row per LLM: replicas healthy, calls per second and mean latency over the
last minute (the gateway's rolling window), calls queued in the gateway, running and waiting in the
engines, and the highest KV-cache use among its engines; below a deployment with a request cap, its requests
in flight, waiting and refused.
"""

from __future__ import annotations

import time
from typing import Any


def _fmt(x: Any, spec: str, unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def render(doc: dict[str, Any]) -> Any:
    """The view of one /v1/watch answer, as a rich renderable."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text(f"gateway {doc['gateway']['url'] or '-'}   {time.strftime('%H:%M:%S')}", style="bold")]
    if not doc["deployments"]:
        parts.append(Text("no deployments: `scepsy up PLAN|WORKFLOW` starts one"))
    for d in doc["deployments"]:
        colour = {"serving": "green", "degraded": "yellow", "failed": "red"}.get(d["state"], "cyan")
        t = Table(title=f"{d['name']}  [{colour}]{d['state']}[/{colour}]  job {d['job_id'] or '-'} {d['job_state'] or ''}",
                  title_justify="left")
        for col in ("LLM", "healthy", "rate/s", "latency", "TTFT", "gw queue", "running", "waiting", "KV use", "errors"):
            t.add_column(col, justify="right" if col != "LLM" else "left", no_wrap=True)
        for llm, row in sorted(d.get("llms", {}).items()):
            tr = row.get("traffic") or {}
            healthy = f"{row['healthy']}/{row['replicas']}"
            t.add_row(llm, healthy if row["healthy"] == row["replicas"] else f"[red]{healthy}[/red]",
                      _fmt(tr.get("rate_rps_60s"), ".2f"), _fmt(tr.get("latency_mean_s_60s"), ".2f", " s"),
                      _fmt(tr.get("ttft_mean_s_60s"), ".2f", " s"), _fmt(tr.get("queued"), "d"),
                      _fmt(row.get("running"), ".0f"), _fmt(row.get("waiting"), ".0f"),
                      _fmt(None if row.get("kv_use") is None else 100 * row["kv_use"], ".0f", " %"),
                      _fmt(tr.get("errors"), "d"))
        parts.append(t)
        cap = d.get("requests")
        if cap:
            parts.append(Text(f"requests in flight {cap['in_flight']} of at most {cap['max_requests']}, "
                              f"{cap['waiting']} waiting; {cap['waited']} waited, "
                              f"{cap['wait_timeouts'] + cap['queue_full']} refused (503)",
                              style="yellow" if cap["waiting"] else ""))
        if d.get("error"):
            parts.append(Text(d["error"], style="red"))
    return Group(*parts)


def watch(client: Any, interval_s: float) -> int:
    """Refresh the view every `interval_s` until Ctrl-C."""
    from rich.live import Live

    try:
        with Live(render(client.request("GET", "/v1/watch")), refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval_s)
                live.update(render(client.request("GET", "/v1/watch")))
    except KeyboardInterrupt:
        return 0
