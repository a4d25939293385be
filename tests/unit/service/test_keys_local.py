"""Client keys end to end on the local backend with a real daemon: `up` makes the owner key, the openai SDK works
with it (streaming too), `keys create|list|revoke|show` through the control API, the endpoints file's `auth` and
per-job engine secrets, a revoked key out of the file at once; keys never in the logs nor the trace. The gateway's
and engines' refusals (401 without a key, another deployment's key, a revoked key, an engine without its secret)
need the gateway's and engines' checks (helpers gwsec and engsec)."""

from __future__ import annotations

import json
import re
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

KEY = re.compile(r"^sk-scepsy-[0-9a-f]{8}-[A-Za-z0-9_-]{43}$")


def _chat(base_url: str, key: str, *, stream: bool = False) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "hello"}]
    if stream:
        chunks = client.chat.completions.create(model="generator", messages=messages, max_tokens=4, stream=True)
        return "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    out = client.chat.completions.create(model="generator", messages=messages, max_tokens=4)
    return out.choices[0].message.content or ""


def _status_of(url: str, key: str | None, body: dict[str, Any] | None = None) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


CALL = {"model": "generator", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}


def _up(sv: Any, state: Path, tmp_path: Path, name: str, nodes: tuple[str, str]) -> dict[str, Any]:
    up = sv.scepsy(state, "up", str(sv.small_plan(tmp_path / f"{name}.yaml", nodes=nodes)), "--name", name, "--detach",
                   "--time-scale", "0.05")
    assert up.returncode == 0, up.stderr
    assert f"export OPENAI_API_KEY=$(scepsy keys show {name}" in up.stdout, up.stdout
    return sv.wait_state(state, name, "serving")


def test_keys_lifecycle_through_the_cli_the_endpoints_file_and_the_openai_sdk(tmp_path: Path, state: Path,
                                                                             sv: Any) -> None:
    assert sv.scepsy(state, "daemon", "start", "--poll", "0.5", "--trace").returncode == 0
    doc = _up(sv, state, tmp_path, "ka", ("node1", "node2"))
    shown = sv.scepsy(state, "keys", "show", "ka")
    owner = shown.stdout.strip()
    assert shown.returncode == 0 and KEY.match(owner), shown.stderr
    assert stat.S_IMODE((state / "deployments" / "ka" / "owner.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700 and stat.S_IMODE((state / "daemon.log").stat().st_mode) == 0o600

    assert _chat(doc["base_url"], owner) and _chat(doc["base_url"], owner, stream=True)

    listed = sv.scepsy(state, "keys", "list", "--json")
    (row,) = json.loads(listed.stdout)["keys"]            # one JSON document, never the key nor its hash
    assert (row["deployment"], row["label"], row["max_concurrent"], row["rpm"], row["revoked"]) == \
        ("ka", "owner", 512, None, False)
    assert owner not in listed.stdout and "sha256" not in listed.stdout

    made = sv.scepsy(state, "keys", "create", "ka", "--label", "ci", "--rpm", "30", "--json")
    created = json.loads(made.stdout)
    extra, extra_id = created["secret"], created["key"]["id"]
    assert KEY.match(extra) and created["key"]["rpm"] == 30 and created["key"]["label"] == "ci"

    endpoints = state / "gateway" / "endpoints.yaml"
    assert stat.S_IMODE(endpoints.stat().st_mode) == 0o600
    eps = yaml.safe_load(endpoints.read_text())
    from scepsy_hpc.service.keys import key_sha256

    auth = {k["id"]: k for k in eps["auth"]["keys"]}
    assert auth[row["id"]]["sha256"] == key_sha256(owner) and auth[row["id"]]["deployments"] == ["ka"]
    assert auth[extra_id]["rpm"] == 30 and auth["daemon"]["deployments"] == ["*"]
    # each replica carries its own job's engine secret, as written into that job's serve.json
    secrets = {}
    for job in doc["jobs"]:
        serve = json.loads((state / "deployments" / "ka" / "jobs" / job["name"] / "serve.json").read_text())
        secrets[job["job_id"]] = serve["engine_secret"]
    assert len(set(secrets.values())) == len(doc["jobs"]) == 2 and all(len(s) >= 43 for s in secrets.values())
    for inst in doc["instances"]:
        (rep,) = eps["llms"][f"ka/{inst['llm']}"]["replicas"]
        assert rep == {"url": inst["url"], "api_key": secrets[inst["job_id"]]}

    revoked = sv.scepsy(state, "keys", "revoke", extra_id)
    t0 = time.monotonic()
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert extra_id not in {k["id"] for k in yaml.safe_load(endpoints.read_text())["auth"]["keys"]}   # at once
    assert time.monotonic() - t0 < 1.0
    twice = sv.scepsy(state, "keys", "revoke", extra_id)
    assert twice.returncode != 0 and f"key {extra_id!r} of 'ka' is already revoked" in twice.stderr
    unknown = sv.scepsy(state, "keys", "revoke", "deadbeef")
    assert unknown.returncode != 0 and "no key 'deadbeef'" in unknown.stderr and "Traceback" not in unknown.stderr
    nowhere = sv.scepsy(state, "keys", "create", "nope")
    assert nowhere.returncode != 0 and "no deployment 'nope'" in nowhere.stderr and "ka" in nowhere.stderr
    assert sv.scepsy(state, "keys", "show", "nope").returncode != 0

    drive = sv.scepsy(state, "drive", "ka", "--requests", "3", "--json")   # drive fetches the owner key itself
    assert drive.returncode == 0 and json.loads(drive.stdout)["ok"] == 3, drive.stdout + drive.stderr

    daemon = json.loads(sv.scepsy(state, "daemon", "status", "--json").stdout)
    trace = Path(daemon["gateway"]["trace"])
    assert trace.parent == state / "gateway" / "traces" and re.match(r"gateway-\d{8}T\d{6}\.\d+Z-\d+\.jsonl$", trace.name)
    assert trace.stat().st_size > 0
    for f in (state / "daemon.log", state / "gateway" / "gateway.log", trace):
        text = f.read_text()
        assert owner not in text and extra not in text and "sk-scepsy-" not in text, f
        assert not any(s in text for s in secrets.values()), f


def test_the_gateway_refuses_no_key_another_deployments_key_and_a_revoked_key_and_engines_their_secretless_calls(
        tmp_path: Path, state: Path, sv: Any) -> None:
    assert sv.scepsy(state, "daemon", "start", "--poll", "0.5").returncode == 0
    a = _up(sv, state, tmp_path, "da", ("node1", "node2"))
    b = _up(sv, state, tmp_path, "db", ("node3", "node4"))
    key_a, key_b = sv.owner_key(state, "da"), sv.owner_key(state, "db")
    url_a, url_b = f"{a['base_url']}/chat/completions", f"{b['base_url']}/chat/completions"
    assert _status_of(url_a, key_a, CALL) == 200 and _status_of(url_b, key_b, CALL) == 200
    assert _status_of(url_a, None, CALL) == 401
    assert _status_of(url_a, "sk-scepsy-00000000-" + "x" * 43, CALL) == 401
    assert _status_of(url_b, key_a, CALL) == 404   # A's key on B: model_not_found, naming no other deployment
    assert _status_of(f"{a['gateway_url']}/v1/chat/completions", key_a, {**CALL, "model": "db/generator"}) == 404
    made = json.loads(sv.scepsy(state, "keys", "create", "da", "--json").stdout)
    assert _status_of(url_a, made["secret"], CALL) == 200
    assert sv.scepsy(state, "keys", "revoke", made["key"]["id"]).returncode == 0
    assert _status_of(url_a, made["secret"], CALL) == 401   # refused from the first call after `revoke` returns
    # an engine called directly: only with its job's secret
    gen = next(i for i in a["instances"] if i["llm"] == "generator")
    job = next(j for j in a["jobs"] if j["job_id"] == gen["job_id"])
    secret = json.loads((state / "deployments" / "da" / "jobs" / job["name"] / "serve.json").read_text())["engine_secret"]
    direct = f"{gen['url']}/v1/chat/completions"
    body = {**CALL, "model": "generator"}
    assert _status_of(direct, None, body) == 401 and _status_of(direct, key_a, body) == 401
    assert _status_of(direct, secret, body) == 200
    # the daemon still reads the gateway's stats with its own key: the deployments stay serving
    assert sv.status(state, "da")["state"] == "serving"
    for f in (state / "daemon.log", state / "gateway" / "gateway.log"):
        assert "sk-scepsy-" not in f.read_text() and secret not in f.read_text()
