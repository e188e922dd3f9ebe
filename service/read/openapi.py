"""The route table and the OpenAPI document built from it.

Starlette's routes and /openapi.json come from the same `Endpoint` list, and the response
schemas are the pydantic models of service/schemas.py, which the tests hold every answer to.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import __version__
from service.read.schemas import ProblemOut

Handler = Callable[[Request], Awaitable[Response]]
Auth = Literal["none", "api", "admin", "signature"]
# What a user token may do on a route; service/auth/scope.py enforces it for the whole table.
# "buddy": only a {buddy_id} of the token's user; "buddies": the listing, narrowed to that user;
# "user": only the token's own {user_id}; "forbidden" (the default, so a new route is closed to
# user tokens until it says otherwise): nothing.
UserAccess = Literal["forbidden", "buddy", "buddies", "user"]


@dataclass(frozen=True)
class Param:
    name: str
    where: Literal["path", "query", "header"]
    schema: dict[str, Any]
    required: bool = False
    description: str = ""


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: Auth
    responses: dict[int, type[BaseModel] | str | None]
    params: Sequence[Param] = ()
    errors: dict[int, str] = field(default_factory=dict)
    request_body: str | None = None
    tag: str = "read"
    user: UserAccess = "forbidden"

    @property
    def streams(self) -> bool:
        """A `…/stream` route: it also takes a user token as `?access_token=` (EventSource)."""
        return self.path.endswith("/stream")

    def route(self) -> Route:
        return Route(self.path, self.handler, methods=[self.method])


def limit_param(maximum: int = 200, default: int = 50) -> Param:
    schema = {"type": "integer", "minimum": 1, "maximum": maximum, "default": default}
    return Param("limit", "query", schema)


CURSOR = Param("cursor", "query", {"type": "string"}, description="next_cursor of the last page")


ACCESS_TOKEN = Param(
    "access_token",
    "query",
    {"type": "string", "minLength": 1, "maxLength": 4096},
    description="a user token, for EventSource (which cannot send headers); user tokens only",
)


def text_param(name: str, where: Literal["path", "query"] = "query") -> Param:
    schema = {"type": "string", "minLength": 1, "maxLength": 256}
    return Param(name, where, schema, required=where == "path")


_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "api": [{"api": []}],
    "admin": [{"admin": []}],
    "none": [],
    "signature": [],
}


def build(endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    components: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    problem = {"application/problem+json": {"schema": ref(ProblemOut)}}
    paths: dict[str, Any] = {}
    for ep in endpoints:
        responses: dict[str, Any] = {}
        for status, body in ep.responses.items():
            if body is None:
                responses[str(status)] = {"description": "no body"}
            elif isinstance(body, str):
                responses[str(status)] = {"description": body, "content": {body: {}}}
            else:
                content = {"application/json": {"schema": ref(body)}}
                responses[str(status)] = {"description": body.__doc__ or "", "content": content}
        errors = dict(ep.errors)
        if ep.auth in ("api", "admin"):
            errors.setdefault(401, "unauthorized: missing or unknown bearer token")
        if any(p.where in ("path", "query") for p in ep.params):
            # Handlers check their parameters, and a value the database cannot hold (a NUL)
            # is refused on every route (service/app.py, unexpected_error).
            errors.setdefault(400, "invalid_parameter: `detail` names the parameter")
        security = _SECURITY[ep.auth]
        params = list(ep.params)
        if ep.user != "forbidden":
            security = [*security, {"user": []}]
            errors[401] = errors[401] + "; token_expired: an expired user token"
            if ep.user != "buddy":  # another user's buddy is a 404, as if it did not exist
                errors.setdefault(403, "forbidden: a user token for another user")
            if ep.streams:
                params.append(ACCESS_TOKEN)
        for status, text in errors.items():
            responses[str(status)] = {"description": text, "content": problem}
        operation: dict[str, Any] = {
            "summary": ep.summary,
            "operationId": ep.handler.__name__,
            "tags": [ep.tag],
            "security": security,
            "responses": responses,
        }
        if params:
            operation["parameters"] = [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.required,
                    "schema": p.schema,
                    **({"description": p.description} if p.description else {}),
                }
                for p in params
            ]
        if ep.request_body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
                "description": ep.request_body,
            }
        paths.setdefault(ep.path, {})[ep.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "hatched-mirror", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "api": {"type": "http", "scheme": "bearer", "description": "MIRROR_API_TOKENS"},
                "admin": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "MIRROR_ADMIN_TOKENS",
                },
                "user": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "a user token (HS256, MIRROR_USER_TOKEN_SECRETS), scoped to "
                    "one user; on …/stream routes also as the query parameter access_token",
                },
            },
        },
    }
