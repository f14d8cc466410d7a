"""The row report of an ingest job: every manifest row with its outcome, as CSV a spreadsheet opens safely."""
import csv
from collections.abc import Iterator

from catalog.duplicates import duplicate_warnings
from catalog.manifest import COLUMNS
from catalog.models import IngestJob, IngestRow, ProductImage

RowStatus = IngestRow.Status
ImageStatus = ProductImage.Status

REPORT_COLUMNS = ("line", "status", "error", "warning", *COLUMNS)
CHUNK = 1000
# A cell starting with one of these is run as a formula by spreadsheets (OWASP, "CSV Injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(value: str) -> str:
    """`value` as a spreadsheet shows it as text: a leading quote before anything that would start a formula."""
    return f"'{value}" if value.startswith(FORMULA_PREFIXES) else value


class _Echo:
    def write(self, value: str) -> str:
        return value


def _row_outcome(row: IngestRow) -> tuple[str, str]:
    if row.status == RowStatus.FAILED:
        return "failed", row.error
    if row.status == RowStatus.DONE:
        if row.image is not None and row.image.status == ImageStatus.FAILED:
            return "failed", f"image: {row.image.error or 'the image could not be embedded'}"
        if row.image is None or row.image.status == ImageStatus.INDEXED:
            return "succeeded", ""
    return "pending", ""


def ingest_job_report(*, job: IngestJob) -> Iterator[str]:
    """The job's rows as CSV text, a line at a time: each row's line in the manifest, its outcome and error, a
    warning when its image looks like another product's, then the manifest's own columns, so a catalog team can fix the failed rows in a spreadsheet and upload
    them again (the manifest ignores the extra columns). UTF-8 with a byte-order mark, as Excel expects.

    Every value came from someone's upload, so every cell that would start a formula starts with a quote.
    """
    writer = csv.writer(_Echo())
    yield "\ufeff" + writer.writerow(REPORT_COLUMNS)
    for error in job.errors:
        yield writer.writerow(["", "failed", spreadsheet_cell(error.get("error") or ""), "",
                               *("" for _ in COLUMNS)])
    rows = job.rows.select_related("image").order_by("number").iterator(chunk_size=CHUNK)
    while chunk := [row for _, row in zip(range(CHUNK), rows)]:
        # A warning, not a failure: the row's image looks like another product's (catalog/duplicates.py).
        warnings = duplicate_warnings(image_ids=[row.image_id for row in chunk if row.image_id])
        for row in chunk:
            status, error = _row_outcome(row)
            values = [str(row.data.get(name, "")) for name in COLUMNS]
            cells = [error, warnings.get(row.image_id, ""), *values]
            yield writer.writerow([row.number, status, *(spreadsheet_cell(value) for value in cells)])
