"""Which LLM a call's `model` names: an LLM key or alias, tried first inside the call's deployment.

A gateway serving several deployments keys each LLM `deployment/llm` (`merge_endpoints`); under the
path prefix `/d/{deployment}` a client's bare LLM name is tried as `{deployment}/{model}` first, so a
workflow's own code works unchanged with the base URL `http://gateway/d/{deployment}/v1`.
"""

from __future__ import annotations

from typing import Iterable

from scepsy_hpc.gateway.routing import LLMPool, Router

# At most this many names in an error message (a gateway for many deployments has many).
LISTED_NAMES = 20


def resolve(router: Router, model: str, deployment: str | None) -> LLMPool | None:
    """The pool `model` names: under a deployment first as `{deployment}/{model}`, then as given."""
    if deployment is not None:
        pool = router.pool(f"{deployment}/{model}")
        if pool is not None:
            return pool
    return router.pool(model)


def names_in_scope(accepted: dict[str, str], deployment: str | None) -> dict[str, str]:
    """The names a client may give (→ LLM key): all of them, or under a deployment its own, unprefixed."""
    if deployment is None:
        return accepted
    prefix = deployment + "/"
    return {name[len(prefix):]: key for name, key in accepted.items() if name.startswith(prefix)}


def listing(names: Iterable[str]) -> str:
    """Names for a message, at most LISTED_NAMES of them."""
    names = list(names)
    if len(names) <= LISTED_NAMES:
        return ", ".join(names) or "(none)"
    return ", ".join(names[:LISTED_NAMES]) + f", … ({len(names)} in all; GET /v1/models lists them)"


def unknown_model_message(accepted: dict[str, str], model: str | None, deployment: str | None) -> str:
    """Why no pool answers to `model` (None: a models listing) and which names would work."""
    if not accepted:
        what = f"model {model!r}" if deployment is None else f"deployment {deployment!r}"
        return f"unknown {what}; this gateway serves no LLM yet (its endpoints file lists none)"
    if deployment is None:
        return f"unknown model {model!r}; this gateway serves: {listing(accepted)}"
    scoped = names_in_scope(accepted, deployment)
    if scoped:
        return f"unknown model {model!r} in deployment {deployment!r}; it serves: {listing(scoped)}"
    deployments = sorted({key.split("/", 1)[0] for key in accepted.values() if "/" in key})
    what = f"unknown deployment {deployment!r}" + (f" (model {model!r})" if model is not None else "")
    if deployments:
        return f"{what}; this gateway serves deployments: {listing(deployments)}"
    return (f"{what}; this gateway serves no deployments: use /v1 without /d/{deployment} and one of: "
            f"{listing(accepted)}")
