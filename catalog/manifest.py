"""Ingest manifests: CSV or JSON Lines text into rows, refusing a file that cannot be one as a whole.

Pure functions of the uploaded bytes; a row's values are checked when the row is processed (catalog/ingest.py).
"""
import codecs
import csv
import io
import json
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import PurePath

from django.core.exceptions import ValidationError

COLUMNS = ("sku", "title", "image", "category", "price", "description")
REQUIRED_COLUMNS = ("sku", "title", "image")
# What people upload as a manifest by mistake, by the file's first bytes.
NOT_TEXT = (
    (b"PK\x03\x04", "a ZIP file (an Excel .xlsx workbook is one; a ZIP of images goes in `archive`)"),
    (b"\xd0\xcf\x11\xe0", "an Excel 97-2003 workbook (.xls)"),
    (codecs.BOM_UTF16_LE, "UTF-16 text (Excel's \"Unicode Text\")"),
    (codecs.BOM_UTF16_BE, "UTF-16 text"),
)


@dataclass(frozen=True)
class ManifestRow:
    number: int  # the row's line in the file: the CSV header is line 1
    fields: dict[str, str]
    error: str = ""


@dataclass(frozen=True)
class Manifest:
    format: str
    rows: list[ManifestRow] = field(default_factory=list)


def manifest_format(*, filename: str, data: bytes) -> str:
    """"jsonl" for .jsonl/.ndjson/.json files or content starting with "{", else "csv"."""
    suffix = PurePath(filename or "").suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "jsonl" if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{" else "csv"


def manifest_parse(*, data: bytes, format: str) -> Manifest:
    """Every row of a manifest. ValidationError when the file as a whole cannot be used.

    A row that cannot be read (a JSON line that is not an object) comes back with its error set;
    the row's values are checked when it is processed.
    """
    text = _decode(data)
    rows = _parse_csv(text) if format == "csv" else _parse_jsonl(text)
    if not rows:
        after = " after its header" if format == "csv" else ""
        raise ValidationError({"manifest": f"the manifest has no rows{after}"})
    return Manifest(format=format, rows=_conflicts_failed(rows))


PRODUCT_FIELDS = ("title", "category", "price", "description")  # what the rows of one sku must agree on


def _same(name: str, a: str, b: str) -> bool:
    if name == "price":
        try:
            return Decimal(a) == Decimal(b)
        except InvalidOperation:
            return a == b
    if name == "category":
        return [p.strip() for p in a.split("/") if p.strip()] == [p.strip() for p in b.split("/") if p.strip()]
    return a == b


def _conflicts_failed(rows: list[ManifestRow]) -> list[ManifestRow]:
    """Rows of one sku (several images of a product) must agree on the product: a later row that gives a
    field another value than an earlier row fails, naming that line and field, instead of overwriting it."""
    first: dict[str, dict[str, tuple[int, str]]] = {}  # sku -> field -> (line, value)
    out = []
    for row in rows:
        sku = row.fields.get("sku", "")
        if row.error or not sku:
            out.append(row)
            continue
        given = first.setdefault(sku, {})
        conflicts = [
            f"{name}: line {given[name][0]} gives this sku's {name} as {given[name][1][:80]!r}, this row as "
            f"{value[:80]!r}; rows of one sku must agree on the product"
            for name in PRODUCT_FIELDS
            if (value := row.fields.get(name, "")) and name in given and not _same(name, given[name][1], value)
        ]
        if conflicts:
            out.append(replace(row, error="; ".join(conflicts)))
            continue
        for name in PRODUCT_FIELDS:
            if row.fields.get(name) and name not in given:
                given[name] = (row.number, row.fields[name])
        out.append(row)
    return out


def _decode(data: bytes) -> str:
    save_as = 'save it as UTF-8 (in Excel: "CSV UTF-8") and upload it again'
    for signature, what in NOT_TEXT:
        if data.startswith(signature):
            raise ValidationError({"manifest": f"the manifest is {what}, not CSV or JSON Lines text; {save_as}"})
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValidationError({
            "manifest": f"the manifest is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} is not valid "
                        f"UTF-8; {save_as}"
        }) from None
    if "\x00" in text:  # UTF-16 without a byte-order mark, or a binary file; no database stores it as text
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise ValidationError({
            "manifest": f"the manifest is not UTF-8 text: line {line} holds a NUL character (UTF-16 text or a "
                        f"binary file has them); {save_as}"
        })
    return text


def _check_columns(names: list[str], what: str) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        has = ", ".join(n for n in names if n)[:300] or "nothing"
        raise ValidationError({
            "manifest": f"the manifest's {what} has no {', '.join(missing)} "
                        f"{'column' if len(missing) == 1 else 'columns'} (it has: {has}); the columns are "
                        f"{','.join(COLUMNS)}, of which {','.join(REQUIRED_COLUMNS)} are required"
        })


def _parse_csv(text: str) -> list[ManifestRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[ManifestRow] = []
    try:
        header = next(reader, None)
        if header is None:
            raise ValidationError({"manifest": "the manifest is empty; its first line must be the header "
                                               f"{','.join(COLUMNS)}"})
        names = [name.strip().lower() for name in header]
        _check_columns(names, "header")
        position = {name: names.index(name) for name in COLUMNS if name in names}
        line = reader.line_num
        for values in reader:
            number, line = line + 1, reader.line_num
            if not any(value.strip() for value in values):
                continue  # a blank line
            fields = {name: values[i].strip() if i < len(values) else "" for name, i in position.items()}
            rows.append(ManifestRow(number=number, fields=fields))
    except csv.Error as exc:
        raise ValidationError({"manifest": f"the manifest is not valid CSV (line {reader.line_num}: {exc})"}) from None
    return rows


def _json_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("holds a NUL character")
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{json.dumps(value)[:60]} is not text or a number")


def _parse_jsonl(text: str) -> list[ManifestRow]:
    rows: list[ManifestRow] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, RecursionError):
                reason = "JSON nested too deeply to read"
            elif isinstance(exc, json.JSONDecodeError):
                reason = f"not valid JSON ({exc.msg}, column {exc.colno})"
            else:
                reason = str(exc)
            if not rows:
                raise ValidationError({"manifest": f"the manifest's first line is {reason}; each line must be a "
                                                   'JSON object such as {"sku": "A-1", "title": "...", '
                                                   '"image": "a.jpg"}'})
            rows.append(ManifestRow(number=number, fields={}, error=f"the line is {reason}"))
            continue
        obj = {str(key).strip().lower(): value for key, value in obj.items()}
        if not rows:
            _check_columns(list(obj), "first line")
        fields, errors = {}, []
        for name in COLUMNS:
            try:
                fields[name] = _json_value(obj.get(name))
            except ValueError as exc:
                errors.append(f"{name}: {exc}")
        rows.append(ManifestRow(number=number, fields=fields, error="; ".join(errors)))
    return rows
