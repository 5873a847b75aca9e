"""``/healthz`` (the process is alive), ``/readyz`` (it can take requests) and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from server import metrics
from server.auth import require_api_key
from server.service import DRAINING_RETRY_AFTER

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 while draining or if the engine thread died."""
    state = request.app.state.server_state
    engine = getattr(request.app.state, "engine", None)
    if state.draining:
        status = "draining"
    elif not state.ready or engine is None:
        status = "loading"
    elif not engine.is_alive:
        status = "engine stopped"
    else:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": str(DRAINING_RETRY_AFTER)})


async def _metrics_auth(request: Request) -> None:
    if request.app.state.settings.metrics_auth:
        require_api_key(request)


@router.get("/metrics", dependencies=[Depends(_metrics_auth)])
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render_latest()
    return Response(body, media_type=content_type)
