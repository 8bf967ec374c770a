"""REST URL routing: what TF Serving makes of a request's method and path (http_rest_api_util.cc).

The URL grammar is TF Serving's: the regular expressions match the whole
path including any query string, ignore case, and take no trailing slash.
:class:`Route` is ParseModelInfo: the model name, version or label, and the
verb (``:predict``...) or sub-resource (``/metadata``); :mod:`serving.rest`
answers any path under ``/v1/`` that does not route as a malformed request.
"""

from __future__ import annotations

import re
import urllib.parse

from serving.errors import ServingError, invalid
from serving.service import Spec

# TF Serving's paths (model_servers/http_rest_api_util.cc, http_rest_api_handler.h), matched as RE2::FullMatch
# matches them: whole path (with its query string), case-insensitive ((?i)), \d as ASCII digits.
DISPATCH = re.compile(r"/v1/.*", re.IGNORECASE)
_PREDICTION_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/([0-9]+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.IGNORECASE)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/([0-9]+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.IGNORECASE)
_INT64_MAX = 2**63 - 1


class Route:
    """What TF Serving's ParseModelInfo makes of a request's method and path (http_rest_api_util.cc)."""

    def __init__(self, method: str, path: str):
        self.method, self.path = method, path
        self.ok = False
        self.name = self.label = self.verb = self.subresource = ""
        self.version: int | None = None
        self.error: ServingError | None = None  # a parse error: TF Serving answers it with an empty body
        match = None
        if method == "POST":
            match = _PREDICTION_PATH.fullmatch(path)
            if match:
                self.name, version, label, self.verb = (g or "" for g in match.groups())
        elif method == "GET":
            match = _STATUS_PATH.fullmatch(path)
            if match:
                self.name, version, label, self.subresource = (g or "" for g in match.groups())
        self.ok = match is not None
        if not self.ok:
            return
        self.name = _unescape(self.name)
        if version:
            self.version = int(version)
            if self.version > _INT64_MAX:  # absl::SimpleAtoi into int64_t fails
                self.version = None
                self.error = invalid(f"Failed to convert version: {version} to numeric.")
                return
        if label:
            self.label = _unescape(label)

    def spec(self, signature_name: str = "") -> Spec:
        return Spec(name=self.name, version=self.version, label=self.label or None, signature_name=signature_name)


def _unescape(text: str) -> str:
    """``curl_easy_unescape``: %XX sequences decoded, ``+`` left alone."""
    return urllib.parse.unquote_to_bytes(text).decode("utf-8", errors="replace")
