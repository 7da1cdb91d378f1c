"""
How the ``postgresql`` archive keeps Python values in its columns: text as
UTF-8 ``bytea`` that gives it back exactly, addresses, account keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mailhub.model import Address

__all__ = ["account_key", "as_tuple", "clean_text", "decode_text", "parse_address", "utf8"]


def as_tuple(items: Iterable[Any]) -> Any:
    # mypy cannot solve the attrs ``converter=tuple`` of the model's fields.
    return tuple(items)


def parse_address(text: str) -> Address:
    local, _, domain = text.rpartition("@")
    return Address(local, domain)


def utf8(text: str) -> bytes:
    """Any ``str`` as bytes that give it back exactly (NUL, lone surrogates and all)."""
    return text.encode("utf-8", "surrogatepass")


def decode_text(data: bytes | memoryview) -> str:
    return bytes(data).decode("utf-8", "surrogatepass")


def clean_text(text: str) -> str:
    """Text that a ``text`` column takes: no NUL, no lone surrogates."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def account_key(address: Address) -> bytes:
    """An address as the accounts' tables key it: folded (``Address.folded``), any character."""
    return utf8(str(address.folded()))
