"""Who is asking (D18): a bearer token (or, for the web page, the same token in a cookie) looked up by its
sha256; its role decides what it may do, its subject is the actor of the commands it sends."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.common import tokens

COOKIE = "tuneline_token"


@dataclass(frozen=True)
class Principal:
    subject: str
    role: str

    def may(self, permission: str) -> bool:
        return tokens.may(self.role, permission)


bearer = HTTPBearer(auto_error=False, description="a token from `tuneline token create --role R`")


# A valid token's (subject, role) is kept this long per process, by its sha256: a read then costs one database
# round trip rather than two (bench/api.py). The price: a revoked token still reads and acts for up to this long.
TOKEN_CACHE_S = 5.0
_TOKEN_CACHE_MAX = 1024
_known: dict[str, tuple[float, tuple[str, str]]] = {}


async def optional_principal(request: Request,
                             credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal | None:
    token = credentials.credentials if credentials else request.cookies.get(COOKIE)
    if not token:
        return None
    key, now = tokens.token_hash(token), time.monotonic()
    cached = _known.get(key)
    if cached is not None and now - cached[0] < TOKEN_CACHE_S:
        return Principal(*cached[1])
    async with request.app.state.pool.acquire() as conn:
        found = await tokens.lookup(conn, token)
    if found is None:
        _known.pop(key, None)
        return None
    if len(_known) >= _TOKEN_CACHE_MAX:
        _known.clear()
    _known[key] = (now, found)
    return Principal(*found)


def require(permission: str):
    """A dependency: the caller's Principal, 401 without a valid token, 403 when its role may not."""

    async def dependency(principal: Principal | None = Depends(optional_principal)) -> Principal:
        if principal is None:
            raise HTTPException(401, "a bearer token is required (`tuneline token create --role viewer`)",
                                headers={"WWW-Authenticate": "Bearer"})
        if not principal.may(permission):
            raise HTTPException(403, f"role {principal.role} may not {permission}")
        return principal

    return dependency


reader = require("read")
operator = require("operate")
approver = require("approve")
