"""The catalog. The database is the source of truth: the vector index can always be rebuilt from it."""
import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models


def embedding_to_bytes(vector: np.ndarray) -> bytes:
    """How an embedding is stored: float32 bytes."""
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def embedding_from_bytes(blob) -> np.ndarray:
    return np.frombuffer(bytes(blob), dtype=np.float32)


class Category(models.Model):
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=200, help_text="unique among the category's siblings, so paths are clean")
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]
        verbose_name_plural = "categories"
        constraints = [
            models.UniqueConstraint(fields=["parent", "slug"], name="category_slug_unique_among_siblings"),
            models.UniqueConstraint(fields=["slug"], condition=models.Q(parent__isnull=True),
                                    name="category_slug_unique_at_the_top"),
        ]

    def __str__(self) -> str:
        return self.path

    @property
    def path(self) -> str:
        """Slash path of slugs from the root, e.g. "food/fruit"."""
        parts, node, seen = [], self, set()
        while node is not None and node.pk not in seen:
            seen.add(node.pk)
            parts.append(node.slug)
            node = node.parent
        return "/".join(reversed(parts))


def validate_attributes(value) -> None:
    """Product attributes: a JSON object that PostgreSQL can store (no NUL character anywhere in it)."""
    if not isinstance(value, dict):
        raise ValidationError("attributes must be a JSON object")
    if _holds_nul(value):
        raise ValidationError("attributes must not hold NUL characters (\\u0000)")


def _holds_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(key) or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


class Product(models.Model):
    sku = models.CharField(max_length=64, unique=True)
    title = models.CharField(max_length=300)
    description = models.TextField(blank=True, default="")
    price = models.DecimalField(max_digits=12, decimal_places=2, null=True, blank=True)
    currency = models.CharField(max_length=3, default="USD")
    category = models.ForeignKey(
        Category, null=True, blank=True, on_delete=models.SET_NULL, related_name="products"
    )
    attributes = models.JSONField(default=dict, blank=True, validators=[validate_attributes])
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["category", "is_active"])]

    def __str__(self) -> str:
        return f"{self.sku} {self.title}"


class ProductImage(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "pending: waiting to be embedded"
        PROCESSING = "processing", "processing: being embedded"
        INDEXED = "indexed", "indexed: searchable"
        FAILED = "failed", "failed: see the error"

    product = models.ForeignKey(Product, on_delete=models.CASCADE, related_name="images")
    file = models.FileField(upload_to="images/", max_length=255)
    sha256 = models.CharField(max_length=64)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.PENDING, db_index=True)
    error = models.TextField(blank=True, default="")
    model_identity = models.CharField(max_length=100, blank=True, default="", db_index=True)
    embedding = models.BinaryField(null=True, blank=True, editable=False)
    # 64-bit perceptual hash (ml/fingerprint.py), taken when the image is embedded: near-duplicates' second signal.
    phash = models.BigIntegerField(null=True, blank=True, editable=False)
    labels = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            # The same bytes twice on one product are one image.
            models.UniqueConstraint(fields=["product", "sha256"], name="unique_image_bytes_per_product"),
        ]

    def __str__(self) -> str:
        return f"image {self.pk} of {self.product.sku}"

    def vector(self) -> np.ndarray | None:
        """The stored embedding as float32, or None before the image is embedded."""
        if self.embedding is None:
            return None
        return embedding_from_bytes(self.embedding)


class CategoryPrediction(models.Model):
    class Status(models.TextChoices):
        SUGGESTED = "suggested"
        ACCEPTED = "accepted"
        REJECTED = "rejected"

    product = models.ForeignKey(Product, on_delete=models.CASCADE, related_name="predictions")
    category = models.ForeignKey(Category, on_delete=models.CASCADE, related_name="predictions")
    score = models.FloatField()
    head_version = models.CharField(max_length=64)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.SUGGESTED, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["product_id", "-score"]
        constraints = [
            models.UniqueConstraint(
                fields=["product", "category", "head_version"], name="unique_prediction_per_head"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.product.sku} -> {self.category.path} ({self.score:.2f})"


class CategorizerVersion(models.Model):
    """One training of the category head (catalog/categorizer.py): its state, its data, how good it is.

    The head in service is the newest `ready` version trained on the served model's embeddings
    (catalog/category_heads.py).
    """

    class Status(models.TextChoices):
        UNTRAINED = "untrained"  # never stored: what the API reports before the first training
        TRAINING = "training"
        READY = "ready"
        FAILED = "failed"

    status = models.CharField(max_length=12, choices=Status.choices, default=Status.TRAINING, db_index=True)
    version = models.CharField(max_length=64, blank=True, default="", help_text="The head's content hash.")
    model_identity = models.CharField(max_length=100, db_index=True)
    head_file = models.CharField(max_length=255, blank=True, default="", help_text="In settings.CATEGORIZER_DIR.")
    n_train = models.PositiveIntegerField(null=True, blank=True)
    n_test = models.PositiveIntegerField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True, default="")
    report_file = models.CharField(max_length=255, blank=True, default="", help_text="Relative to settings.REPORTS_DIR.")
    report_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    trained_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        verbose_name = "categorizer version"

    def __str__(self) -> str:
        return f"categorizer {self.version or self.pk} ({self.status})"


def _ingest_file_path(job: "IngestJob", filename: str) -> str:
    return f"ingest/{job.pk}/{filename}"


class IngestJob(models.Model):
    """A bulk import of a manifest (and an optional ZIP of images). Its progress is derived from its rows."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        COMPLETED_WITH_ERRORS = "completed_with_errors"
        FAILED = "failed"

    FINISHED = (Status.SUCCEEDED, Status.COMPLETED_WITH_ERRORS, Status.FAILED)

    status = models.CharField(max_length=24, choices=Status.choices, default=Status.QUEUED, db_index=True)
    manifest = models.FileField(upload_to=_ingest_file_path, max_length=255)
    manifest_format = models.CharField(max_length=8, choices=[("csv", "CSV"), ("jsonl", "JSON Lines")])
    manifest_name = models.CharField(max_length=255, blank=True, default="", help_text="the file name as uploaded")
    archive = models.FileField(upload_to=_ingest_file_path, max_length=255, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="ingest_jobs"
    )
    total = models.PositiveIntegerField(default=0)
    processed = models.PositiveIntegerField(default=0)
    succeeded = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    images_indexed = models.PositiveIntegerField(default=0)
    images_new = models.PositiveIntegerField(default=0, help_text="rows whose image was new to its product")
    images_already = models.PositiveIntegerField(default=0, help_text="rows whose image the product already had")
    first_image_at = models.DateTimeField(null=True, blank=True, help_text="when the job's first new image was indexed")
    last_image_at = models.DateTimeField(null=True, blank=True, help_text="when its latest new image was indexed")
    # Errors of the whole job (an unusable manifest); row errors live on the rows.
    errors = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-id"]
        verbose_name = "ingest job"

    def __str__(self) -> str:
        return f"ingest job {self.pk} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    @property
    def images_per_s(self) -> float | None:
        """New images indexed per second, from the first one indexed to the latest: the pipeline's pace, without
        the start (a worker loading its model, the archive opened), which ``seconds_to_first_image`` gives. A
        job indexed in one batch has no such span: its pace is over the whole job."""
        if self.first_image_at is None or self.last_image_at is None or self.started_at is None:
            return None
        seconds = (self.last_image_at - self.first_image_at).total_seconds()
        if seconds > 0 and self.images_new > 1:
            return round((self.images_new - 1) / seconds, 2)
        seconds = (self.last_image_at - self.started_at).total_seconds()
        return round(self.images_new / seconds, 2) if seconds > 0 else None

    @property
    def seconds_to_first_image(self) -> float | None:
        """From the job's start to its first new image indexed: model loading and the first batch included."""
        if self.started_at is None or self.first_image_at is None:
            return None
        return round((self.first_image_at - self.started_at).total_seconds(), 2)


class IngestRow(models.Model):
    """One manifest row. Its state is what lets a re-delivered chunk skip the work already done."""

    class Status(models.TextChoices):
        PENDING = "pending"
        DONE = "done"  # product and image stored; the image may still be waiting for the index
        FAILED = "failed"

    job = models.ForeignKey(IngestJob, on_delete=models.CASCADE, related_name="rows")
    number = models.PositiveIntegerField(help_text="1 is the first row after the header")
    sku = models.CharField(max_length=200, blank=True, default="")
    data = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    error = models.TextField(blank=True, default="")
    image = models.ForeignKey(
        ProductImage, null=True, blank=True, on_delete=models.SET_NULL, related_name="ingest_rows"
    )
    image_new = models.BooleanField(default=False, help_text="the row stored a new image (not one already there)")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["job_id", "number"]
        constraints = [models.UniqueConstraint(fields=["job", "number"], name="unique_ingest_row_number")]
        indexes = [models.Index(fields=["job", "status"])]

    def __str__(self) -> str:
        return f"row {self.number} of ingest job {self.job_id}"


class ModelVersion(models.Model):
    """A model the service can embed with: the ImageNet one it started with, or a fine-tuning of one.

    A fine-tuning goes queued -> training -> embedding (every image into its own shadow index) ->
    evaluating -> serving (promoted: better on the catalog's own evaluation) or rejected; failed if it
    could not finish. The model it replaces is retired; staff promote or roll back by hand too.
    """

    class Status(models.TextChoices):
        QUEUED = "queued"
        TRAINING = "training"
        EMBEDDING = "embedding"
        EVALUATING = "evaluating"
        CANDIDATE = "candidate"
        SERVING = "serving"
        REJECTED = "rejected"
        FAILED = "failed"
        RETIRED = "retired"

    WORKING = (Status.QUEUED, Status.TRAINING, Status.EMBEDDING, Status.EVALUATING)

    backbone = models.CharField(max_length=40)
    weights = models.CharField(max_length=500, help_text="imagenet, random, or a checkpoint file")
    identity = models.CharField(max_length=100, blank=True, default="", db_index=True)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.QUEUED, db_index=True)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children",
                               help_text="the model it was fine-tuned from")
    epochs = models.PositiveIntegerField(null=True, blank=True)
    progress = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    compared_with = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    compared_metrics = models.JSONField(default=dict, blank=True, help_text="the other model's, on the same queries")
    decision = models.JSONField(default=dict, blank=True)
    precision = models.JSONField(default=dict, blank=True,
                                 help_text="per machine kind: the precision chosen by the catalog's evaluation, with "
                                           "its figures (catalog/precision_choice.py)")
    error = models.TextField(blank=True, default="")
    report_file = models.CharField(max_length=255, blank=True, default="", help_text="Relative to settings.REPORTS_DIR.")
    attempts = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-id"]
        verbose_name = "model"

    def __str__(self) -> str:
        return f"model {self.pk} {self.identity or self.backbone} ({self.status})"


class DuplicatePair(models.Model):
    """Two images of different products that are copies of one photo (resized, re-compressed, cropped or
    colour-shifted): found when the later one is indexed, reviewed by a catalog admin."""

    class Status(models.TextChoices):
        OPEN = "open"
        NOT_DUPLICATES = "not_duplicates"  # remembered: never listed again
        MERGED = "merged"

    image = models.ForeignKey(ProductImage, on_delete=models.CASCADE, related_name="+")  # the lower id
    other = models.ForeignKey(ProductImage, on_delete=models.CASCADE, related_name="+")
    score = models.FloatField(help_text="cosine similarity of the two images' vectors")
    hash_distance = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="bits apart of the two images' 64-bit perceptual hashes, where both have one")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-score"]
        verbose_name = "near-duplicate pair"
        constraints = [
            models.UniqueConstraint(fields=["image", "other"], name="unique_duplicate_pair"),
            models.CheckConstraint(condition=models.Q(image__lt=models.F("other")), name="duplicate_pair_ordered"),
        ]

    def __str__(self) -> str:
        return f"images {self.image_id} and {self.other_id} ({self.score:.3f}, {self.status})"
