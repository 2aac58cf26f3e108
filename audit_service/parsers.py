"""Request body parsers for the API."""
from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, with a body nested deeper than Python's recursion limit (``[[[[...``, a few hundred
    kilobytes) answered 400 like any malformed JSON: DRF only turns ``ValueError`` into a parse error, so the
    ``RecursionError`` from ``json.loads`` was a 500."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the body is nested too deeply; send at most a few hundred "
                             "levels of arrays and objects") from None
