"""The one gate every string from an upstream passes before it reaches a caller or a log.

A provider (or an egress proxy in front of it) controls every header and field of its answer:
a broken or hostile one can echo the `Authorization` value it received into the request id,
the session id, the model, an error message or an ICE server url, and icegate would hand the
provider key to its caller. So no adapter reads an upstream string directly: it asks
`upstream_text` for it, naming the field's shape.

The rules (docs/SECURITY.md, "Upstream text"):
- A value of known shape (request id, session id, model, voice, token, ICE url, username,
  credential) is returned unchanged only when it is a string that fullmatches its shape's
  pattern (which bounds its length and character set) and contains none of the secrets of
  the call (the provider key); otherwise it is dropped: the function returns "", and the
  adapter falls back to what icegate asked for, leaves the field empty, or refuses the answer.
- Free text (an error message) is kept, but cleaned: characters that are not printable become
  spaces (no forged log lines), every secret of the call becomes `[redacted]`, and so does
  anything that looks like a credential (`Bearer ...`, `sk-...`, a Google `AIza...` key);
  then it is cut to `MAX_MESSAGE_CHARS`.
Shaped values are not searched for credential look-alikes: a random token or TURN credential
may contain `-sk-...` by chance, and the shape already excludes spaces and headers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import Enum

REDACTED = "[redacted]"
MAX_MESSAGE_CHARS = 300
"""Free text is cut here: enough for a provider's one-sentence reason, not for a payload."""
_MAX_SCANNED_CHARS = 64 * 1024
"""Free text beyond this is not even scanned (it would be cut anyway)."""

MODEL_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}"
"""Model and deployment names, as icegate accepts them from callers too."""


class UpstreamField(Enum):
    """The shape of an upstream string: the pattern a kept value fullmatches, or None for
    free text."""

    REQUEST_ID = r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}"
    SESSION_ID = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}"
    MODEL = MODEL_PATTERN
    VOICE = r"[A-Za-z0-9](?:[A-Za-z0-9 _.-]{0,62}[A-Za-z0-9_.-])?"
    # Ephemeral tokens (OpenAI `ek_...`, Gemini `auth_tokens/...`, Orga's JWT): visible ASCII.
    TOKEN = r"[\x21-\x7e]{1,8192}"  # noqa: S105 (a pattern, not a password)
    # RFC 7064 / 7065 URIs: scheme, host or [IPv6], optional port and transport.
    ICE_URL = (r"(?:stuns?|turns?):(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253})"
               r"(?::[0-9]{1,5})?(?:\?transport=(?:udp|tcp))?")
    # A realtime call's id (OpenAI's `rtc_...`), read from the answer's Location header.
    CALL_ID = r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}"
    ICE_USERNAME = r"[\x21-\x7e]{1,512}"
    ICE_CREDENTIAL = r"[\x21-\x7e]{1,512}"
    MESSAGE = None


_PATTERNS = {
    shape: re.compile(shape.value) for shape in UpstreamField if shape.value is not None
}
# What a credential looks like in free text, whoever's it is.
_CREDENTIAL_LOOKALIKES = re.compile(
    r"(?i:\bbearer\s+)\S+"                    # an Authorization value
    r"|(?<![A-Za-z0-9])sk-[A-Za-z0-9_*.-]{4,}"  # OpenAI-style keys, masked echoes included
    r"|\bAIza[0-9A-Za-z_-]{20,}"                # Google API keys
)


def upstream_text(value: object, shape: UpstreamField, secrets: Sequence[str]) -> str:
    """`value`, from an upstream answer, made fit to reach a caller or a log.

    Args:
        value: What the upstream sent (a header value, a JSON field); anything but a str
            counts as absent.
        shape: What the value is meant to be; `UpstreamField.MESSAGE` for free text.
        secrets: What must never come out: the provider key, and any other credential the
            call sent (e.g. the token used for a second request).

    Returns:
        The value unchanged, the free text cleaned and capped, or "" when a shaped value does
        not fit its shape or holds a secret.
    """
    if not isinstance(value, str) or not value:
        return ""
    if shape is UpstreamField.MESSAGE:
        return _clean_message(value, secrets)
    if not _PATTERNS[shape].fullmatch(value):
        return ""
    if any(secret and secret in value for secret in secrets):
        return ""
    return value


def _clean_message(text: str, secrets: Sequence[str]) -> str:
    # Keys are visible ASCII, so turning every other character into a space first never
    # hides a key from the search below; it removes line breaks that would forge log lines.
    text = "".join(ch if ch.isprintable() else " " for ch in text[:_MAX_SCANNED_CHARS])
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _CREDENTIAL_LOOKALIKES.sub(_redact_match, text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[:MAX_MESSAGE_CHARS] + "..."
    return text


def _redact_match(match: re.Match[str]) -> str:
    # Keep "Bearer " so the message still says what was there.
    head = match.group(0)
    return head[:7] + REDACTED if head[:6].lower() == "bearer" else REDACTED


SDP_LINE = re.compile(r"[a-z]=[\x20-\x7e]*")
"""One line of an SDP description (RFC 8866: `<type>=<value>`), printable ASCII, to
`fullmatch`."""
MAX_SDP_CHARS = 64 * 1024


def sdp_lines_fit(text: str, limit: int = MAX_SDP_CHARS) -> bool:
    """Whether `text` is an SDP description: `v=0` first, then `<type>=<value>` lines of
    printable ASCII ended by CRLF (or LF), at most `limit` characters in all."""
    if len(text) > limit or not text.startswith("v=0"):
        return False
    lines = text.replace("\r\n", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    return all(SDP_LINE.fullmatch(line) for line in lines)


def upstream_sdp(value: object, secrets: Sequence[str]) -> str:
    """An SDP answer from an upstream, unchanged when it is SDP (`sdp_lines_fit`) holding no
    secret of the call; "" otherwise (the adapter then refuses the answer)."""
    if not isinstance(value, str) or not sdp_lines_fit(value):
        return ""
    if any(secret and secret in value for secret in secrets):
        return ""
    return value
