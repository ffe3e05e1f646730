"""How both OPC UA test peers write values and timestamps as JSON, so the plant's dump and the
mirror's dump compare field by field."""

import base64
from datetime import datetime, timezone


def iso(ts):
    if ts is None:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_json(value):
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if value is None or isinstance(value, (str, int, float)):
        return value
    return str(value)  # structures, NodeIds, LocalizedTexts: only for a readable dump
