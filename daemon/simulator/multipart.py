"""A small multipart/form-data parser for POST /upload/image (RFC 7578)."""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser


@dataclass(frozen=True)
class FilePart:
    """A form field that carried a filename."""

    filename: str
    data: bytes


def _params(header: str, value: str) -> Message:
    message = Message()
    message[header] = value
    return message


def parse_form(content_type: str | None, body: bytes) -> dict[str, str | FilePart]:
    """Fields of a multipart/form-data body; first occurrence wins, {} if not multipart."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        return {}
    boundary = _params("content-type", content_type).get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        return {}
    delimiter = b"--" + boundary.encode("latin-1")
    fields: dict[str, str | FilePart] = {}
    for section in body.split(delimiter)[1:]:
        if section.startswith(b"--"):
            break  # the closing delimiter
        section = section.removeprefix(b"\r\n").removesuffix(b"\r\n")
        head, sep, data = section.partition(b"\r\n\r\n")
        if not sep:
            continue
        headers = HeaderParser().parsestr(head.decode("latin-1"))
        disposition = headers.get("content-disposition")
        if disposition is None:
            continue
        params = _params("content-disposition", disposition)
        name = params.get_param("name", header="content-disposition")
        filename = params.get_param("filename", header="content-disposition")
        if not isinstance(name, str) or name in fields:
            continue
        if isinstance(filename, str):
            fields[name] = FilePart(filename, data)
        else:
            fields[name] = data.decode("utf-8", "replace")
    return fields
