"""The gateway: one OpenAI-compatible endpoint for every LLM of one or more deployments, tracing each call."""

from scepsy_hpc.gateway.app import make_app
from scepsy_hpc.gateway.server import Gateway, main, run_gateway, start_gateway
from scepsy_hpc.gateway.endpoints import (Endpoints, EndpointsWatcher, LLMEndpoint, Replica, load_endpoints,
                                         merge_endpoints, parse_endpoints)

__all__ = ["Endpoints", "EndpointsWatcher", "Gateway", "LLMEndpoint", "Replica", "load_endpoints", "main", "make_app",
           "merge_endpoints", "parse_endpoints", "run_gateway", "start_gateway"]
