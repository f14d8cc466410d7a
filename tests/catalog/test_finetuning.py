"""Learning the catalog: evaluation, fine-tuning through every status, promotion, rejection and rollback.

A tiny recipe (64-pixel views, one epoch) of the random-weights EfficientNet-Lite0 keeps these fast; the
shopper queries and the held-out split are the real ones."""
import io

import numpy as np
import pytest
from django.core.management import call_command
from PIL import Image

from catalog import finetuning, search, services, serving
from catalog.finetuning import finetune_start
from catalog.model_versions import model_directory, model_rollback, serving_version, vector_store
from catalog.models import ModelVersion, ProductImage
from ml.catalog_eval import held_out
from ml.finetune import FinetuneConfig
from ml.images import ImageDecodeError
from tests.ml.photos import crops

# Ids from 1 whatever ran before: the held-out split is a hash of the product id, and this tiny catalog
# needs held-out products in two categories.
pytestmark = pytest.mark.django_db(transaction=True, reset_sequences=True)
TINY = FinetuneConfig(epochs=1, products_per_batch=6, image_size=64)
CATEGORIES = ("animals", "drinks", "vehicles")


@pytest.fixture(autouse=True)
def _random_model(settings, isolated_data):
    settings.EMBED_BACKBONE = "efficientnet_lite0"
    settings.EMBED_WEIGHTS = "random"
    settings.EMBED_FALLBACK = False


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def build_catalog(products: int = 18, categories=CATEGORIES) -> list[ProductImage]:
    images = []
    for number, image in enumerate(crops(products, seed=11)):
        category = services.category_get_or_create_path(path=categories[number % len(categories)])
        product = services.product_create(sku=f"P-{number}", title=f"product {number}", category=category)
        images.append(services.product_image_add(product=product, data=jpeg(image.resize((160, 160))))[0])
    return images


def statuses_seen(monkeypatch) -> list[str]:
    seen = []
    update = finetuning._update

    def recording(version, **fields):
        if "status" in fields and (not seen or seen[-1] != fields["status"]):
            seen.append(str(fields["status"]))
        return update(version, **fields)

    monkeypatch.setattr(finetuning, "_update", recording)
    return seen


def test_evaluating_the_serving_model_stores_its_figures_and_a_report(staff):
    build_catalog()
    response = staff.post("/api/evaluate/")
    assert response.status_code == 202
    latest = staff.get("/api/evaluate/latest/").json()
    figures = latest["metrics"]
    assert latest["status"] == "serving" and latest["identity"].startswith("efficientnet_lite0:")
    assert 0 <= figures["search"]["recall_at_1"] <= figures["search"]["recall_at_10"] <= 1
    assert 0 < figures["search"]["mrr"] <= 1 and 0 <= figures["categories"]["top1"] <= figures["categories"]["top5"]
    report = staff.get(f"/admin/catalog/modelversion/{latest['id']}/report/")
    assert report.status_code in (200, 302)  # staff's token is not a session: the admin asks it to log in


def test_a_fine_tune_goes_through_every_status_and_is_promoted_when_it_wins(staff, monkeypatch):
    images = build_catalog()
    seen = statuses_seen(monkeypatch)
    monkeypatch.setattr(finetuning, "_compare", lambda mine, theirs: (True, "better (as this test decides)"))
    old = serving_version()

    version = finetune_start(config=TINY)

    version.refresh_from_db()
    assert seen == ["training", "embedding", "evaluating", "candidate"] and version.status == "serving"
    old.refresh_from_db()
    assert old.status == "retired" and version.compared_with == old
    assert serving.active_index()["identity"] == version.identity == serving.get_embedder().identity.key
    stored = set(ProductImage.objects.values_list("model_identity", flat=True))
    assert stored == {version.identity}, "the database holds the serving model's vectors"
    assert vector_store(old).count() == len(images), "the retired model's vectors were archived"
    hits = search.similar_products(ProductImage.objects.get(pk=images[0].pk).vector(), k=1)
    assert hits[0].image_id == images[0].pk
    detail = staff.get(f"/api/models/{version.pk}/").json()
    assert detail["status"] == "serving" and detail["compared_with"]["id"] == old.pk
    assert set(detail["metrics"]) == {"search", "categories"} and detail["compared_with"]["metrics"]["search"]
    assert detail["decision"] == "better (as this test decides)"
    mix = detail["mix"]  # the share of fine-tuned weights, chosen on photos of its own
    assert set(mix["recall_at_1"]) == {"0.25", "0.5", "0.75"} and mix["chosen"] in (0.25, 0.5, 0.75)
    assert mix["recall_at_1"][f"{mix['chosen']:g}"] == max(mix["recall_at_1"].values())
    assert mix["queries"] == mix["images"] == len(images)
    assert mix["error"] == "" and [path.name for path in model_directory(version).glob("*.pth")] == ["weights.pth"]

    back = model_rollback(version=ModelVersion.objects.get(pk=version.pk))
    assert back.pk == old.pk and back.status == "serving"
    assert serving.active_index()["identity"] == old.identity == serving.get_embedder().identity.key
    assert set(ProductImage.objects.values_list("model_identity", flat=True)) == {old.identity}
    assert ModelVersion.objects.get(pk=version.pk).status == "retired"


def test_a_mix_that_cannot_be_chosen_keeps_the_recipes_own_and_says_why(staff, monkeypatch):
    build_catalog()

    def unreadable(*args, **kwargs):
        raise ImageDecodeError("the stored file images/x.jpg cannot be read")

    monkeypatch.setattr(finetuning, "query_vectors", unreadable)  # only the mix's choice calls it from here
    version = finetune_start(config=TINY)
    mix = staff.get(f"/api/models/{version.pk}/").json()["mix"]
    assert mix["chosen"] == TINY.interpolation and mix["recall_at_1"] == {}
    assert mix["error"] == "the mix could not be chosen: the stored file images/x.jpg cannot be read"
    version.refresh_from_db()
    assert version.status in ("rejected", "serving") and not list(model_directory(version).glob("mix-*"))


def test_a_fine_tune_that_cannot_win_ends_rejected_and_search_is_untouched(staff):
    build_catalog()
    before = serving.active_index()
    response = staff.post("/api/models/finetune/", {"epochs": 0}, format="json")  # nothing learnt: equal figures
    assert response.status_code == 202 and set(response.json()) == {"id", "status"}
    version = ModelVersion.objects.get(pk=response.json()["id"])
    assert version.status == "rejected" and "not better" in version.decision["why"]
    assert serving.active_index() == before and serving_version().pk == version.parent_id
    assert (ModelVersion.objects.get(pk=version.parent_id).metrics["search"]["recall_at_1"]
            == version.compared_metrics["search"]["recall_at_1"])


def test_a_single_category_catalog_cannot_show_a_better_model(monkeypatch):
    build_catalog(products=12, categories=("everything",))
    version = finetune_start(config=TINY)
    version.refresh_from_db()
    assert version.status == "rejected" and "category top-1 cannot be measured" in version.decision["why"]


def test_a_failed_training_leaves_the_serving_model_and_index_untouched(monkeypatch):
    build_catalog(products=8)
    before = serving.active_index()

    def crash(**kwargs):
        raise ValueError("the GPU fell off")

    monkeypatch.setattr(finetuning, "finetune", crash)
    version = finetune_start(config=TINY)
    version.refresh_from_db()
    assert version.status == "failed" and "GPU fell off" in version.error
    assert serving.active_index() == before and serving_version().status == "serving"


def test_a_lost_training_is_resumed_by_the_sweep_or_fails_after_its_attempts(settings, monkeypatch):
    build_catalog(products=8)
    settings.FINETUNE_STALE_SECONDS = 0
    monkeypatch.setattr(finetuning, "enqueue", lambda *args, **kwargs: True)  # nothing runs it at once
    version = finetune_start(config=TINY)
    assert ModelVersion.objects.get(pk=version.pk).status == "queued"
    assert finetuning.trainings_resume_lost() == {"resumed": 1, "failed": 0}
    ModelVersion.objects.filter(pk=version.pk).update(attempts=finetuning.MAX_ATTEMPTS)
    assert finetuning.trainings_resume_lost() == {"resumed": 0, "failed": 1}
    assert "worker died" in ModelVersion.objects.get(pk=version.pk).error


def test_the_api_refuses_bad_input_and_lists_the_models(staff, anon):
    build_catalog(products=6)
    assert staff.post("/api/models/finetune/", {"epochs": -1}, format="json").status_code == 400
    assert anon.get("/api/models/").status_code in (401, 403)
    listed = staff.get("/api/models/").json()
    assert [m["status"] for m in listed] == ["serving"], "the model the service started with is listed"
    serving_id = listed[0]["id"]
    refused = staff.post(f"/api/models/{serving_id}/promote/")
    assert refused.status_code == 400 and "already serving" in refused.json()["error"]
    refused = staff.post(f"/api/models/{serving_id}/rollback/")
    assert refused.status_code == 400 and "nothing to roll back" in refused.json()["error"]


def test_manage_py_evaluate_and_models_print_the_figures(capsys):
    build_catalog(products=9)
    call_command("evaluate")
    out = capsys.readouterr().out
    assert "search recall@1" in out and "category top-1" in out and "/report/" in out
    call_command("models")
    assert "serving" in capsys.readouterr().out


def test_the_held_out_products_are_left_out_of_training(monkeypatch):
    images = build_catalog()
    trained_on = []

    def record(**kwargs):
        trained_on.extend(image.product for image in kwargs["images"])
        raise ValueError("stop here")

    monkeypatch.setattr(finetuning, "finetune", record)
    finetune_start(config=TINY)
    held = {image.product_id for image in images if held_out(image.product_id)}
    assert held and not held & set(trained_on) and set(trained_on)
    assert np.all([not held_out(p) for p in trained_on])
