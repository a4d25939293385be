"""The gateway: one OpenAI-compatible endpoint for every LLM of a deployment, tracing each call."""

from scepsy_hpc.gateway.app import Gateway, main, make_app, run_gateway, start_gateway
from scepsy_hpc.gateway.endpoints import Endpoints, EndpointsWatcher, LLMEndpoint, Replica, load_endpoints, parse_endpoints

__all__ = ["Endpoints", "EndpointsWatcher", "Gateway", "LLMEndpoint", "Replica", "load_endpoints", "main", "make_app",
           "parse_endpoints", "run_gateway", "start_gateway"]
