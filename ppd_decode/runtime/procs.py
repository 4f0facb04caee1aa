"""Helper processes that never outlive their driver: what the PPD engine's workers and the stage-load helper share."""

from __future__ import annotations

import os
import threading
import time


def watch_parent(parent: int) -> None:
    """Call in a child process: it exits when the driver is gone (even after a SIGKILL): no orphans."""
    def loop():
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)
    threading.Thread(target=loop, daemon=True).start()


def share_with_spawned(model) -> None:
    """Make ``model`` fit to send to spawned processes: its weights in shared memory (the children read them, not
    copies), and without transformers' output-capture hooks. Those are local functions, which do not pickle, put on a
    model's modules the first time hidden states are asked for; they are removed and the model marked unhooked, so
    that transformers puts them back when they are next needed."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if "output_capturing_hook" in getattr(hook, "__qualname__", ""):
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        if getattr(module, "_output_capturing_hooks_installed", False):
            module._output_capturing_hooks_installed = False
    model.share_memory()


class Managed:
    """``with X(...) as x:`` starts the helper processes and closes them on the way out, or when garbage-collected.
    Subclasses define ``start`` (idempotent) and ``close`` (stops and reaps every process, idempotent)."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
