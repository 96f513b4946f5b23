"""The HTTP API and web page (D18): FastAPI over the projections and run_events (as tuneline_app), acting
only by publishing commands on the bus. `python -m services.api` serves it with uvicorn."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

import nats
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from services.api.live import LiveFeeds
from services.api.settings import ApiSettings
from services.common.logging import configure_logging, get_logger

log = get_logger(__name__)
HERE = Path(__file__).resolve().parent
DESCRIPTION = """Tuneline's audit explorer and control surface. Reads the timeline projection and `run_events`;
every action is a command published on the bus (actor: the bearer token's subject) and answered by the
owning service's event. Roles: `viewer` reads, `operator` starts runs and controls training, `approver`
promotes, rejects, rolls back and restores (`admin`: all). `tuneline token create --role R` mints a token."""


def create_app(settings: ApiSettings | None = None, *, connect: bool = True) -> FastAPI:
    settings = settings or ApiSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not connect:  # the OpenAPI generator builds the app without servers
            yield
            return
        from services.api import reads
        from services.audit.db import app_pool

        if not settings.database_url:
            raise RuntimeError("DATABASE_URL is not set: the API reads the projections and run_events")
        app.state.pool = await app_pool(settings.database_url, min_size=1, max_size=settings.pool_size,
                                        reset=reads.release_reset)
        app.state.nc = await nats.connect(settings.nats_url, name="tuneline-api", **settings.nats_options)
        app.state.js = app.state.nc.jetstream()
        log.info("api_started", host=settings.host, port=settings.port)
        try:
            yield
        finally:
            await app.state.nc.drain()
            await app.state.pool.close()

    from services.api import pages, routes_act, routes_read, routes_replay

    app = FastAPI(title="Tuneline API", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.feeds = LiveFeeds()

    @app.get("/api/health", tags=["read"], summary="Liveness (no token needed)")
    async def health() -> dict:
        return {"ok": True}

    app.include_router(routes_read.router)
    app.include_router(routes_act.router)
    app.include_router(routes_replay.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return app


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker process (settings from the environment, logging configured)."""
    settings = ApiSettings()
    configure_logging("api", settings.log_level)
    return create_app(settings)


def main() -> None:
    import uvicorn

    settings = ApiSettings()
    configure_logging("api", settings.log_level)
    if settings.workers > 1:  # processes sharing the port: the reads' CPU spread over cores (bench/api.py)
        uvicorn.run("services.api.app:app_from_env", factory=True, workers=settings.workers, host=settings.host,
                    port=settings.port, log_level="warning", access_log=False)
        return
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                access_log=False)
