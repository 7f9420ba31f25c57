"""The Ray Serve application: a FastAPI ingress in front of the multiplexed, batched Scorer.

    serve run serve/config.yaml            # or: serve deploy serve/config.yaml (a cluster)
    serve run serve.app:build_app registry=/path/to/registry
    lasb serve --registry /path/to/registry

The ingress authenticates, validates the category name, resolves the category's latest
version (404), reads and decodes the image (413/415/422), so that bad requests never reach
the scoring replicas, then calls the Scorer with the multiplexed model id
``<category>@<version>``.
"""

# no `from __future__ import annotations`: with string annotations on the @serve.ingress class,
# FastAPI took `request` and `credentials` for required query parameters (seen: 422s)
import asyncio
import logging
import time
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from lasb import artifacts
from serve import inputs
from serve.auth import DEFAULT_TOKEN_ENV, BearerAuth, load_token
from serve.scorer import ModelUnavailable, Scorer, model_id

log = logging.getLogger("lasb.serve")


class AppArgs(BaseModel):
    """Application arguments (`args:` in serve/config.yaml, key=value for `serve run`)."""

    registry: str = Field(description="model registry: a folder or s3:// URI")
    token_file: str | None = Field(None, description="file holding the bearer token")
    token_env: str = Field(DEFAULT_TOKEN_ENV, description="env var holding the bearer token "
                                                          "(used when token_file is not set)")
    max_body_bytes: int = Field(20 * 2**20, gt=0, description="request body limit (413)")
    max_pixels: int = Field(16_000_000, gt=0, description="image pixel limit (413)")
    models_per_replica: int = Field(3, gt=0, description="LRU bound of loaded models per replica")
    version_ttl_s: float = Field(30.0, ge=0, description="how long a resolved 'latest' is reused")
    torch_threads: int = Field(0, ge=0, description="torch threads per Scorer (0: Ray's default)")
    device: str | None = Field(None, description="torch device for the Scorer (default: auto)")


class ScoreResponse(BaseModel):
    pred_score: float = Field(description="in [0, 1]; 0.5 is the calibrated threshold")
    pred_label: int = Field(description="1 anomalous, 0 normal")
    raw_score: float
    threshold: float = Field(description="the calibrated threshold on raw_score")
    category: str
    model_version: str
    batch_size: int = Field(description="how many requests shared this model call")
    anomaly_map: str | None = Field(
        None, description="with return_map: 8-bit greyscale PNG at the input's size as a "
                          "data URL; pixel value / 255 = map value in [0, 1], 128 = threshold")
    pred_mask: str | None = Field(
        None, description="with return_mask: PNG data URL, 255 where the map >= 0.5, else 0")


class ErrorResponse(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in {
        400: "invalid category name", 401: "missing or invalid bearer token",
        404: "unknown category", 413: "body or image over the size limit",
        415: "unsupported Content-Type", 422: "the image cannot be decoded (reason in detail)",
        503: "the model cannot be loaded now (reason in detail); retry later",
    }.items()
}

_BODY = {
    "required": True,
    "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary"}}}},
        "application/json": {"schema": inputs.ScoreJSONRequest.model_json_schema()},
    },
}

app = FastAPI(title="lasb scoring API", version="1",
              description="Defect scores and anomaly maps per product category (LASB models).")
bearer = HTTPBearer(auto_error=False, description="required when the server has a token")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


class _VersionCache:
    """category -> (version, expiry): `latest` costs a registry read (an S3 GET) otherwise."""

    def __init__(self, registry: str, ttl_s: float):
        self.registry, self.ttl_s = registry, ttl_s
        self._entries: dict[str, tuple[str, float]] = {}

    async def resolve(self, category: str) -> str:
        hit = self._entries.get(category)
        if hit and hit[1] > time.monotonic():
            return hit[0]
        try:
            version = await asyncio.to_thread(artifacts.resolve_version, self.registry, category)
        except artifacts.ArtifactError:
            raise HTTPException(status_code=404,
                                detail=f"unknown category {category!r}") from None
        except (OSError, ValueError) as exc:
            log.warning("registry unavailable: %s", exc)
            raise HTTPException(status_code=503, detail="model registry unavailable") from None
        self._entries[category] = (version, time.monotonic() + self.ttl_s)
        return version


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=128,  # it mostly awaits the Scorer; must exceed the client concurrency
    graceful_shutdown_wait_loop_s=0.5,
    graceful_shutdown_timeout_s=5,
)
@serve.ingress(app)
class Ingress:
    def __init__(self, scorer: DeploymentHandle, args: dict):
        self.args = AppArgs.model_validate(args)
        self.scorer = scorer
        self.auth = BearerAuth(load_token(self.args.token_file, self.args.token_env))
        if not self.auth.enabled:
            log.warning("no bearer token configured: the scoring API is open to anyone who can "
                        "reach it")
        self.versions = _VersionCache(self.args.registry, self.args.version_ttl_s)

    @app.post("/v1/categories/{category}/score", response_model=ScoreResponse,
              response_model_exclude_none=True, responses=ERRORS,
              openapi_extra={"requestBody": _BODY}, summary="score one image")
    async def score(self, category: str, request: Request, credentials: Credentials,
                    return_map: bool = False, return_mask: bool = False):
        """Image as raw bytes, multipart (field `image`) or JSON (`{"image": base64}`)."""
        self.auth.check(credentials)
        try:
            artifacts.check_name("category", category)
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        version = await self.versions.resolve(category)  # 404 before reading any body
        data, options = await inputs.image_bytes(request, self.args.max_body_bytes)
        return_map = return_map or options.get("return_map", False)
        return_mask = return_mask or options.get("return_mask", False)
        image = await inputs.decode(data, self.args.max_pixels)
        try:
            result = await self.scorer.options(
                multiplexed_model_id=model_id(category, version)
            ).score.remote(image, return_map or return_mask)
        except ModelUnavailable as exc:
            raise HTTPException(status_code=503, detail=exc.reason,
                                headers={"Retry-After": "5"}) from None
        except Exception:  # a replica died, predict raised, ...: logged, no internals out
            log.exception("scoring %s@%s failed", category, version)
            raise HTTPException(status_code=500, detail="scoring failed") from None
        amap, mask = result.pop("anomaly_map", None), result.pop("pred_mask", None)
        if return_map:
            result["anomaly_map"] = await asyncio.to_thread(inputs.encode_map, amap)
        if return_mask:
            result["pred_mask"] = await asyncio.to_thread(inputs.encode_mask, mask)
        return result

    @app.get("/v1/models", summary="categories and versions in the registry",
             responses={401: ERRORS[401]})
    async def models(self, credentials: Credentials):
        self.auth.check(credentials)

        def listing() -> list[dict]:
            out = []
            for c in artifacts.list_categories(self.args.registry):
                versions = artifacts.list_versions(self.args.registry, c)
                out.append({"category": c, "latest": artifacts.resolve_version(
                    self.args.registry, c), "versions": versions})
            return out

        try:
            return {"models": await asyncio.to_thread(listing)}
        except (OSError, ValueError, artifacts.ArtifactError) as exc:
            log.warning("registry unavailable: %s", exc)
            raise HTTPException(status_code=503, detail="model registry unavailable") from None

    @app.get("/healthz", summary="liveness (no auth)")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz", summary="readiness: registry readable, Scorer answering (no auth)")
    async def readyz(self):
        try:
            await asyncio.to_thread(artifacts.list_categories, self.args.registry)
        except (OSError, ValueError) as exc:
            log.warning("not ready, registry: %s", exc)
            return JSONResponse({"status": "unavailable", "reason": "model registry unreadable"},
                                status_code=503)
        try:
            await asyncio.wait_for(self.scorer.ping.remote(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            log.warning("not ready, scorer: %r", exc)
            return JSONResponse({"status": "unavailable", "reason": "scorer not answering"},
                                status_code=503)
        return {"status": "ready"}


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    # one error shape for clients: {"detail": str}, as for every other status
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path"))
    return JSONResponse({"detail": f"invalid request: {where}: {first.get('msg', '')}"},
                        status_code=422)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # logged with its traceback here; the client gets no internals
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error"}, status_code=500)


def make_app(args: AppArgs, scorer_options: dict | None = None,
             ingress_options: dict | None = None) -> serve.Application:
    """The application graph; options override the deployment defaults (as config.yaml does)."""
    scorer = Scorer.options(**(scorer_options or {})).bind(
        args.registry, args.models_per_replica, args.torch_threads, args.device)
    return Ingress.options(**(ingress_options or {})).bind(scorer, args.model_dump())


def build_app(args: dict) -> serve.Application:
    """Serve application builder (`import_path: serve.app:build_app`)."""
    return make_app(AppArgs.model_validate(args))
