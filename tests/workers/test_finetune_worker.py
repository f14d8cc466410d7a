"""A fine-tuning on a real `train` worker (scripts/test, pass 2): killed with SIGKILL mid-training, the serving
model and index stay as they were, and the sweep resumes the training from its last epoch on another worker."""
import pytest

from catalog import services, serving
from catalog.finetuning import finetune_start
from catalog.model_versions import serving_version
from catalog.models import ModelVersion
from ml.finetune import FinetuneConfig
from tests.workers.live import crops, indexed_count, wait_until

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("services_only")]

EPOCHS = 30


def test_a_training_killed_mid_way_leaves_search_untouched_and_resumes(workers, photo):
    workers.env["VISUALSEARCH_FINETUNE_STALE_SECONDS"] = "4"
    for number, data in enumerate(crops(photo, 12)):
        category = services.category_get_or_create_path(path=("prints", "cards", "mugs")[number % 3])
        product = services.product_create(sku=f"F-{number}", title=f"product {number}", category=category)
        services.product_image_add(product=product, data=data)
    first = workers.start("w1")
    wait_until(lambda: indexed_count() == 12, 180, "12 images indexed", workers)
    served, before = serving_version(), serving.active_index()

    # Enough epochs that the kill lands mid-training on a fast machine too (an epoch here takes a fraction of
    # a second; four of them once ended before the test saw the second begin).
    version = finetune_start(config=FinetuneConfig(epochs=EPOCHS, products_per_batch=4, image_size=96))
    wait_until(lambda: ModelVersion.objects.get(pk=version.pk).progress.get("epoch", 0) >= 2, 240,
               "the second epoch under way (the first one's state saved)", workers)
    workers.kill(first)
    version.refresh_from_db()
    assert version.status == "training"
    assert serving.active_index() == before and serving_version().pk == served.pk

    workers.start("w2")
    wait_until(lambda: ModelVersion.objects.get(pk=version.pk).status in ("rejected", "serving", "failed"), 420,
               "the resumed fine-tuning to finish", workers)
    version.refresh_from_db()
    assert version.status in ("rejected", "serving"), version.error
    assert version.attempts == 2
    assert [e["epoch"] for e in version.decision["training"]["epochs"]] == list(range(1, EPOCHS + 1))
