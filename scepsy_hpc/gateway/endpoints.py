"""The gateway's endpoints file: which replicas serve each LLM, reloaded when the file changes.

```yaml
schema_version: 1          # optional; another value is refused (the file is from another scepsy)
time_scale: 1.0            # optional; the engines' time scale, so trace times are model seconds
auth:                      # optional; when present every /v1 call needs `Authorization: Bearer KEY`
  keys:
    - {id: k1a2b3, sha256: <hex sha256 of the key>, deployments: [demo], max_concurrent: 64, rpm: 6000}
max_requests: {demo: 200}  # optional; workflow requests in flight at once per deployment (gateway/admission.py);
                           # a bare number caps the LLMs with no deployment
request_idle_s: 60         # optional; a request with no call in flight this long (model seconds) has ended
request_wait_s: 600        # optional; how long a request may wait under the cap (model seconds) before a 503
llms:
  planner:
    deployment: demo                      # optional; the deployment it belongs to (keys are scoped by it)
    served_model: llama-3.1-8b-instruct   # optional; the name the engines serve (default: the llm key)
    aliases: [plan]                       # optional; other names clients may use for this same LLM
    max_outstanding: 256                  # optional per-replica cap
    replicas:
      - http://127.0.0.1:8001
      - {url: http://node2:8000, max_outstanding: 64, api_key: <the engine's secret>}
      - {url: http://node3:8000, weight: 0.25}   # optional, default 1; 0 < weight <= 1e9
```

JSON with the same shape is accepted too (JSON is YAML), and errors name ``file:line`` either way.
Replicas and caps follow the file while the gateway runs; `time_scale` is read once at start (the
trace clock must not jump). `scepsy up` writes the file from the node agents' reports
(`endpoints_from_agents`, `write_endpoints`).

`weight` is a replica's share of the LLM's calls relative to its siblings (its capacity: calls/s one
replica carries): the router sends a call to the free replica with the fewest outstanding calls per
unit of weight (gateway/routing.py). `scepsy up` writes it only for an LLM served by unlike replicas
(a mixed group of the plan, `perf.fit.replica_weights`); a replica of weight 1 is written without it,
so files of like replicas stay as they were.

An alias is another name for the same LLM, not a second pool: its calls share the replicas, the
outstanding counts and the FIFO. A name (key or alias) stands for one LLM only. One gateway serving
several deployments keys each LLM `deployment/llm` (`merge_endpoints`); clients address a
deployment's LLMs by their own names under `/d/{deployment}/v1`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence

from pydantic import Field, StrictInt, field_validator

from scepsy_hpc.backend.records import AgentReport
from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.base import SpecModel
from scepsy_hpc.spec.limits import FILE_BYTES
from scepsy_hpc.spec.records import PRIVATE, write_atomic
from scepsy_hpc.spec.source import SourceMap, load_yaml, parse_document

log = logging.getLogger("scepsy_hpc.gateway")

DEFAULT_MAX_OUTSTANDING = 256
SCHEMA_VERSION = 1


MAX_WEIGHT = 1e9   # a replica's weight: calls/s it carries, as the plan's capacity_rps (same bound)


class Replica(SpecModel):
    """One engine serving an LLM: its base URL (without /v1), an optional cap on calls in flight, the
    engine's secret (its serving job's `--api-key`), which the gateway sends as `Authorization: Bearer`,
    and its routing weight (its share of the LLM's calls relative to its siblings; 1 for like replicas)."""

    url: str
    max_outstanding: Annotated[int, Field(ge=1)] | None = None
    api_key: str | None = Field(default=None, repr=False)
    weight: Annotated[float, Field(gt=0.0, le=MAX_WEIGHT, allow_inf_nan=False)] = 1.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or len(v.split("://", 1)[1].strip("/")) == 0:
            raise ValueError(f"replica url must look like http://host:port, got {v!r}")
        v = v.rstrip("/")
        # Engines are addressed by base URL; the gateway appends the client's /v1/... path itself.
        if v.endswith("/v1"):
            raise ValueError(f"replica url {v!r} must not end in /v1; give the base URL, e.g. {v[:-3]!r}")
        return v


class LLMEndpoint(SpecModel):
    """The replicas of one LLM and how its calls are addressed to them."""

    deployment: str | None = None   # the deployment it belongs to: client keys are scoped by deployment
    served_model: str | None = None
    aliases: list[str] = []
    max_outstanding: Annotated[int, Field(ge=1)] = DEFAULT_MAX_OUTSTANDING
    replicas: list[Replica] = []

    @field_validator("replicas", mode="before")
    @classmethod
    def _bare_urls(cls, v: Any) -> Any:
        # A bare string is shorthand for {url: ...}; the dict is new, so it carries no unknown keys.
        if isinstance(v, list):
            return [{"url": item} if isinstance(item, str) else item for item in v]
        return v

    def cap(self, replica: Replica) -> int:
        """The replica's own cap, else the LLM's."""
        return replica.max_outstanding or self.max_outstanding


class ClientKey(SpecModel):
    """One client key as the gateway checks it: never the key itself, only its SHA-256."""

    id: str                                    # public id, shown by `scepsy keys list` and in logs
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    deployments: list[str]                     # the deployments whose LLMs it may call
    max_concurrent: Annotated[int, Field(ge=1)] | None = None   # calls in flight at once (None: no limit)
    rpm: Annotated[int, Field(ge=1)] | None = None              # requests per minute (None: no limit)


class Auth(SpecModel):
    """Client keys: with this section present, every /v1 call needs `Authorization: Bearer KEY`."""

    keys: list[ClientKey] = []


class Endpoints(SpecModel):
    """Every LLM of a deployment and its replicas."""

    schema_version: int = SCHEMA_VERSION
    time_scale: Annotated[float, Field(gt=0)] | None = None
    auth: Auth | None = None   # None: no key needed (a hand-run gateway); the daemon always writes it
    # the request cap (gateway/admission.py): per deployment, or one number for the LLMs with no deployment
    max_requests: Annotated[StrictInt, Field(ge=1)] | dict[str, Annotated[StrictInt, Field(ge=1)]] | None = None
    request_idle_s: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] | None = None
    request_wait_s: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] | None = None
    llms: dict[str, LLMEndpoint]

    def request_caps(self) -> dict[str | None, int]:
        """The request cap of each capped deployment (None: the LLMs with no deployment)."""
        if self.max_requests is None:
            return {}
        if isinstance(self.max_requests, int):
            return {None: self.max_requests}
        return dict(self.max_requests)

    def names(self) -> list[str]:
        """The LLM keys, sorted (each names one pool)."""
        return sorted(self.llms)

    def accepted_names(self) -> dict[str, str]:
        """Every name clients may put in `model` (keys and aliases) → its LLM key, sorted by name.

        On a conflict (only in endpoints built without `_check`) a key wins over an alias, and the
        first LLM in key order over a later one."""
        names = {key: key for key in self.llms}
        for key in sorted(self.llms):
            for alias in self.llms[key].aliases:
                names.setdefault(alias, key)
        return dict(sorted(names.items()))


def llm_deployment(llm_key: str, deployment: str | None) -> str | None:
    """The deployment an LLM belongs to: its file's `deployment`, else its key's part before '/', else none."""
    if deployment is not None:
        return deployment
    return llm_key.split("/", 1)[0] if "/" in llm_key else None


@dataclass(frozen=True)
class _Conflict:
    """An alias that is not a name of its LLM alone: `llms.<key>.aliases[<index>]`, and the other use."""

    key: str
    index: int
    what: str
    other: str = ""                         # the other use, named as in the file
    other_loc: tuple[Any, ...] | None = None
    fix: str = ""

    def message(self, other_line: int | None = None) -> str:
        """The problem, naming both uses (the other with its line when known)."""
        at = f" (line {other_line})" if other_line else ""
        return f"llms.{self.key}.aliases[{self.index}]: {self.what}{self.other}{at}{self.fix}"


def _name_conflicts(eps: Endpoints) -> list[_Conflict]:
    """Each alias that is empty, its own LLM's key, another LLM's key or another alias (after the first use)."""
    owner: dict[str, tuple[str, int]] = {}  # alias -> (key, index) of its first use, in file order
    out: list[_Conflict] = []
    one = "; a name stands for one LLM, so "
    for key, llm in eps.llms.items():
        for i, alias in enumerate(llm.aliases):
            if not alias.strip():
                out.append(_Conflict(key, i, "an alias must not be empty"))
            elif alias == key:
                out.append(_Conflict(key, i, f"alias {alias!r} is the LLM's own key; remove it"))
            elif alias in eps.llms:
                out.append(_Conflict(key, i, f"alias {alias!r} is also the key of ", f"llms.{alias}", ("llms", alias),
                                     one + "rename or remove the alias"))
            elif alias in owner:
                first_key, first_i = owner[alias]
                out.append(_Conflict(key, i, f"alias {alias!r} is also ", f"llms.{first_key}.aliases[{first_i}]",
                                     ("llms", first_key, "aliases", first_i), one + "keep one"))
            else:
                owner[alias] = (key, i)
    return out


def _check(eps: Endpoints, smap: SourceMap) -> list[str]:
    problems: list[str] = []
    if eps.schema_version != SCHEMA_VERSION:
        problems.append(f"{smap.where(('schema_version',))}: schema_version: {eps.schema_version} is not the one this "
                        f"scepsy reads ({SCHEMA_VERSION}); the file was written by another version: re-run `scepsy up`, "
                        f"or write schema_version: {SCHEMA_VERSION}")
    for name, llm in eps.llms.items():
        if not name.strip():
            problems.append(f"{smap.where(('llms', name), key=True)}: llms: an LLM name must not be empty")
        seen: dict[str, int] = {}
        for i, r in enumerate(llm.replicas):
            if r.url in seen:
                problems.append(f"{smap.where(('llms', name, 'replicas', i))}: llms.{name}.replicas[{i}]: "
                                f"duplicate replica {r.url!r} (also replicas[{seen[r.url]}]); list each engine once")
            seen.setdefault(r.url, i)
    if eps.auth is not None:
        problems += _auth_problems(eps.auth, smap)
    problems += _cap_problems(eps, smap)
    for c in _name_conflicts(eps):
        line = smap.line_of(c.other_loc, key=len(c.other_loc) == 2) if c.other_loc else None
        problems.append(f"{smap.where(('llms', c.key, 'aliases', c.index))}: {c.message(line)}")
    return problems


def _cap_problems(eps: Endpoints, smap: SourceMap) -> list[str]:
    """A request cap for a deployment no LLM belongs to (a typo would leave the real one uncapped)."""
    deps = {llm_deployment(name, llm.deployment) for name, llm in eps.llms.items()}
    named = ", ".join(sorted(d for d in deps if d is not None)) or "none"
    problems: list[str] = []
    for dep in eps.request_caps():
        if dep is None and None not in deps:
            problems.append(f"{smap.where(('max_requests',))}: max_requests: a bare number caps the LLMs with no "
                            f"deployment, and every LLM here has one ({named}); give it per deployment: "
                            "max_requests: {NAME: N}")
        elif dep is not None and dep not in deps:
            problems.append(f"{smap.where(('max_requests', dep), key=True)}: max_requests: no LLM here belongs to "
                            f"deployment {dep!r} (the LLMs' deployments: {named}); name one of those")
    return problems


def _auth_problems(auth: Auth, smap: SourceMap) -> list[str]:
    """Keys listed twice (by id or by hash) and keys that may call nothing."""
    problems: list[str] = []
    ids: dict[str, int] = {}
    hashes: dict[str, int] = {}
    for i, k in enumerate(auth.keys):
        where = f"{smap.where(('auth', 'keys', i))}: auth.keys[{i}]"
        if not k.id.strip():
            problems.append(f"{where}: the key id must not be empty")
        if k.id in ids:
            problems.append(f"{where}: key id {k.id!r} is also auth.keys[{ids[k.id]}]; give each key its own id")
        if k.sha256 in hashes:
            problems.append(f"{where}: the same key (sha256) as auth.keys[{hashes[k.sha256]}]; list each key once")
        if not k.deployments or not all(d.strip() for d in k.deployments):
            problems.append(f"{where}: deployments must name at least one deployment (or \"*\" for all), "
                            "none of them empty")
        ids.setdefault(k.id, i)
        hashes.setdefault(k.sha256, i)
    return problems


def parse_endpoints(data: Any, smap: SourceMap) -> Endpoints:
    """Validate parsed YAML/JSON as an endpoints file."""
    return parse_document(Endpoints, data, smap, "an endpoints file is a mapping with keys llms (and optionally time_scale)",
                          lambda eps: _check(eps, smap))


def load_endpoints(path: str | Path) -> Endpoints:
    """Load and validate an endpoints file (YAML or JSON)."""
    data, smap = load_yaml(path)
    return parse_endpoints(data, smap)


def endpoints_from_agents(agents: Mapping[str, AgentReport], time_scale: float | None,
                          weights: Mapping[str, Sequence[float]] | None = None) -> Endpoints:
    """Each LLM the agents run, with its healthy replicas (an LLM none serves yet has none); `weights`: per LLM,
    each replica's routing weight by replica number (`replica_weight`)."""
    replicas: dict[str, list[Replica]] = {}
    for report in agents.values():
        for inst in report.instances:
            reps = replicas.setdefault(inst.llm, [])
            if inst.healthy and inst.url:
                reps.append(Replica(url=inst.url, weight=replica_weight(weights, inst.llm, inst.replica)))
    return Endpoints(time_scale=time_scale or None,
                     llms={llm: LLMEndpoint(served_model=llm, replicas=reps) for llm, reps in replicas.items()})


def replica_weight(weights: Mapping[str, Sequence[float]] | None, llm: str, replica: int) -> float:
    """Replica `replica` of `llm`'s weight in `weights` (per LLM, by replica number; what `scepsy up` computes
    from the plan's mixed groups), 1 for an LLM or replica it does not list."""
    ws = (weights or {}).get(llm) or ()
    return float(ws[replica]) if 0 <= replica < len(ws) else 1.0


def merge_endpoints(deployments: Mapping[str, Endpoints], time_scale: float | None) -> Endpoints:
    """One gateway's endpoints for several deployments: each deployment's LLM `x` becomes key `dep/x`.

    Aliases: `dep/a` for each alias `a` of a deployment's LLM; the bare name (`x`, `a`) too when it
    is a name of exactly one deployment and not a key, so a name two deployments share is only
    reachable scoped (`dep/x`, or `x` under `/d/dep/v1`). Ordered by key, aliases sorted.
    """
    for dep in deployments:
        if not dep or "/" in dep:
            # Keys split at the first '/': a deployment named 'a/b' could collide with LLM 'b/x' of 'a'.
            raise SpecError(f"deployment name {dep!r} must be non-empty and contain no '/'")
    bare_uses: dict[str, set[str]] = {}
    for dep, eps in deployments.items():
        for name, llm in eps.llms.items():
            for bare in (name, *llm.aliases):
                bare_uses.setdefault(bare, set()).add(dep)
    keys = {f"{dep}/{name}" for dep, eps in deployments.items() for name in eps.llms}
    scoped = {f"{dep}/{a}" for dep, eps in deployments.items() for llm in eps.llms.values() for a in llm.aliases}
    taken = keys | scoped  # a bare name never shadows a scoped one (possible only when names hold '/')
    llms: dict[str, LLMEndpoint] = {}
    for dep in sorted(deployments):
        eps = deployments[dep]
        for name in sorted(eps.llms):
            llm = eps.llms[name]
            key = f"{dep}/{name}"
            aliases = {f"{dep}/{a}" for a in llm.aliases}
            aliases.update(b for b in (name, *llm.aliases) if len(bare_uses[b]) == 1 and b not in taken)
            llms[key] = llm.model_copy(update={"served_model": llm.served_model or name, "deployment": dep,
                                               "aliases": sorted(aliases - {key})})
    merged = Endpoints(time_scale=time_scale or None, llms=llms)
    conflicts = _name_conflicts(merged)
    if conflicts:  # only from inputs that skipped `_check` (built in code, not read from a file)
        raise SpecError([c.message() for c in conflicts])
    return merged


def write_endpoints(path: str | Path, eps: Endpoints) -> bool:
    """Write `eps` as the endpoints file, only when it changes (the gateway reloads on change); whether it did."""
    import yaml

    path = Path(path)
    doc = eps.model_dump(mode="json", exclude_none=True)
    for llm in doc["llms"].values():
        if not llm["aliases"]:
            del llm["aliases"]  # the common case: keep files without aliases as they were
        for rep in llm["replicas"]:
            if rep["weight"] == 1.0:
                del rep["weight"]   # like replicas (the common case): files as they were before weights
    text = yaml.safe_dump(doc, sort_keys=True)
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    write_atomic(path, text, mode=PRIVATE)
    return True


@dataclass(frozen=True)
class _Signature:
    mtime_ns: int
    size: int
    ino: int
    digest: bytes   # of the content: an atomic replace within one timestamp tick, of the same size, onto a
                    # reused inode number, looks unchanged to stat() alone (seen: a route never loaded)


class EndpointsWatcher:
    """Holds the endpoints of a file and reloads them when the file changes.

    `poll()` looks at the file at most every `min_interval_s`; a changed file (mtime, size, inode or
    content digest, so an atomic rename counts) is parsed again. A bad file keeps the last good endpoints and logs
    the error (with file:line) once per version of the file.
    """

    def __init__(self, path: str | Path, *, min_interval_s: float = 0.2) -> None:
        self.path = Path(path)
        self.min_interval_s = min_interval_s
        self._current: Endpoints | None = None
        self._sig: _Signature | None = None
        self._bad_sig: _Signature | None = None
        self._last_stat = float("-inf")
        self.reloads = 0
        self.last_error: str | None = None

    def _stat(self) -> _Signature | None:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                # a file over the bound is refused by the loader; its first bytes and size still tell versions apart
                head = f.read(FILE_BYTES.default + 1)
        except OSError:
            return None
        return _Signature(st.st_mtime_ns, st.st_size, st.st_ino, hashlib.blake2b(head, digest_size=16).digest())

    def load(self) -> Endpoints:
        """Read the file now; a bad file raises SpecError (used at startup, where failing is right)."""
        sig = self._stat()
        eps = load_endpoints(self.path)
        self._current, self._sig, self._last_stat = eps, sig, time.monotonic()
        return eps

    @property
    def current(self) -> Endpoints:
        """The last good endpoints (`load()` must have succeeded once)."""
        if self._current is None:
            raise RuntimeError("EndpointsWatcher.load() has not been called")
        return self._current

    def poll(self, *, force: bool = False) -> Endpoints:
        """Reload if the file changed since the last look (rate-limited unless `force`); return the endpoints."""
        now = time.monotonic()
        if not force and now - self._last_stat < self.min_interval_s:
            return self.current
        self._last_stat = now
        sig = self._stat()
        if sig is None or sig == self._sig or sig == self._bad_sig:
            # A missing file is usually mid-replace (write temp + rename); keep serving the last config.
            return self.current
        try:
            eps = load_endpoints(self.path)
        except SpecError as exc:
            self._bad_sig = sig
            self.last_error = str(exc)
            log.error("endpoints file changed but is invalid; keeping the previous endpoints:\n%s", exc)
            return self.current
        self._current, self._sig, self._bad_sig, self.last_error = eps, sig, None, None
        self.reloads += 1
        log.info("endpoints reloaded from %s: %s", self.path,
                 ", ".join(f"{n} ({len(eps.llms[n].replicas)} replicas)" for n in eps.names()))
        return eps
