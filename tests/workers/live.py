"""Real Celery worker processes for the worker tests: started on the pytest database and a shared
data directory, killed, and waited on; the web app under gunicorn; and private Redis and PostgreSQL
servers that a fault test may stop and restart without touching the machine's own."""
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from django.conf import settings
from django.db import connection

from catalog import serving
from catalog.models import ProductImage
from ml.index_store import index_directory, load_index
from tests.conftest import REPO_ROOT


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
            [sys.executable, "-m", "celery", "-A", "visualsearch", "worker", "-B", "-Q", "embed,index,compact,train,default",
             "-c", "1", "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel", "INFO",
             "-s", str(self.data_dir / f"beat-{name}")],
            cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def serve(self) -> str:
        """The web app under gunicorn with the workers' environment, on a free port; returns its base URL."""
        import requests

        port = free_port()
        log = open(self.data_dir / "web.log", "w")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "visualsearch.wsgi:application", "--bind", f"127.0.0.1:{port}",
             "--workers", "1", "--threads", "4", "--timeout", "60"],
            cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return requests.get(f"{url}/api/health/", timeout=5).status_code in (200, 503)
            except (requests.ConnectionError, requests.Timeout):
                return False

        wait_until(answers, 60, "the web app to answer", self)
        return url

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
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.data_dir.glob("*.log")))


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
    active = serving.active_index()
    index = load_index(index_directory(settings.INDEX_DIR, active["identity"]))
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of the test's own on a free port, keeping nothing on disk like the deployment's."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = log_dir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        wait_until(self.answers, 10, f"Redis on port {self.port} to start")

    def answers(self) -> bool:
        ping = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True)
        return ping.stdout.strip() == b"PONG"

    def stop(self) -> None:
        """Shut it down; with no persistence whatever it held (queued tasks) is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own: initdb into a temporary directory, served on a free port.

    As root (CI), the server runs as the `postgres` user, which initdb and postgres require.
    """

    def __init__(self):
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
        self.bin = versions[-1].parent if versions else Path(shutil.which("initdb") or "initdb").parent
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="visualsearch-pg-"))
        self.data = self.root / "data"
        self.as_owner: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.as_owner, str(self.bin / tool), *args], capture_output=True, text=True)
        if done.returncode:
            raise AssertionError(f"{tool} {' '.join(args)} failed:\n{done.stdout}{done.stderr}")

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                   "-c fsync=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """fast: the server ends every session and shuts down cleanly (what a restart does); immediate: a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def create_database(self, name: str) -> None:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)

    def destroy(self) -> None:
        subprocess.run([*self.as_owner, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
