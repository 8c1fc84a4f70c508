"""The admin routes (``/admin/adapters*``) and vLLM's runtime LoRA endpoints, behind the admin token."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from serving import auth, servability
from serving.errors import AdapterRefusedError, NotFoundError, ValidationError
from serving.protocol.wire import WireModel
from serving.registry import NotServableError
from serving.service import Service


class AdapterIdBody(WireModel):
    adapter_id: str


class LoadLoraBody(WireModel):
    lora_name: str
    lora_path: str | None = None
    load_inplace: bool = False


class UnloadLoraBody(WireModel):
    lora_name: str | None = None
    lora_int_id: int | None = None


def admin_routes(service: Service) -> APIRouter:
    """Adapter residency and registration over ``service``; every route needs the admin token."""

    routes = APIRouter(route_class=auth.admin_route(service.settings.admin_token, command="server"))

    @routes.get("/admin/adapters")
    async def admin_adapters():
        return {
            "resident": service.engine.resident_adapters(),
            "registry": [{"id": e.id, "path": str(e.path), **e.metadata} for e in service.registry.list()],
        }

    @routes.post("/admin/adapters/load")
    async def admin_load(body: AdapterIdBody):
        adapter = service.resolve(body.adapter_id)
        if adapter is None:
            raise ValidationError("`adapter_id` names the base model, which is always loaded")
        started = time.perf_counter()
        await service.ensure_resident(adapter)
        return {"adapter_id": adapter.adapter_id, "resident": True, "seconds": round(time.perf_counter() - started, 3)}

    @routes.post("/admin/adapters/unload")
    async def admin_unload(body: AdapterIdBody):
        return {"adapter_id": body.adapter_id, "unloaded": await service.unload(body.adapter_id)}

    # vLLM's runtime LoRA endpoints, for tools written against vLLM.
    @routes.post("/v1/load_lora_adapter")
    async def vllm_load(body: LoadLoraBody):
        if body.lora_path:
            try:
                service.registry.add(Path(body.lora_path), body.lora_name, base_dir=service.base_dir, profile=service.settings.profile)
            except NotServableError as error:
                raise AdapterRefusedError(f"{error.message}: {servability.summary(error.violations)}") from error
        await service.ensure_resident(service.resolve(body.lora_name))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @routes.post("/v1/unload_lora_adapter")
    async def vllm_unload(body: UnloadLoraBody):
        if not body.lora_name:
            raise ValidationError("`lora_name` is required; integer ids are not used by this server")
        if not await service.unload(body.lora_name):
            raise NotFoundError(f"adapter {body.lora_name} is not loaded")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return routes
