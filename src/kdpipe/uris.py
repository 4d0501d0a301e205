"""URI and path rules shared by the config (which validates with them) and tracking
(which redacts with them). Imports no kdpipe module: it sits at the bottom of the core.

The rules for every config value that becomes a place kdpipe writes to are in
docs/reliability.md, "Path confinement". A relative path must stay under the working
directory it is resolved against: ``..`` could otherwise climb into any directory the
process may write. An absolute path is the user's explicit, visible choice and is accepted
where the field says so. Names that end up inside paths or URIs may not carry separators.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["check_name_component", "check_write_path", "local_store_path", "redact_uri"]

_NAME_FORBIDDEN = ("/", "\\", ":", "@")
# ``scheme://user:password@host``: the user info runs up to the LAST "@" of the authority
# (a password may hold an unencoded "@"), never past the first "/", "?" or "#".
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<auth>[^\s/?#]*)@")
# Query parameters that carry secrets: tokens, keys, passwords, signatures (SAS, S3 presigned).
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;][^=&#\s]*(?:token|secret|passw|pwd|key|sig|credential|auth)[^=&#\s]*=)"
    r"[^&#\s'\"()]*",  # the value ends where the URI does, also inside quoted text
    re.IGNORECASE,
)


def redact_uri(uri: str) -> str:
    """Hide credentials embedded in a URI, or in any text that contains URIs.

    ``https://user:pw@host`` → ``https://***@host``; secret-looking query parameters
    (``?token=...``, ``access_token``, ``api_key``, ``password``, ``sig``, ...) keep their
    name and lose their value: ``?token=***``. Use it on everything printed or logged
    that may hold a tracking URI, error messages included.
    """
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}***@", uri)
    return _SECRET_PARAM.sub(lambda m: f"{m['name']}***", text)


def check_write_path(value: str, key: str, *, absolute_ok: bool) -> str:
    """Validate a configured location that kdpipe writes to.

    Args:
        value: the path as written in the config.
        key: the config key, named in the error.
        absolute_ok: whether an absolute path is a legitimate choice for this key.

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: empty, a NUL / control character, ``~`` (never expanded here, so it
            would create a directory literally named ``~``), a relative path with a
            ``..`` component, or an absolute path where none is allowed.
    """
    if not value or not value.isprintable():
        raise ValueError(f"{key} must be a non-empty path without control characters")
    if value.startswith("~"):
        raise ValueError(f"{key} may not start with '~' (it is not expanded); write the "
                         "absolute path, or a path relative to the working directory")
    path = Path(value)
    if path.is_absolute():
        if not absolute_ok:
            raise ValueError(f"{key} must be a relative path (it lives under the run's "
                             "directory); drop the leading '/'")
        return value
    if ".." in path.parts:
        raise ValueError(f"{key} may not contain '..': a relative path must stay inside the "
                         "working directory; use an absolute path to write elsewhere")
    return value


def check_name_component(value: str, key: str) -> str:
    """Validate a name that becomes one component of a path or URI (no separators).

    Raises:
        ValueError: empty, surrounding spaces, control characters, ``..``, or one of
            ``/ \\ : @``.
    """
    bad = [c for c in _NAME_FORBIDDEN if c in value]
    if not value.strip() or value != value.strip() or not value.isprintable():
        raise ValueError(f"{key} must be non-empty printable text without surrounding spaces")
    if bad or value in {".", ".."} or ".." in value:
        raise ValueError(f"{key} may not contain {', '.join(repr(c) for c in bad) or repr('..')}"
                         f": it becomes part of paths and models:/ URIs; use letters, digits, "
                         "'-', '_' and '.'")
    return value


def local_store_path(uri: str) -> str | None:
    """The file-system path a ``sqlite:///`` or ``file:`` tracking URI writes to, else None.

    ``sqlite:///rel.db`` is relative to the working directory, ``sqlite:////abs.db``
    absolute; ``file:/abs``, ``file:///abs`` and ``file:rel`` likewise. A bare path
    (no scheme) is what MLflow treats as a file store.
    """
    if uri.startswith("sqlite:///"):
        return uri.removeprefix("sqlite:///").split("?", 1)[0]
    if uri.startswith("file://"):
        return uri.removeprefix("file://") or None
    if uri.startswith("file:"):
        return uri.removeprefix("file:") or None
    if "://" not in uri and ":" not in uri.split("/", 1)[0]:
        return uri
    return None
