"""What the server says about itself: ``/health`` (``/ping``), ``/info`` and Prometheus ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving import auth
from serving.errors import UnhealthyError
from serving.service import Service


def status_routes(service: Service) -> APIRouter:
    """Health, model info and metrics of ``service``."""
    routes = APIRouter()
    engine = service.engine

    @routes.get("/health")
    @routes.get("/ping")
    async def health(request: Request):
        if not request.app.state.ready:
            raise UnhealthyError("unhealthy")
        return Response(status_code=200)

    @routes.get("/info")
    async def info(request: Request):
        where = {"registry": str(service.registry.root)} if auth.is_admin(request, service.settings.admin_token) else {}
        return {
            "model_id": engine.model_name,
            "model_device_type": "cpu",
            "engine": type(engine).__name__,
            "max_input_length": service.max_input_length(),
            "max_total_tokens": engine.max_total_tokens,
            "max_stop_sequences": service.settings.max_stop_sequences,
            "max_best_of": 1,
            "default_max_new_tokens": service.settings.default_max_new_tokens,
            "adapter_source": "local",
            "servability_profile": service.settings.profile,
            **where,  # a filesystem path: for operators only
            "resident_adapters": engine.resident_adapters(),
        }

    @routes.get("/metrics")
    async def metrics():
        service.metrics.queue_depth.set(engine.queue_depth())
        service.observe_residency()  # adapters dropped when their last request ended count as evictions here
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return routes
