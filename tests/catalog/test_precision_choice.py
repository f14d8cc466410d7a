"""Which precision "auto" embeds with: chosen by the catalog's own evaluation, per model and machine kind."""
import pytest
from django.core.management import call_command

from catalog import precision_choice, serving
from catalog.model_versions import serving_version
from catalog.precision_choice import TOLERANCE, choose
from ml.precision import machine_kind
from tests.catalog.test_finetuning import build_catalog

pytestmark = pytest.mark.django_db(transaction=True)
FP32 = {"recall_at_1": 0.60, "top1": 0.80}


@pytest.fixture(autouse=True)
def _random_model(settings, isolated_data, monkeypatch):
    settings.EMBED_BACKBONE = "efficientnet_lite0"
    settings.EMBED_WEIGHTS = "random"
    settings.EMBED_FALLBACK = False
    monkeypatch.setenv("TORCH_HOME", str(isolated_data / "torch"))  # graphs made here, calibrated on this catalog


def figures(int8: dict, mixed: dict | None = None) -> dict:
    return {"fp32": FP32, "int8": int8, "int8_queries_fp32_catalog": mixed or int8}


def test_int8_is_chosen_only_when_faster_and_within_half_a_point_everywhere():
    close = {"recall_at_1": 0.60 - TOLERANCE + 0.001, "top1": 0.80 + 0.02}
    assert choose(figures(close), {"fp32": 50, "int8": 120})[0] == "int8"

    chosen, reason = choose(figures(close, {"recall_at_1": 0.60, "top1": 0.79}), {"fp32": 50, "int8": 120})
    assert chosen == "fp32" and "top1 int8_queries_fp32_catalog: 0.790 vs fp32 0.800" in reason

    chosen, reason = choose(figures(FP32), {"fp32": 50, "int8": 53})
    assert chosen == "fp32" and "was not 1.1x as fast" in reason


def test_the_fastest_candidate_that_holds_is_chosen():
    worse = {"recall_at_1": 0.50, "top1": 0.70}
    both = {**figures(worse), "bf16": FP32, "bf16_queries_fp32_catalog": FP32}

    chosen, reason = choose(both, {"fp32": 50, "int8": 120, "bf16": 70})

    assert chosen == "bf16" and reason.startswith("bf16 is 1.40x")
    assert choose(both, {"fp32": 50, "int8": 120, "bf16": 40})[1].count("fp32") >= 2  # both refusals said


def test_without_category_figures_the_search_figure_decides():
    base = {"fp32": {"recall_at_1": 0.6, "top1": None}}
    assert choose({**base, "int8": {"recall_at_1": 0.6, "top1": None},
                   "int8_queries_fp32_catalog": {"recall_at_1": 0.6, "top1": None}}, {"fp32": 1, "int8": 2})[0] == "int8"


def test_without_an_evaluation_auto_is_fp32():
    build_catalog(products=6)
    assert serving.get_embedder().precision == "fp32"


def test_the_evaluation_stores_the_decision_per_machine_kind_and_shows_it(staff):
    build_catalog()
    assert staff.post("/api/evaluate/").status_code == 202  # tasks run in-process: evaluation, then the choice

    version = serving_version()
    shown = staff.get(f"/api/models/{version.pk}/").json()["precision"]
    decision = shown[machine_kind()]
    assert decision["chosen"] in ("fp32", *precision_choice.candidates()) and decision["reason"]
    expected_names = {"fp32"} | {f"{name}{suffix}" for name in precision_choice.candidates()
                                 for suffix in ("", "_queries_fp32_catalog")}
    assert set(decision["figures"]) == expected_names and "int8" in expected_names
    assert 0 <= decision["figures"]["int8"]["recall_at_1"] <= 1 and decision["images_per_s"]["int8"] > 0
    expected = choose(decision["figures"], decision["images_per_s"])[0]
    assert decision["chosen"] == expected
    assert serving.get_embedder().precision == expected  # what auto now means in every process


def test_a_chosen_int8_is_calibrated_on_the_catalog_and_serves_search(staff):
    images = build_catalog(products=9)
    version = serving_version()
    serving.write_chosen_precision(version.identity, machine_kind(), "int8")

    model = serving.get_embedder()
    found = staff.post("/api/search/", {"image": images[0].file.open("rb")}, format="multipart")

    assert model.precision == "int8" and model.identity.key == version.identity
    assert found.status_code == 200 and found.json()["results"]


def test_a_precision_set_in_the_settings_is_not_second_guessed(settings):
    build_catalog(products=6)
    settings.EMBED_PRECISION = "fp32"
    assert precision_choice.precision_choose(version_id=serving_version().pk) is None
    assert serving_version().precision == {}


def test_manage_py_evaluate_prints_the_precision_chosen(capsys):
    build_catalog(products=9)
    call_command("evaluate")
    assert "precision on this machine kind:" in capsys.readouterr().out
