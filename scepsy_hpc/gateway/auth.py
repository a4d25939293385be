"""Client keys at the gateway: who may call, which deployments, and how fast.

With an `auth` section in the endpoints file every `/v1` call (and the span, stats and metrics
routes) needs `Authorization: Bearer KEY`. The file holds only each key's SHA-256, so the gateway
looks a key up by its hash; the lookup table is rebuilt when the file is reloaded, so a key removed
from the file (revoked) is refused from the next call on. A key may call the LLMs of its
`deployments` (`"*"`: every one). Limits per key: `max_concurrent` calls in flight and `rpm`
calls per minute, a token bucket holding `rpm` tokens refilled at `rpm / 60` per second (so a
burst of up to `rpm` calls, then `rpm` a minute). A refusal carries `Retry-After` seconds.

Keys never leave this module: refusals and counters name a key by its public id only.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from scepsy_hpc.gateway.endpoints import Auth, ClientKey, Endpoints, llm_deployment

ANY_DEPLOYMENT = "*"
# How a client finds its key; said in every 401.
HOW_TO_GET_A_KEY = ("send `Authorization: Bearer KEY`; the deployment's key is printed by `scepsy keys show NAME` "
                    "(NAME: the deployment), more by `scepsy keys create NAME`")


@dataclass(frozen=True)
class Denial:
    """Why a call is refused, as the client's OpenAI-style error says it."""

    status: int
    message: str
    type: str
    code: str
    retry_after_s: int | None = None

    def headers(self) -> dict[str, str]:
        """Headers of the refusal (`Retry-After` on 429, `WWW-Authenticate` on 401)."""
        if self.status == 401:
            return {"WWW-Authenticate": 'Bearer realm="scepsy"'}
        if self.retry_after_s is not None:
            return {"Retry-After": str(self.retry_after_s)}
        return {}


@dataclass(eq=False)
class KeyUse:
    """One key's live state and counters, kept by id across reloads (in-flight counts must stay right)."""

    in_flight: int = 0
    tokens: float = 0.0
    refilled: float = 0.0          # monotonic time of the last refill
    calls: int = 0                 # admitted calls
    refused: int = 0               # calls to an LLM outside the key's deployments
    rate_limited: dict[str, int] = field(default_factory=dict)   # by limit: max_concurrent, rpm


def key_digest(key: str) -> str | None:
    """The hex SHA-256 of a key as the endpoints file stores it (None for a key that is not text)."""
    try:
        return hashlib.sha256(key.encode("utf-8")).hexdigest()
    except UnicodeEncodeError:   # lone surrogates from a header decoded with surrogateescape
        return None


class KeyRing:
    """The client keys of the endpoints in force, their limits and counters."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._auth: Auth | None = None
        self._eps: Endpoints | None = None
        self._by_hash: dict[str, ClientKey] = {}
        self._deployments: dict[str, str | None] = {}   # LLM key -> its deployment
        self.uses: dict[str, KeyUse] = {}              # by key id; ids come from the file, never from clients
        self.unauthorized: dict[str, int] = {"missing": 0, "malformed": 0, "invalid": 0}

    @property
    def enabled(self) -> bool:
        """Whether keys are required (the endpoints file has an `auth` section)."""
        return self._auth is not None

    def update(self, eps: Endpoints) -> None:
        """Follow the endpoints in force (cheap when they are the ones seen last)."""
        if eps is self._eps:
            return
        self._eps = eps
        self._deployments = {name: llm_deployment(name, llm.deployment) for name, llm in eps.llms.items()}
        if eps.auth is self._auth:
            return
        self._auth = eps.auth
        keys = eps.auth.keys if eps.auth is not None else []
        self._by_hash = {k.sha256: k for k in keys}
        now = self.clock()
        for k in keys:
            use = self.uses.get(k.id)
            if use is None:
                self.uses[k.id] = KeyUse(tokens=float(k.rpm or 0), refilled=now)
            elif k.rpm is not None:
                use.tokens = min(use.tokens, float(k.rpm))   # a lowered rpm holds from now on

    def keys(self) -> list[ClientKey]:
        """The keys in force."""
        return list(self._by_hash.values())

    def authenticate(self, headers: list[str]) -> ClientKey | Denial:
        """The key the request's `Authorization` header(s) carry, or why it is refused (401)."""
        if len(headers) > 1:   # which one counts would be a guess: refuse
            self.unauthorized["malformed"] += 1
            return _unauthorized("the request has several Authorization headers; send one: " + HOW_TO_GET_A_KEY)
        header = headers[0] if headers else None
        if header is None or not header.strip():
            self.unauthorized["missing"] += 1
            return _unauthorized("this gateway needs an API key and the request has none; " + HOW_TO_GET_A_KEY)
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            self.unauthorized["malformed"] += 1
            return _unauthorized("the Authorization header is not of the form `Bearer KEY`; " + HOW_TO_GET_A_KEY)
        digest = key_digest(token)
        key = self._by_hash.get(digest) if digest is not None else None
        if key is None:
            self.unauthorized["invalid"] += 1
            return _unauthorized("the API key given is not valid at this gateway (unknown, or revoked); "
                                 + HOW_TO_GET_A_KEY)
        return key

    def deployment_of(self, llm_key: str) -> str | None:
        """The deployment of an LLM of the endpoints in force."""
        return self._deployments.get(llm_key, llm_deployment(llm_key, None))

    def may_call(self, key: ClientKey, llm_key: str) -> bool:
        """Whether `key` may call the LLM keyed `llm_key`."""
        if ANY_DEPLOYMENT in key.deployments:
            return True
        dep = self.deployment_of(llm_key)
        return dep is not None and dep in key.deployments

    def refuse(self, key: ClientKey) -> None:
        """Count a call to an LLM outside the key's deployments."""
        self._use(key).refused += 1

    def admit(self, key: ClientKey) -> Denial | None:
        """Take one call slot and one token of `key` (None), or say which limit refuses it (429)."""
        use = self._use(key)
        now = self.clock()
        if key.rpm is not None:
            rate = key.rpm / 60.0
            use.tokens = min(float(key.rpm), use.tokens + (now - use.refilled) * rate)
            use.refilled = now
        if key.max_concurrent is not None and use.in_flight >= key.max_concurrent:
            use.rate_limited["max_concurrent"] = use.rate_limited.get("max_concurrent", 0) + 1
            return Denial(429, f"key {key.id} has {use.in_flight} calls in flight, its limit (max_concurrent "
                               f"{key.max_concurrent}); retry when one has finished, or use a key with a higher "
                               "max_concurrent", "requests", "rate_limit_exceeded", retry_after_s=1)
        if key.rpm is not None:
            if use.tokens < 1.0:
                wait_s = max(1, math.ceil((1.0 - use.tokens) / (key.rpm / 60.0)))
                use.rate_limited["rpm"] = use.rate_limited.get("rpm", 0) + 1
                return Denial(429, f"key {key.id} is over its limit of {key.rpm} requests per minute (rpm); retry "
                                   f"in {wait_s} s, or use a key with a higher rpm", "requests", "rate_limit_exceeded",
                              retry_after_s=wait_s)
            use.tokens -= 1.0
        use.in_flight += 1
        use.calls += 1
        return None

    def set_waiting(self, key: ClientKey, waiting: bool) -> None:
        """A call of `key` waits at the request cap (True: its slot is given back, so the key's admitted requests
        keep calling) or goes in after waiting (False: it takes its slot back, over `max_concurrent` if need be:
        it was admitted within the limit)."""
        use = self._use(key)
        use.in_flight = max(0, use.in_flight - 1) if waiting else use.in_flight + 1

    def release(self, key: ClientKey) -> None:
        """Give back the call slot `admit` took."""
        use = self.uses.get(key.id)
        if use is not None and use.in_flight > 0:
            use.in_flight -= 1

    def _use(self, key: ClientKey) -> KeyUse:
        use = self.uses.get(key.id)
        if use is None:
            use = self.uses[key.id] = KeyUse(tokens=float(key.rpm or 0), refilled=self.clock())
        return use

    def stats(self) -> dict[str, object]:
        """`auth` of `GET /scepsy/v1/stats`: whether keys are needed, 401s by reason, and per key id its counters."""
        return {"enabled": self.enabled, "keys": len(self._by_hash), "unauthorized": dict(self.unauthorized),
                "per_key": {kid: {"calls": u.calls, "in_flight": u.in_flight, "refused": u.refused,
                                  "rate_limited": dict(u.rate_limited)} for kid, u in sorted(self.uses.items())}}


def _unauthorized(message: str) -> Denial:
    return Denial(401, message, "invalid_request_error", "invalid_api_key")
