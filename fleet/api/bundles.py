"""Bundles and blobs: upload (operator), envelope and blob download (device or operator)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import ClientException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIFormat, OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import FromPath, FromQuery
from litestar.response import Stream
from sqlmodel import Session, col, select

from fleet.api.auth import bundle_reader_guard, operator_guard
from fleet.api.context import AppContext
from fleet.api.errors import error_response
from fleet.api.response_schemas import (
    BUNDLE_CONFLICT,
    BUNDLE_READ,
    READ,
    BundleView,
    HighestRelease,
    ok,
)
from fleet.api.schemas import BAD_REQUEST, DEVICE_RESPONSES, ErrorBody
from fleet.db.engine import session_scope
from fleet.db.models import Bundle
from fleet.errors import NotFoundError
from fleet.registry.blobs import SHA256_RE, RangeError, parse_range, read_range
from fleet.registry.bundles import bundle_json, register, verify_archive
from shared.bundle.manifest import NAME_RE


@dataclass
class UploadOperation(Operation):
    """The upload's body is the bundle file itself."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={
                "application/octet-stream": OpenAPIMediaType(
                    schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
                )
            },
            description="A single-file bundle ('edgefleet bundle build' makes one)",
            required=True,
        )


class PayloadTooLarge(ClientException):
    status_code = 413


def _get_bundle(session: Session, bundle_id: int) -> Bundle:
    bundle = session.get(Bundle, bundle_id)
    if bundle is None:
        raise NotFoundError(f"bundle {bundle_id} does not exist", bundle_id=bundle_id)
    return bundle


def _import(ctx: AppContext, path: Path) -> tuple[dict[str, Any], bool]:
    verified = verify_archive(path, ctx.trust_root(), ctx.blobs)
    with session_scope(ctx.engine) as session:
        bundle, created = register(session, verified)
        return bundle_json(bundle), created


class BundleController(Controller):
    path = "/api/v1"
    tags = ["bundles"]

    @post(
        "/bundles",
        guards=[operator_guard],
        opt={"scope": "deploy"},
        request_max_body_size=None,
        status_code=201,
        summary="Upload a single-file bundle (application/octet-stream)",
        description="The body is the bundle file. 201 when new, 200 when the identical bundle is "
        "already stored; 400 with a reason code when it does not verify; 409 when the release "
        "number is taken by another digest; 413 when larger than max_bundle_bytes.",
        operation_class=UploadOperation,
        responses={
            **BAD_REQUEST,
            **READ,
            **BUNDLE_CONFLICT,
            201: ResponseSpec(BundleView, description="Stored", generate_examples=False),
            200: ResponseSpec(BundleView, description="The identical bundle was already stored",
                              generate_examples=False),
            413: ResponseSpec(ErrorBody, description="Larger than max_bundle_bytes"),
        },
    )
    async def upload(self, request: Request[Any, Any, Any], state: State) -> Response[dict[str, Any]]:
        ctx: AppContext = state.ctx
        cap = ctx.settings.max_bundle_bytes
        announced = request.headers.get("content-length")
        if announced and announced.isdigit() and int(announced) > cap:
            raise PayloadTooLarge(detail=f"bundle is {announced} bytes, more than the {cap} allowed")
        tmp_dir = Path(ctx.settings.data_dir) / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".bundle", dir=tmp_dir)
        path = Path(name)
        try:
            size = 0
            with os.fdopen(fd, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > cap:
                        raise PayloadTooLarge(detail=f"bundle is more than the {cap} bytes allowed")
                    fh.write(chunk)
            if size == 0:
                raise ClientException(detail="empty body: send the single-file bundle as the request body")
            info, created = await anyio.to_thread.run_sync(_import, ctx, path)
        finally:
            path.unlink(missing_ok=True)
        return Response(info, status_code=201 if created else 200)

    @get(
        "/bundles", guards=[operator_guard], sync_to_thread=True, summary="All bundles",
        responses={**ok(list[BundleView], "Bundles by model and release"), **READ},
    )
    def list_bundles(self, state: State, name: FromQuery[str | None] = None) -> list[dict[str, Any]]:
        with Session(state.ctx.engine) as session:
            stmt = select(Bundle).order_by(col(Bundle.name), col(Bundle.release))
            if name:
                stmt = stmt.where(Bundle.name == name)
            return [bundle_json(b) for b in session.exec(stmt)]

    @get(
        "/bundles/highest",
        guards=[operator_guard],
        sync_to_thread=True,
        summary="The highest release of a model stored here (0 when none)",
        description="The builder asks this before numbering a build (edgefleet bundle build --fleet), "
        "so a new release is above every release the fleet holds, re-issues included.",
        responses={**ok(HighestRelease, "The highest release (0 when none)"), **BAD_REQUEST, **READ},
    )
    def highest(self, state: State, name: FromQuery[str]) -> dict[str, Any]:
        if not NAME_RE.match(name):
            raise ClientException(detail=f"model name {name[:80]!r} must match {NAME_RE.pattern}")
        with Session(state.ctx.engine) as session:
            top = session.exec(
                select(Bundle).where(Bundle.name == name).order_by(col(Bundle.release).desc()).limit(1)
            ).first()
            return {
                "name": name,
                "release": top.release if top else 0,
                "version": top.version if top else None,
                "bundle_id": top.id if top else None,
            }

    @get(
        "/bundles/{bundle_id:int}", guards=[operator_guard], sync_to_thread=True, summary="One bundle",
        responses={**ok(BundleView, "The bundle"), **BUNDLE_READ},
    )
    def get_bundle(self, bundle_id: FromPath[int], state: State) -> dict[str, Any]:
        with Session(state.ctx.engine) as session:
            return bundle_json(_get_bundle(session, bundle_id))

    @get(
        "/bundles/{bundle_id:int}/envelope",
        guards=[bundle_reader_guard],
        sync_to_thread=True,
        summary="The signed envelope of a bundle",
        description="Operators with scope read; a device only for a bundle assigned to it.",
        media_type="application/vnd.edgefleet.manifest.v1+json",
        responses=DEVICE_RESPONSES,
    )
    def envelope(self, bundle_id: FromPath[int], state: State) -> Response[bytes]:
        with Session(state.ctx.engine) as session:
            bundle = _get_bundle(session, bundle_id)
            return Response(bytes(bundle.envelope), media_type="application/vnd.edgefleet.manifest.v1+json")

    @get(
        "/blobs/{sha256:str}",
        guards=[bundle_reader_guard],
        sync_to_thread=True,
        summary="A file by its SHA-256; HTTP Range resumes a download",
        description="Operators with scope read; a device only for files of bundles assigned to it. "
        "ETag is the quoted SHA-256; one byte range per request ('bytes=FIRST-[LAST]', "
        "'bytes=-SUFFIX') is answered 206 with Content-Range, a range past the end 416. "
        "Never compressed, so Content-Length and ranges count the file's own bytes.",
        media_type="application/octet-stream",
        responses={
            **DEVICE_RESPONSES,
            206: ResponseSpec(
                bytes, description="The requested byte range", media_type="application/octet-stream"
            ),
            304: ResponseSpec(None, description="If-None-Match matched the ETag"),
            416: ResponseSpec(ErrorBody, description="A malformed range or one past the end of the blob"),
        },
    )
    def blob(self, sha256: FromPath[str], state: State, request: Request[Any, Any, Any]) -> Response[Any]:
        ctx: AppContext = state.ctx
        if not SHA256_RE.match(sha256):
            raise ClientException(detail=f"{sha256[:80]!r} is not a lowercase hex SHA-256")
        path = ctx.blobs.path(sha256)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"blob {sha256} is not stored here") from None
        etag = f'"{sha256}"'
        headers = {
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Cache-Control": "private, max-age=31536000, immutable",
            "Content-Disposition": f'attachment; filename="{sha256}"',
        }
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(b"", status_code=304, headers=headers)
        wanted = request.headers.get("range", "")
        if_range = request.headers.get("if-range")
        if if_range is not None and if_range.strip() != etag:
            wanted = ""  # the client's partial copy is of another file: send it all
        try:
            span = parse_range(wanted, size)
        except RangeError as exc:
            response = error_response(416, f"{exc}; ask for bytes 0-{max(size - 1, 0)}")
            response.headers["Content-Range"] = f"bytes */{size}"
            return response
        first, last = span if span is not None else (0, size - 1)
        headers["Content-Length"] = str(last - first + 1)
        status = 200
        if span is not None:
            status = 206
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        chunks = read_range(path, first, last) if size else iter([b""])
        return Stream(chunks, status_code=status, media_type="application/octet-stream", headers=headers)
