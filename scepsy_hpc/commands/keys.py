"""`scepsy keys create|list|revoke|show`: the client keys of the daemon's gateway, through its control API.

Every call to a deployment's LLMs through the gateway needs `Authorization: Bearer KEY` with a key of
that deployment (the openai SDK sends its `api_key` so). `scepsy up` makes the owner's key; `create`
makes more (shown once: only its hash is kept), `revoke` ends one (refused from the next call once it returns).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from scepsy_hpc.commands.argtypes import positive_int
from scepsy_hpc.commands.daemon import add_state_dir

OWNER_LIMITS = "the owner key made by `scepsy up` allows 512 calls in flight at once and any number per minute"


def add_arguments(sub: Any) -> None:
    """The `keys` subcommand."""
    k = sub.add_parser("keys", help="client keys of the gateway: create, list, revoke, show the owner's",
                       description=f"Client keys of the gateway: every /v1 call needs one of its deployment. "
                                   f"{OWNER_LIMITS[0].upper()}{OWNER_LIMITS[1:]}.")
    ksub = k.add_subparsers(dest="action", required=True, metavar="ACTION")
    cr = ksub.add_parser("create", help="a new key of a deployment (printed once: only its hash is kept)",
                         description=f"A new key of deployment NAME, printed once. Without --max-concurrent and --rpm "
                                     f"it has no limit; {OWNER_LIMITS}.")
    cr.add_argument("name", metavar="NAME", help="deployment name")
    cr.add_argument("--label", default="", help="a note shown by `keys list` (who or what uses it)")
    cr.add_argument("--max-concurrent", type=positive_int, metavar="N",
                    help="calls in flight at once with this key; more get HTTP 429 (default: no limit)")
    cr.add_argument("--rpm", type=positive_int, metavar="N",
                    help="requests per minute with this key; more get HTTP 429 with Retry-After (default: no limit)")
    cr.add_argument("--json", action="store_true", help="print one JSON object (with the key)")
    add_state_dir(cr)
    ls = ksub.add_parser("list", help="keys (id, deployment, label, created, revoked, limits; never the key)")
    ls.add_argument("name", nargs="?", metavar="NAME", help="only this deployment's keys")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    add_state_dir(ls)
    rv = ksub.add_parser("revoke", help="revoke a key by its id (the gateway refuses it from the next call once this returns)")
    rv.add_argument("key_id", metavar="KEY_ID", help="the key's id, as `scepsy keys list` shows it")
    rv.add_argument("--json", action="store_true", help="print one JSON object")
    add_state_dir(rv)
    sh = ksub.add_parser("show", help="print the owner key `scepsy up` made for a deployment",
                         description="Print the owner key of NAME, e.g. `export OPENAI_API_KEY=$(scepsy keys show NAME)`. "
                                     f"{OWNER_LIMITS[0].upper()}{OWNER_LIMITS[1:]}.")
    sh.add_argument("name", metavar="NAME", help="deployment name")
    sh.add_argument("--json", action="store_true", help="print one JSON object (key, id, base URL)")
    add_state_dir(sh)
    k.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """`scepsy keys ACTION`."""
    from scepsy_hpc.service.client import DaemonClient
    from scepsy_hpc.service.paths import StatePaths

    client = DaemonClient(StatePaths.of(args.state_dir))
    return {"create": _create, "list": _list, "revoke": _revoke, "show": _show}[args.action](args, client)


def _limits(k: dict[str, Any]) -> str:
    parts = [f"{k['max_concurrent']} at once" if k.get("max_concurrent") else "",
             f"{k['rpm']}/min" if k.get("rpm") else ""]
    return ", ".join(p for p in parts if p) or "no limit"


def _create(args: argparse.Namespace, client: Any) -> int:
    doc = client.request("POST", "/v1/keys", {"deployment": args.name, "label": args.label,
                                              "max_concurrent": args.max_concurrent, "rpm": args.rpm})
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    k = doc["key"]
    print(doc["secret"])
    import sys

    print(f"key {k['id']} of {k['deployment']} ({_limits(k)}): shown this once, keep it; "
          f"`scepsy keys revoke {k['id']}` ends it", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace, client: Any) -> int:
    doc = client.request("GET", "/v1/keys", query={"deployment": args.name})
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    from rich.table import Table
    from rich.text import Text

    from scepsy_hpc.commands.common import make_console

    t = Table()
    for col in ("ID", "DEPLOYMENT", "LABEL", "CREATED", "REVOKED", "LIMITS"):
        t.add_column(col, no_wrap=True)
    for k in doc["keys"]:
        # A label is the user's text: shown as text, never read as rich markup ("[/]" would not print).
        t.add_row(k["id"], k["deployment"], Text(k["label"] or "-"), _when(k["created"]),
                  _when(k["revoked_at"]) if k["revoked"] else "-", _limits(k))
    make_console().print(t if doc["keys"] else "no keys: `scepsy up` makes the owner's, `scepsy keys create NAME` more")
    return 0


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _revoke(args: argparse.Namespace, client: Any) -> int:
    from urllib.parse import quote

    doc = client.request("DELETE", f"/v1/keys/{quote(args.key_id, safe='')}")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    k = doc["key"]
    print(f"key {k['id']} of {k['deployment']} revoked: the gateway refuses it from now on")
    return 0


def _show(args: argparse.Namespace, client: Any) -> int:
    from urllib.parse import quote

    doc = client.request("GET", f"/v1/deployments/{quote(args.name, safe='')}/owner-key")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(doc["secret"])
    return 0
