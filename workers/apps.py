"""The workers app: registering it registers every task, by name, in any process that loads Django."""
from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "workers"

    def ready(self) -> None:
        from workers import tasks  # noqa: F401  (importing registers the tasks)
