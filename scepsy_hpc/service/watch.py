"""What `scepsy status --watch` shows: per deployment and LLM, traffic (the gateway's rolling stats) and
engine load (each healthy engine's /metrics: running, waiting, KV-cache use), gathered on request only.

vLLM's names (`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`) are
read, and SGLang's (`sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:token_usage`) as well.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scepsy_hpc.service.daemon import Daemon

_GAUGES = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
           "vllm:kv_cache_usage_perc": "kv_use", "sglang:num_running_reqs": "running",
           "sglang:num_queue_reqs": "waiting", "sglang:token_usage": "kv_use"}
MAX_METRICS_BYTES = 4 * 1024 * 1024


def engine_load(text: str) -> dict[str, float]:
    """running, waiting and kv_use (0–1) summed over an engine's /metrics text (Prometheus format)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                key = _GAUGES.get(s.name)
                if key:
                    out[key] = out.get(key, 0.0) + float(s.value)
    except ValueError:
        return {}
    return out


async def collect(daemon: Daemon) -> dict[str, Any]:
    """Every deployment's status with its per-LLM traffic and engine load."""
    from scepsy_hpc.service.api import deployment_doc

    http = daemon._http
    sem = asyncio.Semaphore(16)

    async def get(url: str, secret: str | None) -> bytes | None:
        async with sem:
            try:
                async with http.get(url, headers={"Authorization": f"Bearer {secret}"} if secret else {}) as resp:
                    if resp.status != 200:
                        return None
                    return await resp.content.read(MAX_METRICS_BYTES)
            except Exception:   # an engine or gateway that does not answer shows no figures
                return None

    import json

    gw = daemon.gateway.url
    raw = await get(f"{gw}/scepsy/v1/stats", daemon.keys.daemon_key()) if gw else None
    try:
        stats = json.loads(raw) if raw else {}
    except ValueError:
        stats = {}
    models = stats.get("models", {}) if isinstance(stats, dict) else {}
    docs = [deployment_doc(daemon, d) for d in daemon.store.deployments()]
    targets = [(doc, i) for doc in docs for i in doc["instances"] if i["healthy"] and i["url"]]
    secrets = daemon.engine_secrets()   # engines may guard /metrics: each is called with its job's secret
    texts = await asyncio.gather(*(get(f"{i['url']}/metrics", secrets.get(i["job_id"])) for _, i in targets))
    for (_, inst), text in zip(targets, texts):
        inst["load"] = engine_load(text.decode(errors="replace")) if text else {}
    for doc in docs:
        per: dict[str, Any] = {}
        plan = (doc.get("continuity") or {}).get("capacity") or {}
        for inst in doc["instances"]:
            # replicas: the plan's count; healthy: engines taking calls (a cut-over's old and new engines overlap)
            row = per.setdefault(inst["llm"], {"replicas": plan.get(inst["llm"], {}).get("plan", 0), "healthy": 0,
                                               "running": 0.0, "waiting": 0.0, "kv_use": []})
            row["healthy"] += int(inst["routed"])
            load = inst.get("load") or {}
            row["running"] += load.get("running", 0.0)
            row["waiting"] += load.get("waiting", 0.0)
            if "kv_use" in load:
                row["kv_use"].append(load["kv_use"])
        for llm, row in per.items():
            kv = row.pop("kv_use")
            row["kv_use"] = max(kv) if kv else None
            row["traffic"] = models.get(f"{doc['name']}/{llm}", {})
        doc["llms"] = per
        caps = stats.get("requests") if isinstance(stats, dict) else None
        doc["requests"] = caps.get(doc["name"]) if isinstance(caps, dict) else None   # its request cap's figures
    return {"deployments": docs, "gateway": {"url": gw, "uptime_s": stats.get("uptime_s") if isinstance(stats, dict) else None}}
