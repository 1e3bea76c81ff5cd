"""Progress bars: tqdm's redrawn line on a terminal, plain lines in a log file (CI, `mlflow run`, `2> log`),
where tqdm's carriage returns and cursor escapes are noise: each refresh is one line instead."""

import io
import sys

from tqdm.auto import tqdm as _tqdm


class tqdm(_tqdm):  # noqa: N801 (a drop-in for tqdm.auto.tqdm)
    def __init__(self, *args, **kwargs):
        self._plain = not getattr(kwargs.get("file") or sys.stderr, "isatty", lambda: False)()
        if self._plain:
            kwargs.setdefault("ascii", True)  # "#" rather than Unicode block characters: any log viewer shows it
        super().__init__(*args, **kwargs)

    def status_printer(self, file):
        if not self._plain:
            return _tqdm.status_printer(file)

        def print_line(status: str) -> None:
            if status:  # tqdm clears a bar by printing "": nothing to clear in a log
                file.write(status + "\n")
                file.flush()
        return print_line

    def moveto(self, n: int) -> None:
        if not self._plain:
            super().moveto(n)

    def clear(self, nolock: bool = False) -> None:
        if not self._plain:  # nothing to clear in a log
            super().clear(nolock)

    def close(self) -> None:
        if getattr(self, "_plain", False) and not getattr(self, "disable", True):
            if self.n != getattr(self, "last_print_n", self.n):
                self.refresh()  # the final count, once
            self.sp, self.fp = (lambda status: None), io.StringIO()
        super().close()
