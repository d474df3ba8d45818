"""One behavioural suite, two backends: the in-process simulator and the hypervisor process.

``hv`` (and ``sim`` where a test module parametrises its own fixture with
:data:`both`) yields a :class:`~xend_tmem.hypervisor.interface.Hypervisor`:
``"inprocess"`` a :class:`~xend_tmem.hypervisor.sim.SimHypervisor`,
``"process"`` a :class:`~xend_tmem.hypervisor.client.HypervisorClient` of a
hypervisor process started for the test in a fresh state directory, with the
simulator's defaults (so both give the same answers), stopped and reaped by pid
at teardown.
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from typing import Any, Callable, Iterator, Tuple

import pytest

from xend_tmem.hypervisor.client import HypervisorClient, spawn
from xend_tmem.hypervisor.server import ServeOptions
from xend_tmem.hypervisor.sim import SimHypervisor

BACKENDS = ["inprocess", "process"]
DEFAULT_CAPACITY_MB = (1 << 22) // 256      # SimHypervisor's default tmem_capacity_pages
STOP_TIMEOUT_S = 15.0

# parametrise a test's ``sim`` fixture (or ``new_hv`` factory) over both backends
both = pytest.mark.parametrize("sim", BACKENDS, indirect=True)
both_new = pytest.mark.parametrize("new_hv", BACKENDS, indirect=True)


def start_process(release: str = "4.0.2", trace: bool = False, **kw: Any
                  ) -> Tuple[HypervisorClient, "subprocess.Popen[bytes]", str]:
    """A hypervisor process in a fresh (short) state directory and a client of it."""
    state_dir = tempfile.mkdtemp(prefix="hv-")
    kw.setdefault("capacity_mb", DEFAULT_CAPACITY_MB)
    proc = spawn(ServeOptions(state_dir=state_dir, release=release, trace=trace, **kw))
    return HypervisorClient(state_dir), proc, state_dir


def stop_process(client: HypervisorClient, proc: "subprocess.Popen[bytes]", state_dir: str) -> None:
    """Close the client, SIGTERM the process and reap it by pid (SIGKILL if it hangs)."""
    client.close()
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"hypervisor process {proc.pid} ignored SIGTERM") from None
    shutil.rmtree(state_dir, ignore_errors=True)


def backend(kind: str, **kw: Any) -> Iterator[Any]:
    """Yield a hypervisor of ``kind`` ("inprocess" or "process"); clean up after."""
    if kind == "inprocess":
        sim = SimHypervisor(**({"release": kw["release"]} if "release" in kw else {}))
        try:
            yield sim
        finally:
            if hasattr(sim, "close"):
                sim.close()
        return
    client, proc, state_dir = start_process(**kw)
    try:
        yield client
    finally:
        stop_process(client, proc, state_dir)


@pytest.fixture(params=BACKENDS)
def hv(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh hypervisor of each backend (Xen 4.0.2, the simulator's defaults)."""
    yield from backend(request.param)


@pytest.fixture
def new_hv(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """``new_hv(release="4.0.2")``: as many fresh hypervisors of the parametrised
    backend (default in-process) as a test needs; all cleaned up after it."""
    kind = getattr(request, "param", "inprocess")
    with contextlib.ExitStack() as stack:
        def make(release: str = "4.0.2") -> Any:
            gen = backend(kind, release=release)
            hv = next(gen)
            stack.callback(gen.close)
            return hv
        yield make


def write_tmem_stream(hv: Any, domid: int, out: Any) -> None:
    """A non-live save of ``domid``'s tmem as a ``-5`` chunk into ``out``
    (SAVE_END on every path): the stream the restore tests read back."""
    from xend_tmem.binio import StreamWriter
    from xend_tmem.tmem.save import TmemWriter
    w = StreamWriter(out)
    writer = TmemWriter(hv, domid, live=False)
    writer.begin()
    try:
        writer.write_tmem(w)
        w.flush()
    finally:
        writer.end()


def bulk_source(pages: int, objects: int, seed: int) -> Tuple[SimHypervisor, int]:
    """An in-process simulator holding a suspended domain whose one persistent
    pool has ``pages`` generated pages in ``objects`` objects: a save's source."""
    from xend_tmem.domconfig import parse_domain_config
    hv = SimHypervisor(tmem_version=1)
    domid = hv.create_domain(parse_domain_config({
        "name": "src", "memory": 1, "vcpus": 1,
        "tmem": {"version": 1, "pools": [
            {"id": 0, "persistent": True,
             "bulk": {"pages": pages, "objects": objects, "seed": seed}}]}}))
    hv.suspend(domid)
    return hv, domid
