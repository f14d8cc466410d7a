"""Learning the catalog: fine-tune the serving model, embed every image into a shadow index, evaluate, decide.

`finetune_start` queues `finetune_model` on the `train` queue (GPU workers in production), which runs
`finetune_run` through its stages, each resumable: training (ml.finetune; the state after each epoch is
kept), embedding (every image into the candidate's vector store and its own index, while search keeps
serving the old model), evaluating (both models on the same queries, catalog/evaluation.py). The candidate
is promoted only if it is at least as good on search recall@1 and category top-1 and better on one;
otherwise it ends `rejected`. Nothing the serving model needs is touched before the promotion.
"""
import dataclasses
import datetime
import logging
import time
from dataclasses import asdict

import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from catalog.evaluation import (
    CatalogImages,
    catalog_images,
    catalog_sample,
    embed_catalog,
    evaluate,
    evaluation_report,
    load_catalog_image,
    query_vectors,
)
from catalog.model_versions import model_directory, model_promote, serving_version, vector_store
from catalog.models import ModelVersion
from catalog.queue import enqueue, queue_check
from catalog.serving import get_embedder
from ml.augment import cluttered_backgrounds
from ml.catalog_eval import held_out, query_plan, rank_products, search_metrics
from ml.files import file_sha256
from ml.index_build import build_base
from ml.index_store import IndexWriter, index_directory

logger = logging.getLogger(__name__)
Status = ModelVersion.Status
EMBED_CHUNK = 256  # images per vector-store chunk while embedding every image
TRAIN_DECODE_SIDE = 448
MAX_ATTEMPTS = 3
MIX_SALT = "visualsearch-mix-selection-1"  # not the evaluation's: the mix is chosen on photos it never shows
MIX_SAMPLE_PRODUCTS = 3000


def finetune_start(*, epochs: int | None = None, created_by=None, config=None) -> ModelVersion:
    """Queue a fine-tuning of the serving model; while one is working, that one is returned.

    ``config``: an ml.finetune.FinetuneConfig (tests); by default the recipe's for the device."""
    if epochs is not None and not 0 <= epochs <= 100:
        raise ValidationError({"epochs": f"epochs must be between 0 and 100, got {epochs}"})
    working = ModelVersion.objects.filter(status__in=ModelVersion.WORKING).first()
    if working is not None:
        return working
    parent = serving_version()
    if parent is None:
        raise ValidationError("no model serves yet: upload product images, and fine-tune once they are indexed")
    queue_check()
    with transaction.atomic():
        version = ModelVersion.objects.create(
            backbone=parent.backbone, weights=parent.weights, parent=parent, epochs=epochs, created_by=created_by,
            progress={"stage": "queued"}, decision={"config": asdict(config)} if config else {},
        )
        transaction.on_commit(lambda: enqueue("finetune_model", version_id=version.pk))
    version.refresh_from_db()
    return version


def finetune_fail(*, version_id: int, reason: str) -> None:
    """The fine-tuning cannot go on: it ends failed, and the serving model is as it was."""
    ModelVersion.objects.filter(pk=version_id, status__in=ModelVersion.WORKING).update(
        status=Status.FAILED, error=reason[:2000], finished_at=timezone.now()
    )


def _update(version: ModelVersion, **fields) -> None:
    ModelVersion.objects.filter(pk=version.pk).update(**fields, updated_at=timezone.now())
    for name, value in fields.items():
        setattr(version, name, value)


def finetune_run(*, version_id: int) -> dict:
    """Run a fine-tuning's remaining stages. Idempotent: a stage already done is not done again."""
    version = ModelVersion.objects.filter(pk=version_id).first()
    if version is None or version.status not in ModelVersion.WORKING:
        return {"skipped": True}
    _update(version, attempts=version.attempts + 1, started_at=version.started_at or timezone.now())
    try:
        if version.status in (Status.QUEUED, Status.TRAINING):
            _train(version)
        if version.status == Status.EMBEDDING:
            _embed_everything(version)
        if version.status == Status.EVALUATING:
            return _evaluate_and_decide(version)
    except (ValidationError, ValueError) as exc:
        message = " ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
        finetune_fail(version_id=version.pk, reason=message)
        return {"status": Status.FAILED, "error": message}
    return {"status": version.status}


def _train(version: ModelVersion) -> None:
    # Imported here: training needs PyTorch, and importing it costs seconds every worker would pay at start.
    from ml.finetune import FinetuneConfig, TrainingImage, default_config

    _update(version, status=Status.TRAINING, progress={"stage": "training"})
    catalog = catalog_images()
    numbers = {path: number for number, path in enumerate(sorted(set(catalog.category_of.values())))}
    # The products the evaluation holds out are left out of training altogether.
    images = [
        TrainingImage(product=int(product), category=numbers.get(catalog.category_of.get(int(product))),
                      load=(lambda name=catalog.files[int(image)]: load_catalog_image(name)))
        for image, product in zip(catalog.image_ids, catalog.product_ids) if not held_out(int(product))
    ]
    embedder = get_embedder({"backbone": version.backbone, "weights": version.weights})
    if version.decision.get("config"):  # settings given when the training was queued; epochs= still wins
        config = FinetuneConfig(**version.decision["config"])
        config = config if version.epochs is None else dataclasses.replace(config, epochs=version.epochs)
    else:
        config = default_config(version.backbone, embedder.device, version.epochs)
    directory = model_directory(version)
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    last_saved = [0.0]

    def progress(p) -> None:
        if time.monotonic() - last_saved[0] >= 1.0:  # a heartbeat too: the sweep resumes trainings that stop
            last_saved[0] = time.monotonic()
            _update(version, progress={"stage": "training", "done": (p.epoch - 1) * p.steps + p.step,
                                       "total": p.epochs * p.steps, "epoch": p.epoch, "epochs": p.epochs,
                                       "loss": round(p.loss, 4), "images_per_s": round(p.images_per_s, 1),
                                       "seconds_left": round(p.seconds_left)})

    weights = directory / "weights.pth"
    history = finetune(backbone=version.backbone, weights=version.weights, images=images, out=weights,
                       config=config, device=embedder.device, state_path=directory / "training-state.pt",
                       on_progress=progress, finetuned_out=directory / "finetuned.pth" if config.mix_choices else None)
    training = {**history, "seconds": round(time.monotonic() - started)}
    mix = _choose_mix(version, catalog, directory, config, embedder.device) if config.mix_choices else None
    identity = f"{version.backbone}:{file_sha256(weights)[:12]}"
    _update(version, status=Status.EMBEDDING, weights=str(weights), identity=identity, epochs=config.epochs,
            progress={"stage": "embedding", "done": 0, "total": len(catalog.image_ids)},
            decision={**version.decision, "training": training, **({"mix": mix} if mix else {})})
    # A resumed training writes it again from its last state; past this point nothing needs it.
    (directory / "finetuned.pth").unlink(missing_ok=True)


def _choose_mix(version: ModelVersion, catalog: CatalogImages, directory, config, device: str) -> dict:
    """Which share of the fine-tuned weights to keep (WiSE-FT), chosen on shopper-like photos of their own.

    Each of ``config.mix_choices`` is written as a checkpoint and measured by search recall@1 on a sample
    of the catalog, with queries of another salt than the evaluation's: photos made with other seeds (of
    mostly the same products on a small catalog). The evaluation that decides the promotion never sees
    these photos, so the choice does not flatter it. The best share is written to ``weights.pth``; a tie
    goes to the share nearest ``config.interpolation``. If the choice cannot be made (an image that no
    longer decodes among the queries' sources, say), ``config.interpolation``'s mix stays, and why is said."""
    from ml.embedder import load_embedder
    from ml.finetune import write_mix

    started, recall = time.monotonic(), {}
    catalog = catalog_sample(catalog, MIX_SAMPLE_PRODUCTS)
    plan = query_plan(list(zip(catalog.image_ids.tolist(), catalog.product_ids.tolist())), salt=MIX_SALT)
    total = len(config.mix_choices) * (len(catalog.image_ids) + len(plan))

    def progress(done: int) -> None:  # also the heartbeat that tells the sweep this training is alive
        _update(version, progress={"stage": "choosing the mix", "done": done, "total": total})

    try:
        backgrounds = cluttered_backgrounds()
        for number, share in enumerate(config.mix_choices):
            done = number * (len(catalog.image_ids) + len(plan))
            progress(done)
            path = directory / f"mix-{share:g}.pth"
            write_mix(backbone=version.backbone, weights=version.weights, finetuned=directory / "finetuned.pth",
                      share=share, out=path)
            model = load_embedder(version.backbone, path, device=device, precision="fp32", engine="torch")
            found, _ = embed_catalog(model, catalog, on_progress=lambda n, done=done: progress(done + n))
            done += len(catalog.image_ids)
            queries = query_vectors(model, plan, catalog, backgrounds, on_progress=lambda n, done=done: progress(done + n))
            recall[share] = search_metrics(rank_products(found, plan, queries), plan, {})["recall_at_1"]
        chosen = max(recall, key=lambda share: (recall[share], -abs(share - config.interpolation)))
        (directory / f"mix-{chosen:g}.pth").replace(directory / "weights.pth")
    except Exception as exc:  # the choice is a refinement: without it the recipe's own mix is kept
        logger.warning("fine-tuned model %s keeps the mix %g: the choice failed", version.pk, config.interpolation,
                       exc_info=True)
        return {"chosen": config.interpolation, "recall_at_1": {}, "queries": len(plan), "images": 0,
                "seconds": round(time.monotonic() - started), "error": f"the mix could not be chosen: {exc}"}
    finally:
        for share in config.mix_choices:
            (directory / f"mix-{share:g}.pth").unlink(missing_ok=True)
    logger.info("fine-tuned model %s keeps %g of its fine-tuned weights: recall@1 %s", version.pk, chosen, recall)
    return {"chosen": chosen, "recall_at_1": {f"{share:g}": round(value, 4) for share, value in recall.items()},
            "queries": len(plan), "images": len(found.image_ids), "seconds": round(time.monotonic() - started), "error": ""}


def _embed_everything(version: ModelVersion) -> None:
    """Every image into the candidate's vector store (resuming after the last stored), then its index."""
    store = vector_store(version)
    catalog = catalog_images()
    embedder = get_embedder({"backbone": version.backbone, "weights": version.weights})
    remaining = np.flatnonzero(catalog.image_ids > store.last_id())
    done = len(catalog.image_ids) - len(remaining)
    for start in range(0, len(remaining), EMBED_CHUNK):
        rows = remaining[start:start + EMBED_CHUNK]
        chunk = dataclasses.replace(catalog, image_ids=catalog.image_ids[rows], product_ids=catalog.product_ids[rows])
        found, _ = embed_catalog(embedder, chunk)
        if len(found.image_ids):
            store.append(found.image_ids, found.vectors)
        done += len(rows)
        _update(version, progress={"stage": "embedding", "done": done, "total": len(catalog.image_ids)})
    count = store.count()
    directory = index_directory(settings.INDEX_DIR, version.identity)
    writer = IndexWriter(directory, version.identity, embedder.dim, exact_threshold=settings.INDEX_EXACT_THRESHOLD)
    writer.replace_base(lambda snapshot: build_base(
        lambda: iter(store), count=count, dim=embedder.dim, exact_threshold=settings.INDEX_EXACT_THRESHOLD,
        measured_against="exact search over the candidate's vectors"), fresh=True)
    _update(version, status=Status.EVALUATING, progress={"stage": "evaluating", "done": 0, "total": 2})


def _evaluate_and_decide(version: ModelVersion) -> dict:
    current = serving_version()

    def progress(stage, done, total):
        _update(version, progress={"stage": "evaluating", "done": done, "total": total})

    mine, theirs = evaluate([version, current], on_progress=progress)
    ModelVersion.objects.filter(pk=current.pk).update(metrics=theirs)  # the serving model's latest figures too
    better, reason = _compare(mine, theirs)
    _update(version, metrics=mine, compared_with=current, compared_metrics=theirs,
            decision={**version.decision, "promoted": better, "why": reason},
            status=Status.CANDIDATE, finished_at=timezone.now(), progress={"stage": "evaluated"})
    evaluation_report(version)
    if better:
        model_promote(version=version, reason=reason)
    else:
        _update(version, status=Status.REJECTED)
    version.refresh_from_db()
    logger.info("fine-tuned model %s %s: %s", version.pk, version.status, reason)
    return {"status": version.status, "why": reason}


def _compare(mine: dict, theirs: dict) -> tuple[bool, str]:
    """At least as good on search recall@1 and category top-1, and better on one of them."""
    search = (mine["search"]["recall_at_1"], theirs["search"]["recall_at_1"])
    if mine["categories"] is None or theirs["categories"] is None:
        return False, ("category top-1 cannot be measured on this catalog (it needs at least two categories "
                       "with held-out products), so the candidate cannot show it is better on both")
    categories = (mine["categories"]["top1"], theirs["categories"]["top1"])
    figures = (f"search recall@1 {search[0]:.3f} against {search[1]:.3f}, category top-1 {categories[0]:.3f} "
               f"against {categories[1]:.3f}")
    if search[0] >= search[1] and categories[0] >= categories[1] and (search[0] > search[1] or
                                                                       categories[0] > categories[1]):
        return True, f"better on the catalog's evaluation: {figures}"
    return False, f"not better on the catalog's evaluation: {figures}"


def finetune(**kwargs) -> dict:
    """``ml.finetune.finetune``, imported on first use (PyTorch)."""
    from ml.finetune import finetune as train

    return train(**kwargs)


def trainings_resume_lost() -> dict:
    """Fine-tunings whose progress stopped (their worker died): queued again to resume, or failed."""
    cutoff = timezone.now() - datetime.timedelta(seconds=settings.FINETUNE_STALE_SECONDS)
    resumed = failed = 0
    for version in ModelVersion.objects.filter(status__in=ModelVersion.WORKING, updated_at__lt=cutoff):
        if version.attempts >= MAX_ATTEMPTS:
            finetune_fail(version_id=version.pk, reason=f"the fine-tuning stopped {version.attempts} times "
                                                        "(its worker died); start it again")
            failed += 1
        else:
            _update(version, progress={**version.progress, "resumed": True})
            enqueue("finetune_model", version_id=version.pk)
            resumed += 1
    return {"resumed": resumed, "failed": failed}
