"""A progress bar for management commands: one updating line on a terminal, a line every few seconds in a log."""
import time

BAR_WIDTH = 30
LOG_INTERVAL_S = 5.0


class ProgressBar:
    def __init__(self, stdout) -> None:
        self.stdout = stdout
        self.tty = stdout.isatty()
        self._last_line = 0.0
        self._last_text = ""
        self._latest: tuple[int, int, str] | None = None

    def show(self, done: int, total: int, text: str = "", *, final: bool = False) -> None:
        self._latest = (done, total, text)
        now = time.monotonic()
        if not self.tty and not final and now - self._last_line < LOG_INTERVAL_S:
            return  # a log file gets a line every few seconds, not a stream of carriage returns
        share = done / total if total else (1.0 if final else 0.0)
        filled = round(BAR_WIDTH * min(1.0, share))
        line = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {share:4.0%}  {text}"
        if not self.tty and line == self._last_text:
            return
        self._last_line, self._last_text = now, line
        self.stdout.write(("\r" + line) if self.tty else line, ending="\n" if final or not self.tty else "")
        self.stdout.flush()

    def end(self) -> None:
        """After the last update: its line shown whole (a log may have skipped it), and a new line."""
        if self._latest is not None:
            done, total, text = self._latest
            self.show(done, total, text, final=True)
