"""Request bodies -> decoded images, and maps -> compact JSON values, with HTTP status codes.

Accepted bodies: raw bytes (``image/*`` or ``application/octet-stream``), ``multipart/form-data``
with a file field ``image``, and ``application/json`` ``{"image": "<base64>"}``. Anything else
is 415. The body is read with a byte limit (413) before it is parsed, so neither a lying
Content-Length nor a chunked upload gets past it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json

import numpy as np
from fastapi import HTTPException, Request
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.formparsers import MultiPartException, MultiPartParser

from lasb.data import ImageDecodeError, decode_image

RAW_TYPES = ("application/octet-stream",)  # plus any image/*
MULTIPART = "multipart/form-data"
JSON = "application/json"


class ScoreJSONRequest(BaseModel):
    image: str = Field(description="the encoded image file (PNG, JPEG, ...), base64; a "
                                   "'data:image/...;base64,' prefix is accepted")
    return_map: bool = False
    return_mask: bool = False


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def too_large(limit: int) -> HTTPException:
    return HTTPException(status_code=413, detail=f"request body exceeds the limit of {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)  # refuse before reading anything
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_image(request: Request, body: bytes) -> bytes:
    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=10,
                                     max_part_size=len(body) + 1).parse()
    except MultiPartException as exc:
        raise HTTPException(status_code=422, detail=f"malformed multipart body: {exc.message}")
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise HTTPException(status_code=422,
                            detail="the multipart body needs a file field named 'image'")
    try:
        return await upload.read()
    finally:
        await form.close()


def _json_image(body: bytes) -> tuple[bytes, dict]:
    try:
        req = ScoreJSONRequest.model_validate(json.loads(body))
    except (ValueError, ValidationError) as exc:
        # pydantic's message lists the fields; json's names the position. Neither has a trace.
        first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise HTTPException(status_code=422, detail=f"invalid JSON body: {first}") from None
    data = req.image
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(status_code=422, detail="'image' is not valid base64") from None
    return raw, {"return_map": req.return_map, "return_mask": req.return_mask}


async def image_bytes(request: Request, limit: int) -> tuple[bytes, dict]:
    """(encoded image, options from a JSON body) for any accepted content type."""
    media = media_type(request)
    if not (media.startswith("image/") or media in RAW_TYPES or media in (MULTIPART, JSON)):
        raise HTTPException(
            status_code=415,
            detail=f"unsupported Content-Type {media or '(none)'!r}: send the image as image/* "
                   f"or application/octet-stream bytes, {MULTIPART} (field 'image') or {JSON}")
    body = await read_body(request, limit)
    if media == MULTIPART:
        return await _multipart_image(request, body), {}
    if media == JSON:
        return _json_image(body)
    return body, {}


async def decode(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        return await asyncio.to_thread(decode_image, data, "request body", max_pixels)
    except ImageDecodeError as exc:
        # the pixel limit is checked from the header, before decoding: a size limit, like 413
        status = 413 if exc.reason.startswith("image too large") else 422
        raise HTTPException(status_code=status,
                            detail=f"cannot decode image: {exc.reason}") from None


def png_data_url(array: np.ndarray) -> str:
    """A greyscale 8-bit PNG as a data URL: compact (a 256x256 map is a few KB) and viewable."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def encode_map(anomaly_map: np.ndarray) -> str:
    """anomaly_map in [0, 1] -> PNG with value round(255 * map); 0.5 (threshold) -> 128."""
    return png_data_url(np.round(np.clip(anomaly_map, 0, 1) * 255).astype(np.uint8))


def encode_mask(mask: np.ndarray) -> str:
    return png_data_url(mask.astype(np.uint8) * 255)
