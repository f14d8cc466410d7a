"""`./scripts/serve`, the embedded default, as a catalog team meets it (scripts/test, pass 2): an ingest job is
accepted at once and runs in the background worker the script starts, its progress visible while it runs in
the API and the admin; stopping the server stops the worker too."""
import os
import re
import signal
import subprocess
import time

import pytest
import requests

from tests.catalog.ingest_files import make_csv, make_zip
from tests.conftest import REPO_ROOT
from tests.workers.live import crops, free_port

pytestmark = [pytest.mark.worker]

ROWS = 40


@pytest.fixture
def served(tmp_path):
    """scripts/serve in a data directory of its own, on a free port, with nothing of the services' settings."""
    port = free_port()
    env = {key: value for key, value in os.environ.items()
           if key not in ("DATABASE_URL", "CELERY_BROKER_URL", "SECRET_KEY", "VISUALSEARCH_TASKS_EAGER",
                          "DJANGO_SETTINGS_MODULE")}
    env.update({"VISUALSEARCH_DATA_DIR": str(tmp_path / "data"), "VISUALSEARCH_PORT": str(port),
                "VISUALSEARCH_BACKBONE": "efficientnet_lite0", "VISUALSEARCH_WEIGHTS": "imagenet",
                "VISUALSEARCH_EMBED_BATCH": "8", "VISUALSEARCH_INGEST_CHUNK_ROWS": "5"})
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(REPO_ROOT / "scripts/serve")], cwd=REPO_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        try:
            if requests.get(f"{url}/api/health/", timeout=5).status_code == 200:
                break
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(1)
    else:
        pytest.fail("scripts/serve did not answer: " + (tmp_path / "serve.log").read_text()[-3000:])
    yield url, tmp_path / "data", proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def worker_running(data_dir) -> bool:
    listed = subprocess.run(["pgrep", "-f", str(data_dir)], capture_output=True, text=True).stdout.split()
    return any(os.path.exists(f"/proc/{pid}/cmdline") and "celery" in open(f"/proc/{pid}/cmdline").read()
               for pid in listed)


def test_an_ingest_job_is_queued_at_once_and_its_progress_moves_while_the_worker_runs_it(served, photo):
    url, data_dir, proc = served
    password = (data_dir / "admin-password.txt").read_text().strip()
    token = requests.post(f"{url}/api/auth/token/", json={"username": "admin", "password": password},
                          timeout=30).json()["token"]
    staff = {"Authorization": f"Token {token}"}
    names = [f"img/{number}.jpg" for number in range(ROWS)]
    manifest = make_csv([[f"SERVE-{number}", f"Print {number}", name, "prints", "5", ""]
                         for number, name in enumerate(names)])
    archive = make_zip(dict(zip(names, crops(photo, ROWS))))

    started = time.perf_counter()
    accepted = requests.post(f"{url}/api/ingest-jobs/", headers=staff, timeout=30,
                             files={"manifest": ("spring.csv", manifest), "archive": ("images.zip", archive)})
    took = time.perf_counter() - started
    assert accepted.status_code == 202 and accepted.json()["status"] == "queued", accepted.text
    assert took < 2.0, f"the job took {took:.1f} s to be accepted"

    job, seen = accepted.json()["id"], []
    admin = requests.Session()
    admin.get(f"{url}/admin/login/", timeout=30)
    admin.post(f"{url}/admin/login/?next=/admin/", timeout=30, data={
        "username": "admin", "password": password, "csrfmiddlewaretoken": admin.cookies["csrftoken"]})
    admin_seen = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        state = requests.get(f"{url}/api/ingest-jobs/{job}/", headers=staff, timeout=30).json()
        seen.append(state["processed"])
        page = admin.get(f"{url}/admin/catalog/ingestjob/", timeout=30).text
        admin_seen += [int(found) for found in re.findall(r'title="(\d+) of %d rows"' % ROWS, page)]
        if state["status"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert state["status"] == "succeeded" and state["succeeded"] == ROWS, state
    assert any(0 < count < ROWS for count in seen), f"the count never moved while the job ran: {seen}"
    assert any(0 < count < ROWS for count in admin_seen) and admin_seen[-1] == ROWS, admin_seen
    assert "spring.csv" in page

    # Stopping the script (a TERM to it alone, as a service manager sends) stops the background worker too.
    assert worker_running(data_dir)
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(2)
    assert not worker_running(data_dir), "the background worker outlived the server"
