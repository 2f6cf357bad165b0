"""Relative paths inside a source or destination.

A source path is a '/'-joined list of *encoded* names: Drive allows '/' (and anything else) inside a
name, so '%' and '/' are percent-encoded per component. That keeps the original names recoverable for a
Drive destination ("original names kept in Drive") while a local destination turns each decoded name
into a safe file name (no separators, no '..', no control characters).
"""

from __future__ import annotations

import unicodedata

_MAX_NAME_BYTES = 255


def encode_component(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F")


def decode_component(component: str) -> str:
    return component.replace("%2F", "/").replace("%2f", "/").replace("%25", "%")


def join(*components: str) -> str:
    return "/".join(c for c in components if c)


def split(path: str) -> list[str]:
    return [c for c in path.split("/") if c]


def safe_local_name(name: str) -> str:
    """A single file/folder name that cannot escape or confuse a local file system."""
    cleaned = "".join("_" if (unicodedata.category(ch) == "Cc" or ch in "/\\\x00") else ch for ch in name).strip()
    if cleaned in ("", ".", ".."):
        cleaned = cleaned.replace(".", "_") or "_"
    while len(cleaned.encode("utf-8")) > _MAX_NAME_BYTES:
        cleaned = cleaned[:-1]
    return cleaned


def safe_local_parts(path: str) -> list[str]:
    """Decoded, sanitised components of an encoded relative path."""
    return [safe_local_name(decode_component(c)) for c in split(path)]


def display(path: str) -> str:
    """Human-readable form of an encoded path."""
    return "/".join(decode_component(c) for c in split(path))
