from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle

from .models import ApiToken


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
            self.scope, self.ident = "anon", f"anon-{self.get_ident(request)}"
            self.rate = settings.API_RATE_ANONYMOUS
        self.num_requests, self.duration = self.parse_rate(self.rate)
        return super().allow_request(request, view)

    def get_rate(self):
        return None  # set per request in allow_request

    def get_cache_key(self, request, view):
        return f"throttle_{self.ident}"
