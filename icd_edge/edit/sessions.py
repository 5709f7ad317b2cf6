"""The sessions an Editor holds, under one of three memory policies.

``resident``: every graph stays loaded once used (fastest for many edits). ``sequential``: one
graph at a time (the TAESD preview decoder aside), the forward UNet released after an inversion
(lowest peak memory). ``shared-base``: resident UNets that map the teacher's weights once (bundles
exported with ``--unet-weights shared-base``). What a policy means inside a backend (e.g. no
planned buffer reuse) is the backend's business: the pool tells it the policy once.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np

from icd_edge.errors import BundleError, EditorClosed, NumericsError

MEMORY_POLICIES = ("resident", "sequential", "shared-base")
ALWAYS_KEPT = ("taesd_decoder",)  # 1.2 MB, decodes a preview after every step: never released


class SessionPool:
    """Opens a backend's sessions lazily, keeps them per the policy, times and checks each run.

    Thread-safe: sessions are created under a lock, runs are independent."""

    def __init__(self, bundle, backend, memory: str = "resident"):
        self.bundle, self.backend, self.memory = bundle, backend, memory
        self.profile: list[tuple[str, float]] | None = None  # set to [] to record (stage, ms)
        self._sessions: dict = {}
        self._closed = False
        self._lock = threading.RLock()  # re-entered by get → _release_others

    # ------------------------------------------------------------------ sessions
    def get(self, graph: str):
        """The open session of ``graph`` (opened now if needed)."""
        with self._lock:
            if self._closed:
                raise EditorClosed("this Editor was closed; open a new one with Editor.open(bundle)")
            if graph not in self._sessions and self.memory == "sequential" and graph not in ALWAYS_KEPT:
                # one graph at a time: the peak is the largest graph plus its activations, not a sum
                self.release_others(graph)
            if graph not in self._sessions:
                with self.timed(f"load:{graph}"):
                    try:
                        self._sessions[graph] = self.backend.open_session(self.bundle, graph)
                    except OSError as exc:  # reading or memory-mapping the graph's files
                        from icd_edge.atomic import describe_os_error

                        raise BundleError(
                            f"cannot load graph {graph} from {self.bundle.root}: {describe_os_error(exc)}"
                        ) from None
            return self._sessions[graph]

    def loaded(self) -> tuple[str, ...]:
        """The graphs whose sessions are open, in the order they were opened."""
        with self._lock:
            return tuple(self._sessions)

    def run(self, graph: str, stage: str, **feeds) -> dict[str, np.ndarray]:
        sess = self.get(graph)
        with self.timed(stage):
            out = sess.run(feeds)
        for name, value in out.items():  # one bad value would propagate through every later step
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                ran = self.backend.backend_for(graph) if hasattr(self.backend, "backend_for") else self.backend
                raise NumericsError(
                    f"{graph} returned NaN or infinity in {name!r} on the {ran.name} backend "
                    f"({stage}); a reduced precision overflowed: use an fp32 bundle, or "
                    f"--ov-precision fp32 on openvino"
                )
        return out

    def release_others(self, graph: str) -> None:
        """Close every session but ``graph``'s and the always-kept ones."""
        with self._lock:
            for other in [g for g in self._sessions if g != graph and g not in ALWAYS_KEPT]:
                self._sessions.pop(other).close()

    def release(self, graph: str) -> None:
        """Close one graph's session (it reopens on next use)."""
        with self._lock:
            sess = self._sessions.pop(graph, None)
        if sess is not None:
            sess.close()

    def after_invert(self) -> None:
        if self.memory == "sequential":
            self.release("unet_forward")

    def before_final_decode(self, graph: str) -> None:
        if self.memory == "sequential":
            self.release_others(graph)  # a final decode: the UNets are done

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for s in self._sessions.values():
                s.close()
            self._sessions.clear()

    @contextlib.contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        yield
        if self.profile is not None:
            self.profile.append((stage, (time.perf_counter() - t0) * 1000.0))
