"""The served model, replaced without a restart: `reload()` (on SIGHUP in serve) loads the model
file again and swaps it in once loaded; until then, and for good when the load fails, the old one
serves. A request reads with the model it started with, so a swap fails none."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

from pipeline.read.recognizer import Recognizer

log = logging.getLogger("captcha-crnn.serve")


class LiveModel:
    def __init__(self, recognizer: Recognizer, load: Callable[[], Recognizer] | None = None):
        self.current = recognizer
        self._load = load
        self._lock = threading.Lock()  # one load at a time
        self._wanted = threading.Event()
        self.reloads = 0
        self.last_error: str | None = None

    def reload(self) -> bool:
        """Load the model file again; True when the new model serves now."""
        if self._load is None:
            return False
        with self._lock:
            try:
                new = self._load()
            except Exception as e:  # noqa: BLE001 - a half-written or foreign file: keep serving the old model
                self.last_error = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                log.warning("reload failed, still serving %s: %s", self.current.model_sha256[:12], self.last_error)
                return False
            old, self.current = self.current, new
            self.reloads += 1
            self.last_error = None
        log.info("reloaded: serving %s (was %s)", new.model_sha256[:12], old.model_sha256[:12])
        return True

    def reload_on(self, signum: int = signal.SIGHUP) -> None:
        """Reload in a thread of its own whenever this process gets `signum` (main thread only)."""
        def reloader():
            while True:
                self._wanted.wait()
                self._wanted.clear()
                self.reload()

        threading.Thread(target=reloader, daemon=True, name="model-reloader").start()
        signal.signal(signum, lambda *_: self.request_reload())

    def request_reload(self) -> None:
        """Have the reloader thread (`reload_on`) load the model file again."""
        self._wanted.set()

    def health(self) -> dict:
        return {"model_sha256": self.current.model_sha256, "reloads": self.reloads,
                **({"reload_error": self.last_error} if self.last_error else {})}
