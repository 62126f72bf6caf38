"""Hiding secrets in what the gateway shows (`blendgate check-config`, the admin API's configuration view,
error messages naming an upstream): URLs are parsed, not pattern-matched, and their credentials masked.

Keys held by the settings are pydantic `SecretStr` and serialise as `MASK`; the secrets left are those inside
URLs (a Redis URL's password, an upstream `api_base` carrying a key in its query string), which `redact_url`
finds by splitting the URL into its parts.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

MASK = "***"

# A query parameter is a secret when its name (lower-cased, letters and digits only) contains one of these...
_SECRET_SUBSTRINGS = ("password", "passwd", "passphrase", "secret", "token", "apikey", "accesskey", "privatekey",
                      "credential", "signature", "authorization")
# ...or when one of its words (split at punctuation and camelCase) is one of these.
_SECRET_WORDS = frozenset({"key", "pass", "pwd", "pw", "auth", "sig", "code", "session", "sas", "jwt", "bearer"})


def _words(name: str) -> list[str]:
    words, current = [], ""
    for previous, char in zip(" " + name, name):
        if not char.isalnum():
            words.append(current)
            current = ""
            continue
        if char.isupper() and previous.islower():
            words.append(current)
            current = ""
        current += char.lower()
    return [w for w in [*words, current] if w]


def is_secret_name(name: str) -> bool:
    """Whether a URL query parameter called `name` (e.g. "api_key", "apiKey", "sig", "password") holds a
    credential."""
    words = _words(unquote(name))
    joined = "".join(words)
    return any(s in joined for s in _SECRET_SUBSTRINGS) or any(w in _SECRET_WORDS for w in words)


def _mask_parameters(text: str) -> str:
    """`a=1&api_key=X` -> `a=1&api_key=***`: values of secret-looking names masked, the rest kept as written."""
    pairs = []
    for pair in text.split("&"):
        name, equals, value = pair.partition("=")
        pairs.append(f"{name}={MASK}" if equals and value and is_secret_name(name) else pair)
    return "&".join(pairs)


def _is_scheme(text: str) -> bool:
    return bool(text) and text[0].isalpha() and all(c.isalnum() or c in "+-." for c in text)


def redact_url(text: str) -> str:
    """`text` with the credentials of a URL masked: the password of its userinfo (`redis://user:***@host`; a
    userinfo without a password, such as a token, is masked whole), and the values of query or fragment
    parameters whose names look like secrets (`?api_key=***`). A userinfo holding unescaped reserved
    characters (`@` is fine; `/ ? # :` make the URL ambiguous) is masked up to the last `@`.
    Text that is not a URL (no `scheme://`) comes back unchanged."""
    scheme, separator, rest = text.partition("://")
    if not separator or not _is_scheme(scheme):
        return text
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a non-numeric port: a password cut at a reserved character
        ambiguous = "@" in parts.path
    except ValueError:
        ambiguous = True
    if ambiguous:
        return redact_url(f"{scheme}://{MASK}@{rest.rpartition('@')[2]}") if "@" in rest else f"{scheme}://{MASK}"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    redacted = f"{parts.scheme}://{netloc}{parts.path}"
    if parts.query:
        redacted += f"?{_mask_parameters(parts.query)}"
    if parts.fragment:
        redacted += f"#{_mask_parameters(parts.fragment)}"
    return redacted


def redact(data: Any) -> Any:
    """JSON data with `redact_url` applied to every string in it (dicts and lists walked)."""
    if isinstance(data, dict):
        return {key: redact(value) for key, value in data.items()}
    if isinstance(data, list):
        return [redact(value) for value in data]
    if isinstance(data, str):
        return redact_url(data)
    return data
