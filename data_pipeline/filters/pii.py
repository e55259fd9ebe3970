"""PII redaction: e-mail addresses, IPv4/IPv6 addresses and phone numbers become placeholders.

The document gets `pii_redactions`: {"email": n, "ip": n, "phone": n}, how many of each were
replaced (the runner sums these into the report). Matching is conservative: an IP address must
parse (Python's `ipaddress`), a phone number needs 10 to 15 digits in a phone-like shape
(international "+", a parenthesised area code, or digit groups joined by spaces, dots or
dashes), so version numbers, dates and plain long numbers are left alone.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re

from data_pipeline.steps import Step, register, require

EMAIL_RE = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\b"
)
IPV4_RE = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w.]*\d)")
# Candidates with at least two colons; `ipaddress` decides (so "12:30:45" is left alone).
IPV6_RE = re.compile(r"(?<![\w:])(?=[0-9A-Fa-f]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{2,39}(?![\w:])")
PHONE_RE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w-])"
)


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


def _phone_like(s: str) -> bool:
    n = _digits(s)
    if not 10 <= n <= 15:
        return False
    # Dates (2024-01-31 12:30) and dotted version numbers are not phone numbers.
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}.*", s) or re.fullmatch(r"\d+(?:\.\d+)+", s):
        return False
    return s.startswith("+") or "(" in s or bool(re.search(r"\d[ .-]\d", s))


@register
@dataclasses.dataclass(frozen=True)
class PII(Step):
    """Replaces e-mail addresses, IP addresses and phone numbers by placeholders (see module)."""

    name = "pii"
    emails: bool = True
    ips: bool = True
    phones: bool = True
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP_ADDRESS>"
    phone_placeholder: str = "<PHONE_NUMBER>"
    keep_private_ips: bool = True  # 10.x, 192.168.x, 127.0.0.1, ::1 ... are not personal data

    def check(self) -> None:
        for f in ("email_placeholder", "ip_placeholder", "phone_placeholder"):
            require(isinstance(getattr(self, f), str), f"{f} must be a string, got {getattr(self, f)!r}")

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """(redacted text, {"email", "ip", "phone": counts})."""
        counts = {"email": 0, "ip": 0, "phone": 0}

        def sub(kind: str, placeholder: str, valid=None):
            def repl(m: re.Match) -> str:
                s = m.group(0)
                if valid is not None and not valid(s):
                    return s
                counts[kind] += 1
                return placeholder
            return repl

        if self.emails and "@" in text:
            text = EMAIL_RE.sub(sub("email", self.email_placeholder), text)
        if self.ips:
            if "." in text:
                text = IPV4_RE.sub(sub("ip", self.ip_placeholder, self._ip_ok), text)
            if ":" in text:
                text = IPV6_RE.sub(sub("ip", self.ip_placeholder, self._ip_ok), text)
        if self.phones:
            text = PHONE_RE.sub(sub("phone", self.phone_placeholder, _phone_like), text)
        return text, counts

    def _ip_ok(self, s: str) -> bool:
        if not any(c.isdigit() for c in s):  # "a::b" parses as IPv6 but is a code path
            return False
        try:
            ip = ipaddress.ip_address(s)
        except ValueError:
            return False
        return ip.is_global or not self.keep_private_ips

    def apply(self, doc: dict):
        text, counts = self.redact(doc["text"])
        out = dict(doc)
        out["text"] = text
        out["pii_redactions"] = counts
        return out
