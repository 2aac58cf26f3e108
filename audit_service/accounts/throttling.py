from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle

from .models import ApiToken


def client_address(request) -> str:
    """The caller's address: REMOTE_ADDR, or behind TRUSTED_PROXY_COUNT proxies the address the farthest of them
    saw. X-Forwarded-For is read only that far from its end: its beginning is whatever the caller wrote, so
    trusting it would give every forged header a fresh budget (DRF's own default does). Read by the API's
    anonymous rate and by the sign-in lockout (AXES_CLIENT_IP_CALLABLE)."""
    remote = request.META.get("REMOTE_ADDR", "")
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR")
    if not settings.TRUSTED_PROXY_COUNT or not forwarded:
        return remote
    hops = [hop.strip() for hop in forwarded.split(",")]
    return hops[-min(settings.TRUSTED_PROXY_COUNT, len(hops))] or remote


class PerTokenRateThrottle(SimpleRateThrottle):
    """One request budget per API token; signed-in sessions per user; anonymous callers per address.

    Over budget, DRF answers 429 with "Request was throttled. Expected available in N seconds." and a
    Retry-After header.
    """

    def allow_request(self, request, view):
        if isinstance(request.auth, ApiToken):
            self.scope, self.ident = "token", f"token-{request.auth.pk}"
            self.rate = settings.API_RATE_PER_TOKEN
        elif request.user and request.user.is_authenticated:
            self.scope, self.ident = "user", f"user-{request.user.pk}"
            self.rate = settings.API_RATE_PER_USER
        else:
            self.scope, self.ident = "anon", f"anon-{client_address(request)}"
            self.rate = settings.API_RATE_ANONYMOUS
        self.num_requests, self.duration = self.parse_rate(self.rate)
        request.rate_counted = True  # read by exceptions.exception_handler: count each call once
        return super().allow_request(request, view)

    def get_rate(self):
        return None  # set per request in allow_request

    def get_cache_key(self, request, view):
        return f"throttle_{self.ident}"

