"""Who is asking (D18): a bearer token (or, for the web page, the same token in a cookie) looked up by its
sha256; its role decides what it may do, its subject is the actor of the commands it sends."""

from __future__ import annotations

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


async def optional_principal(request: Request,
                             credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal | None:
    token = credentials.credentials if credentials else request.cookies.get(COOKIE)
    if not token:
        return None
    async with request.app.state.pool.acquire() as conn:
        found = await tokens.lookup(conn, token)
    return Principal(*found) if found else None


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
