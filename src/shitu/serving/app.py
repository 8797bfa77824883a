"""The FastAPI application: routes, error handling, the web page and the API docs.

The API docs (/docs, /redoc) and the web page load nothing from outside the server, so
both work offline.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from itertools import groupby
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import Scope

from shitu import __version__
from shitu.errors import ShituError
from shitu.index.backends import IndexUnavailableError
from shitu.index.labels import normal_form
from shitu.index.metadata import ImageEntry, LibraryBusyError
from shitu.serving import schemas
from shitu.serving.errors import (
    BadRequest,
    PayloadTooLarge,
    RequestError,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from shitu.serving.http import (
    IMAGE_FIELD,
    LIBRARY_BUSY_RETRY_AFTER_S,
    RETRY_AFTER_S,
    AllowedHosts,
    AnswerCutOff,
    BodyLimit,
    BodyTimeout,
    EncodedBodies,
    HeadAsGet,
    PixelBudget,
    RawUploads,
    RequestLimit,
    api_key_check,
    media_type,
    query_as_declared,
    read_uploads,
    validation_problems,
)
from shitu.serving.images import decode_image, read_header
from shitu.serving.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from shitu.serving.service import RecognitionService, check_label

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"
# The web page may only load what this server serves (and show images it made itself).
PAGE_POLICY = "default-src 'self'; img-src 'self' blob: data:; object-src 'none'"
# ReDoc's menu shows a logo from cdn.redoc.ly: this keeps the browser from fetching it (ReDoc
# then leaves it out). ReDoc styles itself inline and searches in a worker made from a blob.
REDOC_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "worker-src blob:; object-src 'none'"
)
DOCS_ASSETS = "/static-offline-docs"  # Swagger UI's and ReDoc's files, which fastapi-offline serves
# Relative to /docs and /redoc, so it is found under a proxy's prefix (--root-path) too.
FAVICON = "static/favicon.svg"
THUMBNAIL_SIZES = (16, 512)
REVALIDATE = "no-cache"  # kept, but checked with the server (by ETag) before each use
LABEL_PAGE = 200
CLIENT_CLOSED_REQUEST = 499  # nginx's status of a request whose client left before its answer
LABEL_IN_PATH = "/v1/gallery/labels/{label:path}"
LABEL_IN_QUERY = "/v1/gallery/label"  # ?label=NAME
# FastAPI parses a body as JSON when it is sent as that, or with no content type.
JSON_TYPE = re.compile(r"|application/json|application/[^/]+\+json")
SOURCES = {"body": "JSON body", "path": "path", "query": "query"}  # where FastAPI found a value
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorOut} for status in (400, 401, 403, 404, 408, 413, 415, 503)
}
# What a request that cannot go wrong otherwise may still get: refused access (with an API
# key, or --protect-reads for reads), or too many requests in progress.
ACCESS_ERRORS = {status: ERRORS[status] for status in (401, 403, 503)}


class PageFiles(StaticFiles):
    """The web page's files, which the browser checks again on each load (a 304 where they
    are unchanged). Sent without Cache-Control, a browser guesses how long to keep one from
    its Last-Modified (a tenth of its age), so after an upgrade it ran the old script, for
    days, against the new server."""

    def file_response(
        self,
        full_path: os.PathLike,
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = REVALIDATE
        return response


def _upload_body(
    schema: type[BaseModel], files: str, extra_fields: Sequence[str] = (), many: bool = False
) -> dict:
    """OpenAPI request body: a multipart form with image files (one, or `many`: the field
    repeated, which the docs page can then send), or the JSON `schema`."""
    binary = {"type": "string", "format": "binary"}
    image = {"type": "array", "items": binary} if many else binary
    form: dict[str, Any] = {
        IMAGE_FIELD: {**image, "description": files},
        **{name: {"type": "string"} for name in extra_fields},
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": form,
                        "required": [IMAGE_FIELD, *extra_fields],
                    }
                },
                "application/json": {"schema": schema.model_json_schema()},
            },
        }
    }


def create_app(service: RecognitionService, metrics: Metrics | None = None) -> FastAPI:
    """The app around a loaded service; the service is closed when the app shuts down."""
    settings = service.settings
    metrics = metrics or Metrics()
    pixel_budget = PixelBudget(settings.max_pixels_in_flight)
    metrics.follow(
        lambda: service.library.last_loaded,
        lambda: service.batcher.waiting,
        lambda: pixel_budget.held,
    )
    read_access = [Depends(api_key_check(settings, write=False))]
    # The API's routes also refuse a query parameter they do not take, or one given twice:
    # `/v1/recognize?score_thres=0.9` was answered as if the threshold had been set, where a
    # form field of that name is refused.
    api_read = [*read_access, Depends(query_as_declared)]
    api_write = [Depends(api_key_check(settings, write=True)), Depends(query_as_declared)]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(service.close)

    app = FastAPIOffline(
        title="shitu",
        version=__version__,
        description=(
            "Recognise products in photos against a gallery library, embed images, and edit "
            "the gallery. With an API key set, gallery edits need it (and, with "
            "--protect-reads, every endpoint but /healthz): send `Authorization: Bearer KEY` "
            "or `X-API-Key: KEY`."
        ),
        lifespan=lifespan,
        favicon_url=FAVICON,
        static_url=DOCS_ASSETS,
        redoc_url=None,  # served below, under a policy
        swagger_ui_parameters={"validatorUrl": None},  # never send the spec to swagger.io
    )
    app.state.pixel_budget = pixel_budget  # what the requests in progress hold
    app.add_middleware(HeadAsGet)  # innermost: the metrics count HEAD as HEAD
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(EncodedBodies)
    app.add_middleware(AllowedHosts, settings=settings)  # before any body is read
    app.add_middleware(BodyTimeout, settings=settings)  # round every reader of the body
    app.add_middleware(RequestLimit, settings=settings)  # inside the metrics: 503s counted
    app.add_middleware(AnswerCutOff)  # around every other: any request can be cut off
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.mount("/static", PageFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(ShituError)
    async def shitu_error(request: Request, exc: ShituError) -> JSONResponse:
        """Our errors carry messages meant for the user; ones the request did not cause are
        the server's: 500, but 503 with Retry-After where another process kept the library
        locked or the index service (a Milvus server) failed a search (its write ends, or
        it comes back, and the same request then goes through), and where the server is
        busy (as RequestLimit's 503: no failure to log)."""
        status = exc.status if isinstance(exc, RequestError) else 500
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if isinstance(exc, LibraryBusyError | IndexUnavailableError):
            status, headers = 503, {"Retry-After": str(LIBRARY_BUSY_RETRY_AFTER_S)}
        if isinstance(exc, ServiceUnavailable):
            headers = {"Retry-After": str(RETRY_AFTER_S)}
        elif status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        """Any other failure is the server's: a 500 as JSON, as every other error is (it was
        plain text), naming what went wrong where that is the system's word for it (an
        OSError's: "No space left on device") and no more; the traceback goes to the log
        (Starlette raises the error again once this answer is sent)."""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "an internal error"
        return JSONResponse(
            {"detail": f"the server failed: {reason} (its log has the details)"}, 500
        )

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect) -> Response:
        """A client that closed its connection before its request's body came whole (an
        upload cancelled, a network lost): no answer reaches it, and it is no failure of
        the server's. Counted as CLIENT_CLOSED_REQUEST; it was a 500, with "Exception in
        ASGI application" and a traceback in the log."""
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """FastAPI turns any error while it reads and parses a JSON body into 400 "There
        was an error parsing the body": a chunked body over the limit (answered with our
        413), a body that is not UTF-8 text or nests too deeply for Python's parser (named),
        and a client that left before its body came (counted as such, not as a 400). A
        path nothing answers, or a method its endpoint does not take, is named with what to
        use instead: Starlette's bare "Not Found" and "Method Not Allowed" left the client
        to guess which part was wrong (`/v1/recognise`, say)."""
        cause = exc.__cause__
        if isinstance(cause, ShituError):
            return await shitu_error(request, cause)
        if isinstance(cause, ClientDisconnect):
            return await client_left(request, cause)
        if isinstance(cause, ValueError | RecursionError):  # from json.loads
            return await shitu_error(request, BadRequest(f"invalid JSON body: {cause}"))
        path = request.url.path
        if exc.status_code == 404:  # no route, or no file under /static
            docs = f"{request.base_url.path}docs"  # under the proxy's prefix, if any
            exc = StarletteHTTPException(
                404, f"nothing is served at {path}: the API's endpoints are listed at {docs}"
            )
        elif exc.status_code == 405 and exc.headers and "Allow" in exc.headers:
            allowed = ", ".join(methods_at(request.scope, exc.headers["Allow"]))
            exc = StarletteHTTPException(
                405,
                f"{request.method} is not allowed on {path}: it takes {allowed}",
                {**exc.headers, "Allow": allowed},
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """Parameters and JSON bodies that FastAPI checks are answered as the upload routes'
        are: 400 with one line of text (415 for a body that is not JSON), not 422 with a list."""
        errors = sorted(exc.errors(), key=lambda e: e["loc"][0])
        media = media_type(request)
        if any(e["loc"][0] == "body" for e in errors) and not JSON_TYPE.fullmatch(media):
            error: RequestError = UnsupportedMediaType(
                f"unsupported content type '{media}': send application/json"
            )
        else:
            error = BadRequest(
                "; ".join(
                    f"invalid {SOURCES.get(source, source)}: {validation_problems(group, skip=1)}"
                    for source, group in groupby(errors, key=lambda e: e["loc"][0])
                )
            )
        return await shitu_error(request, error)

    def methods_at(scope: Scope, allow: str) -> list[str]:
        """The methods of a 405's `allow` and of every other route at the request's path,
        with HEAD wherever GET is (HeadAsGet): Starlette's 405 named those of the first
        route at the path alone, so `POST /v1/gallery/labels/NAME` was told it takes GET,
        and not the PATCH that renames nor the DELETE that removes."""
        methods = {method.strip() for method in allow.split(",")}
        for route in app.router.routes:
            taken = getattr(route, "methods", None)
            if taken and route.matches(scope)[0] is not Match.NONE:
                methods |= taken
        return sorted(methods | ({"HEAD"} if "GET" in methods else set()))

    def openapi() -> dict[str, Any]:
        """FastAPI's OpenAPI document, less the 422 answers it lists: invalid requests get 400."""
        if app.openapi_schema is None:
            spec = FastAPI.openapi(app)
            for operations in spec["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(unused, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    def label_route(method: str, **options: Any) -> Callable[[F], F]:
        """Register an operation on one label at both its addresses: the label as the end of
        the path (`/v1/gallery/labels/NAME`), and as the query's `label`
        (`/v1/gallery/label?label=NAME`), which carries every label: a path cannot carry '.'
        or '..' (clients resolve them away, even encoded), nor '//' (proxies merge it)."""

        def register(operation: F) -> F:
            for path in (LABEL_IN_PATH, LABEL_IN_QUERY):
                app.api_route(path, methods=[method], **options)(operation)
            return operation

        return register

    @asynccontextmanager
    async def decoded(uploads: RawUploads) -> AsyncIterator[list[np.ndarray]]:
        """Decoded uploads (RGB arrays), each one the model can take, for the block; each
        within the pixel limit, and all of them together within the request's limit
        (ServeSettings.max_pixels_per_request) and the server's budget of decoded pixels
        that all requests share, counted from the headers before anything is decoded:
        neither one request nor all of them together can hold gigabytes of pixels. The
        pixels stay reserved until the block ends (the answer is computed)."""
        headers = await run_in_threadpool(
            lambda: [read_header(data, settings.max_pixels, name) for name, data in uploads.images]
        )
        total = sum(header.pixels for header in headers)
        limit = settings.max_pixels_per_request
        if total > limit:
            raise PayloadTooLarge(
                f"the request's images hold {total / 1e6:.1f} megapixels together; "
                f"the limit is {limit / 1e6:g} (send fewer or smaller images per request)"
            )
        async with pixel_budget.hold(total):
            decoded = []
            for (name, data), header in zip(uploads.images, headers, strict=True):
                pixels = await run_in_threadpool(decode_image, data, header, name)
                service.check_image(name, pixels)
                decoded.append(pixels)
            yield decoded

    async def embedded(uploads: RawUploads) -> np.ndarray:
        """The uploads' embeddings, one row each; their pixels are held (and reserved) only
        while the model takes them: an add then waits for the library, where another
        process's write may keep it a minute, holding none, and recognition goes on."""
        async with decoded(uploads) as images:
            futures = service.extract(images)
            return np.stack(await asyncio.gather(*map(asyncio.wrap_future, futures)))

    def image_out(request: Request, entry: ImageEntry) -> schemas.ImageOut:
        """The image as the API lists it; its thumbnail's path as clients reach it, under the
        prefix a reverse proxy serves the API at (--root-path), or None where the server has
        no file to make it from (added as a vector, or its file deleted since): an address
        that could only answer 404. A stat per image: call from a worker thread."""
        root = request.scope.get("root_path", "")
        has_file = bool(entry.path) and os.path.isfile(entry.path)
        return schemas.ImageOut(
            id=entry.id,
            label=entry.label,
            name=Path(entry.path).name,
            added_at=entry.added_at,
            thumbnail=f"{root}/v1/gallery/images/{entry.id}/thumbnail" if has_file else None,
        )

    # ---------------------------------------------------------------------- page, health

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")  # the proxy's prefix (--root-path)
        page = get_redoc_html(
            openapi_url=f"{root}{app.openapi_url or '/openapi.json'}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=FAVICON,
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = REDOC_POLICY
        return page

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": REVALIDATE},
        )

    @app.get("/healthz", response_model=schemas.Health, tags=["service"])
    async def healthz() -> schemas.Health:
        """Liveness and readiness: models are loaded before the server accepts requests.
        Also the request limits, which hold no data (the web page splits uploads by them).
        Never waits for a gallery write: the image count is as the last one left it (or
        the last check for other processes' writes, which it starts where one is due)."""
        return schemas.Health(
            status="ok",
            images=len(service.library.last_loaded.by_id),
            model=service.extractor.fingerprint,
            limits=schemas.Limits(
                max_upload_bytes=settings.max_upload_bytes,
                max_upload_mb=settings.max_upload_mb,
                max_images_per_request=settings.max_images_per_request,
                max_megapixels=settings.max_pixels / 1e6,
                max_megapixels_per_request=settings.max_pixels_per_request / 1e6,
            ),
        )

    @app.get(
        "/metrics",
        dependencies=read_access,
        responses=ACCESS_ERRORS,
        tags=["service"],
        response_class=Response,
    )
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # ---------------------------------------------------------------------- inference

    @app.post(
        "/v1/recognize",
        response_model=schemas.RecognizeResponse,
        dependencies=api_read,
        responses=ERRORS,
        tags=["inference"],
        openapi_extra=_upload_body(schemas.RecognizeJSON, "the photo"),
    )
    async def recognize(request: Request) -> dict:
        """What is in the photo: boxes, labels, scores and the matching gallery image ids."""
        raw = await read_uploads(request, schemas.RecognizeJSON, 1)
        async with decoded(raw) as (pixels,):
            results = await asyncio.wrap_future(service.recognize(pixels))
        return {"results": [r.to_dict() for r in results]}

    @app.post(
        "/v1/extract",
        response_model=schemas.ExtractResponse,
        dependencies=api_read,
        responses=ERRORS,
        tags=["inference"],
        openapi_extra=_upload_body(schemas.ExtractJSON, "images (the field repeated)", many=True),
    )
    async def extract(request: Request) -> JSONResponse:
        """L2-normalised embeddings of whole images, in the order sent."""
        raw = await read_uploads(request, schemas.ExtractJSON, settings.max_images_per_request)
        vectors = await embedded(raw)
        return JSONResponse(
            {
                "model": service.extractor.fingerprint,
                "dim": service.extractor.embedding_size,
                "embeddings": vectors.tolist(),
            }
        )

    # ---------------------------------------------------------------------- gallery reads
    # Plain functions, which FastAPI runs in worker threads: the snapshot may wait for a
    # gallery write, and the event loop, which answers every request, must not.

    @app.get(
        "/v1/gallery",
        response_model=schemas.GalleryInfo,
        dependencies=api_read,
        responses=ACCESS_ERRORS,
        tags=["gallery"],
    )
    def gallery_info() -> schemas.GalleryInfo:
        """Size, model and index of the gallery library."""
        return schemas.GalleryInfo.of(service.library.snapshot.stats)

    @app.get(
        "/v1/gallery/labels",
        response_model=schemas.LabelsResponse,
        dependencies=api_read,
        responses=ACCESS_ERRORS,
        tags=["gallery"],
    )
    def labels() -> schemas.LabelsResponse:
        """Every label with its number of images, sorted by label."""
        snapshot = service.library.snapshot
        return schemas.LabelsResponse(
            images=len(snapshot.by_id),
            labels=[
                schemas.LabelOut(label=label, count=len(entries))
                for label, entries in snapshot.by_label.items()
            ],
        )

    @label_route(
        "GET",
        response_model=schemas.LabelImagesResponse,
        dependencies=api_read,
        responses=ERRORS,
        tags=["gallery"],
    )
    def label_images(
        request: Request,
        label: str,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=10 * LABEL_PAGE)] = LABEL_PAGE,
        after: Annotated[
            int | None,
            Query(
                description="only images with a larger id: the last id of the page before, "
                "so that images removed meanwhile do not move later ones out of the next page"
            ),
        ] = None,
    ) -> schemas.LabelImagesResponse:
        """The images of one label (oldest first), a page at a time: `offset` skips that many,
        after `after`."""
        entries = service.label_images(label)
        start = 0 if after is None else bisect.bisect_right(entries, after, key=lambda e: e.id)
        page = entries[start + offset : start + offset + limit]
        return schemas.LabelImagesResponse(
            label=entries[0].label,  # as stored: NFC where the client sent NFD (macOS)
            count=len(entries),
            offset=offset,
            remaining=max(0, len(entries) - (start + offset + len(page))),
            images=[image_out(request, e) for e in page],
        )

    @app.get(
        "/v1/gallery/images/{image_id}",
        response_model=schemas.ImageOut,
        dependencies=api_read,
        responses=ERRORS,
        tags=["gallery"],
    )
    def image(request: Request, image_id: int) -> schemas.ImageOut:
        return image_out(request, service.image(image_id))

    @app.get(
        "/v1/gallery/images/{image_id}/thumbnail",
        dependencies=api_read,
        responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
        response_class=Response,
        tags=["gallery"],
    )
    async def thumbnail(
        request: Request,
        image_id: int,
        size: Annotated[int, Query(ge=THUMBNAIL_SIZES[0], le=THUMBNAIL_SIZES[1])] = 160,
    ) -> Response:
        """The stored image, shrunk to fit size x size pixels, as JPEG."""
        path = await run_in_threadpool(service.image_file, image_id)
        tag = await run_in_threadpool(service.thumbnail_tag, path, size)
        # Kept by the browser, but checked each time: an id names another image in another
        # library (ids start at 1 in each), which may be served later at the same address.
        headers = {"Cache-Control": f"private, {REVALIDATE}", **({"ETag": tag} if tag else {})}
        known = request.headers.get("if-none-match", "").split(",")
        if tag and tag in {known_tag.strip().removeprefix("W/") for known_tag in known}:
            return Response(status_code=304, headers=headers)
        # Its decoded pixels count with the uploads' (a thumbnail of a large PNG decodes it
        # whole): at most the largest image's, which the budget holds (ServeSettings).
        pixels = await run_in_threadpool(service.thumbnail_pixels, path, size)
        async with pixel_budget.hold(pixels):
            data = await run_in_threadpool(service.thumbnail, path, size)
        return Response(data, media_type="image/jpeg", headers=headers)

    # ---------------------------------------------------------------------- gallery writes

    @app.post(
        "/v1/gallery/images",
        response_model=schemas.AddImagesResponse,
        status_code=201,
        dependencies=api_write,
        responses={
            200: {
                "model": schemas.AddImagesResponse,
                "description": "Nothing added: the library already has every image",
            },
            **ERRORS,
        },
        tags=["gallery"],
        openapi_extra=_upload_body(
            schemas.AddImagesJSON, "images (the field repeated)", ["label"], many=True
        ),
    )
    async def add_images(request: Request, response: Response) -> schemas.AddImagesResponse:
        """Add images under a label; images the library already has are skipped (listed in
        `duplicates`, and those it has under another label also in `elsewhere`, with that
        image's id and label). 201 where any image was added; 200 where none was, as nothing
        was created."""
        raw = await read_uploads(request, schemas.AddImagesJSON, settings.max_images_per_request)
        if "label" not in raw.fields:
            raise BadRequest("missing field 'label'")
        label = check_label(raw.fields["label"])  # as stored (NFC), before any decoding
        features = await embedded(raw)
        outcome = await run_in_threadpool(service.add, label, raw.images, features)
        if not outcome.added:
            response.status_code = 200
        added = await run_in_threadpool(lambda: [image_out(request, e) for e in outcome.added])
        return schemas.AddImagesResponse(
            label=label,
            added=added,
            duplicates=outcome.duplicates,
            elsewhere=[schemas.StoredElsewhereOut(**vars(other)) for other in outcome.elsewhere],
        )

    @app.delete(
        "/v1/gallery/images/{image_id}",
        response_model=schemas.RemovedResponse,
        dependencies=api_write,
        responses=ERRORS,
        tags=["gallery"],
    )
    async def remove_image(image_id: int) -> schemas.RemovedResponse:
        entry = await run_in_threadpool(service.remove_image, image_id)
        return schemas.RemovedResponse(removed=[entry.id])

    @label_route(
        "DELETE",
        response_model=schemas.RemovedResponse,
        dependencies=api_write,
        responses=ERRORS,
        tags=["gallery"],
    )
    async def remove_label(label: str) -> schemas.RemovedResponse:
        """Remove every image of a label."""
        return schemas.RemovedResponse(removed=await run_in_threadpool(service.remove_label, label))

    @label_route(
        "PATCH",
        response_model=schemas.RenamedResponse,
        dependencies=api_write,
        responses={**ERRORS, 409: {"model": schemas.ErrorOut}},
        tags=["gallery"],
    )
    async def rename_label(label: str, body: schemas.RenameLabel) -> schemas.RenamedResponse:
        """Rename a label; onto a label that has images only with `merge: true` (without it:
        409, as `shitu index relabel` without --merge), as the two cannot be told apart
        afterwards."""
        new = check_label(body.label)
        count = await run_in_threadpool(service.rename_label, label, new, body.merge)
        return schemas.RenamedResponse(old=normal_form(label), new=new, count=count)

    @app.post(
        "/v1/gallery/rebuild",
        response_model=schemas.RebuildResponse,
        dependencies=api_write,
        responses=ERRORS,
        tags=["gallery"],
    )
    async def rebuild(body: schemas.RebuildRequest | None = None) -> schemas.RebuildResponse:
        """Rebuild the search index from the stored features (optionally as another type),
        dropping the stored search settings the new type does not read."""
        stats = await run_in_threadpool(service.rebuild, body.index_type if body else None)
        return schemas.RebuildResponse.of(stats)

    return app
