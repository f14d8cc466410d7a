"""Real Celery worker processes for the worker tests: started on the pytest database and a shared
data directory, killed, and waited on."""
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.db import connection

from catalog import pipeline
from catalog.models import ProductImage
from ml.index import VectorIndex, index_directory
from tests.conftest import REPO_ROOT

REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
               "--save", "", "--appendonly", "no"]


class Workers:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.procs: list[subprocess.Popen] = []
        db = connection.settings_dict
        self.env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "VISUALSEARCH_DATA_DIR": str(data_dir),
            "VISUALSEARCH_BACKBONE": "efficientnet_lite0",
            "VISUALSEARCH_WEIGHTS": "imagenet",
            "VISUALSEARCH_VISIBILITY_TIMEOUT": "8",
            "VISUALSEARCH_STALE_IMAGE_SECONDS": "3",
            "VISUALSEARCH_SWEEP_SECONDS": "2",
            "VISUALSEARCH_EMBED_BATCH": "16",
        }

    def start(self, name: str) -> subprocess.Popen:
        log = open(self.data_dir / f"worker-{name}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "visualsearch", "worker", "-B", "-Q", "embed,index,default",
             "-c", "1", "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel", "INFO",
             "-s", str(self.data_dir / f"beat-{name}")],
            cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.data_dir.glob("worker-*.log")))


def wait_until(predicate, timeout: float, what: str, workers: Workers | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{workers.logs() if workers else ''}")


def indexed_count() -> int:
    return ProductImage.objects.filter(status="indexed").count()


def published_ids() -> list[int]:
    active = pipeline.active_index()
    index = VectorIndex.load(index_directory(pipeline.settings.INDEX_DIR, active["identity"]))
    return [int(i) for i in index.ids()]


def crops(photo, n: int) -> list[bytes]:
    """n distinct real-photo images: crops of scikit-image photos at different offsets."""
    from PIL import Image

    out = []
    names = ["chelsea", "coffee", "rocket", "astronaut"]
    for i in range(n):
        img = Image.open(io.BytesIO(photo(names[i % 4], fmt="PNG")))
        x, y = (i * 7) % 60, (i * 13) % 40
        buf = io.BytesIO()
        img.crop((x, y, x + 224, y + 224)).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out
