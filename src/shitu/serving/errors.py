"""Errors a request can cause, each with its HTTP status; the message goes to the client as-is."""

from __future__ import annotations

from shitu.errors import ShituError


class RequestError(ShituError):
    """Something wrong with the request; `status` is the HTTP status it answers with."""

    status = 400


class BadRequest(RequestError):
    status = 400


class Unauthorized(RequestError):
    """No API key was sent where one is required."""

    status = 401


class Forbidden(RequestError):
    """An API key was sent, but not the right one."""

    status = 403


class NotFound(RequestError):
    status = 404


class RequestTimeout(RequestError):
    """The client stopped sending its request body (or sends it too slowly to wait for)."""

    status = 408


class Conflict(RequestError):
    """The request would change what it was not asked to (a rename that would merge)."""

    status = 409


class PayloadTooLarge(RequestError):
    status = 413


class UnsupportedMediaType(RequestError):
    status = 415


class ServiceUnavailable(RequestError):
    """Too many requests in progress, or a library deleted and not yet built again; the
    client may retry."""

    status = 503
