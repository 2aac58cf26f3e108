"""Request body parsers for the API."""
from django.conf import settings
from rest_framework import parsers
from rest_framework.exceptions import ParseError

from workers.engine import jsonsafe


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser reading through the project's bounded JSON reader: a body nested deeper than Python's
    recursion limit, an integer of thousands of digits (Python's int-string limit) or a non-finite number is
    answered 400 with what is wrong, like any malformed JSON, instead of a 500 or a value nothing downstream can
    store."""

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = stream.read().decode(encoding) if stream is not None else ""
        except (UnicodeDecodeError, LookupError) as exc:
            raise ParseError(f"JSON parse error - the body is not {encoding} text ({exc})") from None
        try:
            return jsonsafe.loads(text, what="the request body")
        except jsonsafe.JSONLimitError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
