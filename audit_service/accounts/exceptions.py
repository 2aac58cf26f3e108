"""The API's exception handler (REST_FRAMEWORK["EXCEPTION_HANDLER"]).

Apart from throttling.py because it needs ``rest_framework.views``, which reads DEFAULT_THROTTLE_CLASSES when it
is imported: throttling.py importing it would be a cycle whenever throttling.py is imported first (as the sign-in
lockout's AXES_CLIENT_IP_CALLABLE is, by django-axes' system check).
"""
from rest_framework import exceptions, views

from .throttling import PerTokenRateThrottle


def exception_handler(exc, context):
    """DRF's handler, after counting a refused call that never reached the throttles against the anonymous rate
    (REST_FRAMEWORK["EXCEPTION_HANDLER"]). DRF checks credentials and permissions before its throttles, so calls
    without a key or with a wrong one were never counted: anyone could guess keys at full speed. Over the rate,
    such a call is answered 429 instead of 401."""
    request, view = context.get("request"), context.get("view")
    if request is not None and not getattr(request, "rate_counted", False):
        try:
            user = request.user
        except exceptions.APIException:  # a wrong key: the request is now anonymous
            user = request.user
        if not (user and user.is_authenticated):
            throttle = PerTokenRateThrottle()
            if not throttle.allow_request(request, view):
                exc = exceptions.Throttled(throttle.wait())
    return views.exception_handler(exc, context)
