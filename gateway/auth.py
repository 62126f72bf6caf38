"""Client API keys: `Authorization: Bearer KEY` maps to the caller's tenant, which isolates caches."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import GatewayError

# With no keys configured the gateway is open and every caller belongs to this tenant.
OPEN_TENANT = "default"


class ApiKeyAuth:
    def __init__(self, tenants_by_key: dict[str, str]) -> None:
        self._tenants_by_key = tenants_by_key

    def tenant_for(self, authorization: str | None) -> str:
        if not self._tenants_by_key:
            return OPEN_TENANT
        if not authorization:
            raise GatewayError(401, "You didn't provide an API key. Send it in the Authorization header "
                                    "(Authorization: Bearer YOUR_KEY).", code="missing_api_key")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise GatewayError(401, "The Authorization header must be 'Bearer YOUR_KEY'.", code="invalid_api_key")
        tenant = None
        for known, owner in self._tenants_by_key.items():
            # Compare every key in constant time so timing does not reveal how much of a key matched.
            if hmac.compare_digest(known.encode(), key.encode()):
                tenant = owner
        if tenant is None:
            shown = key[:3] + "..." + key[-4:] if len(key) > 10 else "***"
            raise GatewayError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
        return tenant

    async def __call__(self, request: Request) -> str:
        return self.tenant_for(request.headers.get("authorization"))


class AdminAuth:
    """The operators' key for /admin/api; client keys never open it."""

    def __init__(self, admin_key: str | None) -> None:
        self._admin_key = admin_key

    def check(self, authorization: str | None) -> None:
        if self._admin_key is None:
            raise GatewayError(403, "The admin API is disabled: set admin_key (or admin_key_env) in the "
                                    "configuration.", code="admin_disabled")
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(self._admin_key.encode(), key.strip().encode()):
            raise GatewayError(401, "A valid admin key is needed (Authorization: Bearer ADMIN_KEY).",
                               code="invalid_admin_key")

    async def __call__(self, request: Request) -> None:
        self.check(request.headers.get("authorization"))
