"""The entrypoint driver: a workflow's real program (`driver.entrypoint`) run once per request.

Request i calls `fn(input_i, base_url)` with base_url = `{gateway}/r/{request_id}/v1`, so any
framework's OpenAI client tags its calls with the request id without setting a header.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import inspect
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from scepsy_hpc.drive.core import (
    DriveResult, RequestResult, SpanReporter, make_session, normalize_base, request_id, run_arrivals,
)
from scepsy_hpc.errors import SpecError
from scepsy_hpc.spec.workflow import Workflow

_ENTRYPOINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# Sync entrypoints run in threads; an open loop may have many requests in flight at once.
_MAX_THREADS = 256


def _module_root(module: ModuleType) -> Path | None:
    """The directory a top-level module (or package) was imported from."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve().parent
    spec = getattr(module, "__spec__", None)
    return path.parent if spec is not None and spec.submodule_search_locations else path


def _importable_dirs() -> set[Path]:
    return {Path(p or os.getcwd()).resolve() for p in sys.path if isinstance(p, str)}


def _forget_stale(top: str, search: Path) -> None:
    """Drop `top` from sys.modules if an earlier load imported it from another workflow's directory.

    Two workflows may both name their module `agent`. A module whose directory is no longer on
    sys.path can only have come from a temporary entry like ours, so it is safe to forget;
    installed and standard-library modules are never touched.
    """
    mod = sys.modules.get(top)
    if mod is None:
        return
    root = _module_root(mod)
    if root is None or root == search or root in _importable_dirs():
        return
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]


def load_entrypoint(entrypoint: str, search_dir: str | Path) -> Callable[..., Any]:
    """Import `module:function`, the module looked up first in `search_dir` (the workflow file's directory)."""
    if not _ENTRYPOINT.match(entrypoint):
        raise SpecError(f"driver.entrypoint {entrypoint!r}: expected 'module:function', e.g. 'agent:run'")
    mod_name, fn_name = entrypoint.split(":")
    search = Path(search_dir).resolve()
    _forget_stale(mod_name.split(".")[0], search)
    sys.path.insert(0, str(search))
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
            raise SpecError(f"driver.entrypoint {entrypoint!r}: no module {mod_name!r} in {search} or on sys.path; "
                            f"put {mod_name.replace('.', '/')}.py beside the workflow file, install it, "
                            f"or fix driver.entrypoint") from None
        raise SpecError(f"driver.entrypoint {entrypoint!r}: importing {mod_name!r} failed: {exc}; "
                        f"install the missing package (e.g. pip install {exc.name})") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module raised at import time
        raise SpecError(f"driver.entrypoint {entrypoint!r}: importing {mod_name!r} raised "
                        f"{type(exc).__name__}: {exc}") from exc
    finally:
        try:
            sys.path.remove(str(search))
        except ValueError:
            pass
    fn = getattr(module, fn_name, None)
    where = getattr(module, "__file__", mod_name)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)
        raise SpecError(f"driver.entrypoint {entrypoint!r}: {where} has no {fn_name!r}; define "
                        f"'async def {fn_name}(input: dict, base_url: str)' there or fix driver.entrypoint"
                        + (f" (functions there: {', '.join(public)})" if public else ""))
    if not callable(fn):
        raise SpecError(f"driver.entrypoint {entrypoint!r}: {fn_name!r} in {where} is a {type(fn).__name__}, "
                        f"not a function; point driver.entrypoint at a callable(input, base_url)")
    return fn


def read_inputs(path: str | Path) -> list[dict[str, Any]]:
    """Request inputs from a JSONL file: one JSON object per line, blank lines skipped."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError(f"{p}: cannot read driver inputs: {exc.strerror}; fix driver.inputs "
                        f"(a path relative to the workflow file)") from None
    inputs: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{p}:{n}: not JSON ({exc.msg} at column {exc.colno}); "
                            f"each line of driver inputs is one JSON object") from None
        if not isinstance(obj, dict):
            raise SpecError(f"{p}:{n}: expected a JSON object (the input of one request), "
                            f"got {type(obj).__name__}")
        inputs.append(obj)
    if not inputs:
        raise SpecError(f"{p}: no inputs; write one JSON object per line, or drop driver.inputs "
                        f"to call the entrypoint with {{}}")
    return inputs


async def _invoke(fn: Callable[..., Any], is_async: bool, executor: ThreadPoolExecutor,
                  arg: dict[str, Any], base_url: str) -> Any:
    if is_async:
        return await fn(arg, base_url)
    out = await asyncio.get_running_loop().run_in_executor(executor, fn, arg, base_url)
    return await out if inspect.isawaitable(out) else out


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


async def drive_entrypoint(wf: Workflow, wf_dir: str | Path, gateway_url: str, *, n_requests: int,
                           rate_rps: float | None = None, concurrency: int = 1, seed: int = 0,
                           time_scale: float = 1.0, request_prefix: str = "r", api_key: str | None = None) -> DriveResult:
    """Run the workflow's real program once per request through the gateway, bracketed by request spans (sent
    with `api_key`, the gateway's client key; the program itself reads its key from its environment, as the
    examples read SCEPSY_API_KEY or OPENAI_API_KEY)."""
    if wf.driver is None:
        raise SpecError(f"workflow {wf.name!r} has no driver; add 'driver: {{entrypoint: module:function}}' "
                        f"or drive its program instead")
    wf_dir = Path(wf_dir)
    entry = wf.driver.entrypoint
    fn = load_entrypoint(entry, wf_dir)
    inputs = read_inputs(wf_dir / wf.driver.inputs) if wf.driver.inputs else [{}]
    is_async = _is_async(fn)
    base = normalize_base(gateway_url)
    threads = min(_MAX_THREADS, max(1, n_requests if rate_rps is not None else concurrency))

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="scepsy-drive") as executor:
        async with make_session(api_key=api_key) as session:
            spans = SpanReporter(session, base)

            async def run_one(i: int) -> RequestResult:
                rid = request_id(request_prefix, i)
                errors: list[str] = []
                # A copy: a program that mutates its input must not change later requests.
                arg = copy.deepcopy(inputs[i % len(inputs)])
                t0 = time.monotonic()
                await spans.event("request", "start", rid, name=wf.name, errors=errors)
                try:
                    await _invoke(fn, is_async, executor, arg, f"{base}/r/{rid}/v1")
                except Exception as exc:  # noqa: BLE001 - one failed request must not stop the drive
                    errors.append(f"{entry}: {type(exc).__name__}: {exc}")
                latency = (time.monotonic() - t0) / time_scale
                await spans.event("request", "end", rid, name=wf.name, status="error" if errors else "ok",
                                  error=errors[0] if errors else None, errors=errors)
                return RequestResult(rid, "error" if errors else "ok", latency, None, tuple(errors))

            results, wall_s = await run_arrivals(run_one, n_requests, rate_rps=rate_rps, concurrency=concurrency,
                                                 seed=seed, time_scale=time_scale)
            reported = spans.enabled
    return DriveResult({r.request: r for r in results}, wall_s / time_scale, time_scale, reported,
                       {"driver": "entrypoint", "workflow": wf.name, "entrypoint": entry,
                        "seed": seed})
