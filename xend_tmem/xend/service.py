"""What the xend daemon does for ``xm``: every XML-RPC method, and the rules
around save, restore and migration that belong to the toolstack, not the engine.

Those rules are xend's (SPEC §9): domain 0 and domains that are not running are
never saved or migrated; during a save or migration the source is called
``migrating-NAME`` and gets its name back if the operation fails; a second save
or migration of a domain already in one is refused. One addition: a save goes
to a temporary file beside the target and is renamed into place only when
complete, so a failed save leaves no partial image (xend left one).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import socket
import tempfile
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .. import __version__
from ..checkpoint import domain_sxp, restore_domain, save_domain
from ..codec import sxp
from ..config import ToolstackConfig
from ..domconfig import load_domain_config
from ..errors import NoSuchDomain, XendTmemError
from ..plugins import CheckpointHooks
from . import relocation
from .jobs import Job, JobTable
from .rpc import UnixXMLRPCServer

log = logging.getLogger("xend_tmem.xend")

DOM0 = 0
ALL_CLIENTS = -1
MIGRATING_PREFIX = "migrating-"
STATES = ("running", "blocked", "paused", "shutdown", "crashed", "dying")
BLOCKING_WAIT_S = 24 * 3600.0
REPORT_GRACE_S = 1.0         # at stop: time for xm to read how its job ended


class XendError(XendTmemError):
    """A request the daemon refuses: privileged or busy domain, bad argument."""


def _state_flags(info) -> Dict[str, bool]:
    return {s: bool(getattr(info, s, False)) for s in STATES}


def _is_running(info) -> bool:
    f = _state_flags(info)
    return not (f["paused"] or f["shutdown"] or f["crashed"] or f["dying"])


class _KeepName:
    """The hypervisor as the save path sees it while the source is ``migrating-NAME``.

    xend took the domain's config for the image *before* renaming it, so the
    image (and a migration's pre-flight offer) carry the real name; this view
    reports the real name for that one domain and passes everything else through.
    """

    def __init__(self, hv: Any, domid: int, name: str) -> None:
        self._hv = hv
        self._domid = domid
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._hv, attr)

    def domain_info(self, domid: int) -> Any:
        info = self._hv.domain_info(domid)
        if domid != self._domid:
            return info
        config = dict(info.config or {})
        config["name"] = self._name
        return dataclasses.replace(info, name=self._name, config=config)


class XendService:
    """The daemon's state: hypervisor, plugin hooks, jobs, busy domains."""

    def __init__(self, config: ToolstackConfig, hv: Any, hooks: CheckpointHooks,
                 plugin_errors: Sequence[str] = ()) -> None:
        self.config = config
        self.hv = hv
        self.hooks = hooks
        self.plugin_errors = list(plugin_errors)
        self.jobs = JobTable()
        self.relocation_servers: List[relocation.RelocationServer] = []
        self._lock = threading.RLock()
        self._busy: Dict[int, str] = {}
        self._stopping = threading.Event()

    # -- registration ---------------------------------------------------------
    def methods(self) -> Dict[str, Callable[..., Any]]:
        """XML-RPC method name -> implementation (xend's names where xend had one)."""
        return {
            "xend.domain.create": self.domain_create,
            "xend.domain.destroy": self.domain_destroy,
            "xend.domain.pause": self.domain_pause,
            "xend.domain.unpause": self.domain_unpause,
            "xend.domain": self.domain,
            "xend.domains_with_state": self.domains_with_state,
            "xend.domain.save": self.domain_save,
            "xend.domain.restore": self.domain_restore,
            "xend.domain.migrate": self.domain_migrate,
            "xend.job.save": self.job_save,
            "xend.job.restore": self.job_restore,
            "xend.job.migrate": self.job_migrate,
            "xend.job.status": self.job_status,
            "xend.job.cancel": self.job_cancel,
            "xend.node.info": self.node_info,
            "xend.node.tmem_list": self.tmem_list,
            "xend.node.tmem_freeze": self.tmem_freeze,
            "xend.node.tmem_thaw": self.tmem_thaw,
            "xend.node.tmem_flush": self.tmem_flush,
            "xend.node.tmem_destroy": self.tmem_destroy,
            "xend.node.tmem_set_weight": self.tmem_set_weight,
            "xend.node.tmem_set_cap": self.tmem_set_cap,
            "xend.node.tmem_set_compress": self.tmem_set_compress,
            "xend.node.tmem_query_freeable_mb": self.tmem_query_freeable_mb,
        }

    def register(self, server: UnixXMLRPCServer) -> None:
        for name, fn in self.methods().items():
            server.register_function(fn, name)

    # -- helpers --------------------------------------------------------------
    def domid(self, dom: Any) -> int:
        """A domain id from an id or a name (xm accepts both everywhere)."""
        if isinstance(dom, bool) or dom is None:
            raise NoSuchDomain(dom)
        if isinstance(dom, int):
            return self.hv.lookup(dom)
        text = str(dom).strip()
        if text.lstrip("-").isdigit():
            return self.hv.lookup(int(text))
        return self.hv.lookup(text)

    def _name_in_use(self, name: str) -> Optional[int]:
        for info in self.hv.list_domains():
            if info.name == name:
                return info.domid
        return None

    def _refuse_privileged(self, domid: int, what: str) -> None:
        if domid == DOM0:
            raise XendError(f"Cannot {what} privileged domain {DOM0}")

    def _refuse_busy(self, domid: int, what: str) -> None:
        with self._lock:
            op = self._busy.get(domid)
        if op is not None:
            name = self.hv.domain_info(domid).name
            raise XendError(f"Cannot {what} domain {name}: it is being {op}")

    def _claim(self, domid: int, op: str) -> None:
        self._refuse_when_stopping()
        with self._lock:
            if domid in self._busy:
                name = self.hv.domain_info(domid).name
                raise XendError(f"Domain {name} is already being {self._busy[domid]}")
            self._busy[domid] = op

    def _refuse_when_stopping(self) -> None:
        if self._stopping.is_set():
            raise XendError("xend is shutting down")

    def _release(self, domid: int) -> None:
        with self._lock:
            self._busy.pop(domid, None)

    def _check_can_checkpoint(self, domid: int, what: str) -> Any:
        self._refuse_privileged(domid, what)
        self._refuse_busy(domid, what)
        info = self.hv.domain_info(domid)
        if not _is_running(info):
            raise XendError(f"Cannot {what} domain {info.name}: it is not running "
                            f"(state {info.state})")
        return info

    def _rename(self, domid: int, name: str) -> None:
        try:
            self.hv.rename_domain(domid, name)
        except NoSuchDomain:
            pass
        except XendTmemError as exc:
            log.error("could not rename domain %d to %s: %s", domid, name, exc)

    def _destroy_source(self, domid: int, name: str) -> None:
        try:
            self.hv.destroy_domain(domid)
        except XendTmemError as exc:
            log.error("domain %s (%d) was saved but could not be destroyed: %s", name, domid, exc)

    # -- domains --------------------------------------------------------------
    def domain_create(self, path: str) -> Dict[str, Any]:
        """Build a simulated domain from a domain YAML file (``xm create``)."""
        if not isinstance(path, str) or not os.path.isabs(path):
            raise XendError(f"domain config path must be absolute, got {path!r}")
        cfg = load_domain_config(path)
        with self._lock:
            other = self._name_in_use(cfg.name)
            if other is not None:
                raise XendError(f"Domain '{cfg.name}' already exists with ID '{other}'")
            domid = self.hv.create_domain(cfg)
        log.info("created domain %s (%d) from %s", cfg.name, domid, path)
        return {"domid": domid, "name": cfg.name}

    def domain_destroy(self, dom: Any) -> bool:
        domid = self.domid(dom)
        self._refuse_privileged(domid, "destroy")
        self._refuse_busy(domid, "destroy")
        self.hv.destroy_domain(domid)
        log.info("destroyed domain %s", dom)
        return True

    def domain_pause(self, dom: Any) -> bool:
        domid = self.domid(dom)
        self._refuse_privileged(domid, "pause")
        self._refuse_busy(domid, "pause")
        self.hv.pause(domid)
        return True

    def domain_unpause(self, dom: Any) -> bool:
        domid = self.domid(dom)
        self._refuse_privileged(domid, "unpause")
        self._refuse_busy(domid, "unpause")
        self.hv.unpause(domid)
        return True

    def _describe(self, info, detail: bool) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "domid": info.domid, "name": info.name, "memory": info.memory_mib,
            "vcpus": info.vcpus, "state": info.state, "cpu_time": float(info.cpu_time),
        }
        if detail:
            config = {"domid": info.domid, "name": info.name, **(info.config or {})}
            config.update({"name": info.name, "state": info.state,
                           "cpu_time": f"{info.cpu_time:.1f}"})
            try:
                form = sxp.from_mapping("domain", config)
            except XendTmemError:
                form = sxp.parse(domain_sxp(info))
            out["sxp"] = sxp.to_string(form, pretty=True)
        return out

    def domain(self, dom: Any) -> Dict[str, Any]:
        """One domain's description with its SXP (``xm list DOM``)."""
        return self._describe(self.hv.domain_info(self.domid(dom)), True)

    def domains_with_state(self, detail: bool = False, state: str = "all",
                           full: bool = False) -> List[Dict[str, Any]]:
        """Every domain, optionally only those with ``state`` set (xend's signature)."""
        state = (state or "all").lower()
        if state != "all" and state not in STATES:
            raise XendError(f"Invalid state {state!r} (expected all, {', '.join(STATES)})")
        infos = self.hv.list_domains()
        if state != "all":
            infos = [i for i in infos if _state_flags(i)[state]]
        return [self._describe(i, bool(detail)) for i in sorted(infos, key=lambda i: i.name)]

    # -- save -----------------------------------------------------------------
    def job_save(self, dom: Any, path: str, checkpoint: bool = False) -> int:
        """Start ``xm save``; returns the job id. Refusals come back at once."""
        if not isinstance(path, str) or not os.path.isabs(path):
            raise XendError(f"save path must be absolute, got {path!r}")
        if os.path.isdir(path):
            raise XendError(f"Unable to create file {path}: it is a directory")
        domid = self.domid(dom)
        info = self._check_can_checkpoint(domid, "save")
        name = info.name
        self._claim(domid, "saved")
        try:
            directory, base = os.path.split(path)
            try:
                fd, tmp = tempfile.mkstemp(dir=directory or ".", prefix=f".{base}.",
                                           suffix=".part")
            except OSError as exc:
                raise XendError(f"Unable to create file {path}: {exc.strerror or exc}") from None
        except BaseException:
            self._release(domid)
            raise
        out = os.fdopen(fd, "wb", buffering=0)

        def work(job: Job) -> Dict[str, Any]:
            renamed = False
            saved = False
            try:
                if not checkpoint:
                    self.hv.rename_domain(domid, MIGRATING_PREFIX + name)
                    renamed = True
                # xend saved non-live, checkpoint or not: the guest is suspended throughout
                report = save_domain(_KeepName(self.hv, domid, name), domid, out,
                                     hooks=self.hooks, live=False,
                                     checkpoint=bool(checkpoint), progress=job.progress,
                                     cancel=job.cancel)
                saved = True
                os.fsync(out.fileno())
                out.close()
                os.replace(tmp, path)
            except BaseException:
                out.close()
                _unlink(tmp)
                if saved and not checkpoint:
                    self.hv.resume(domid)      # saved but not kept: run it again
                if renamed:
                    self._rename(domid, name)
                raise
            if not checkpoint:
                self._destroy_source(domid, name)
            log.info("saved domain %s (%d) to %s%s", name, domid, path,
                     " (checkpoint)" if checkpoint else "")
            return {"op": "save", "domain": name, "domid": domid, "path": path,
                    "checkpoint": bool(checkpoint), **report}

        try:
            return self.jobs.start("save", name, work, cleanup=lambda: self._release(domid)).id
        except BaseException:
            out.close()
            _unlink(tmp)
            raise

    # -- restore --------------------------------------------------------------
    def job_restore(self, path: str, paused: bool = False) -> int:
        self._refuse_when_stopping()
        if not isinstance(path, str) or not os.path.isabs(path):
            raise XendError(f"restore path must be absolute, got {path!r}")
        try:
            inp = open(path, "rb")
        except OSError as exc:
            raise XendError(f"Unable to read file {path}: {exc.strerror or exc}") from None

        def work(job: Job) -> Dict[str, Any]:
            with inp:
                domid, report = restore_domain(self.hv, inp, hooks=self.hooks, paused=bool(paused),
                                               progress=job.progress, cancel=job.cancel)
            name = report.get("name") or self.hv.domain_info(domid).name
            log.info("restored domain %s (%d) from %s", name, domid, path)
            return {"op": "restore", "domain": name, "path": path, "paused": bool(paused),
                    **report, "domid": domid}

        try:
            return self.jobs.start("restore", os.path.basename(path), work).id
        except BaseException:
            inp.close()
            raise

    # -- migrate --------------------------------------------------------------
    def job_migrate(self, dom: Any, dst: str, live: bool = False, port: int = 0,
                    node: int = -1, ssl: Optional[bool] = None,
                    change_home_server: bool = False) -> int:
        """Start ``xm migrate``. ``port`` 0 means the configured relocation port;
        ``ssl`` None means the configuration's ``xend-relocation-ssl``.
        ``change_home_server`` concerns xend's managed (XenAPI) domains; this
        toolstack has none, so it changes nothing."""
        if not isinstance(dst, str) or not dst:
            raise XendError("migrate needs a destination host")
        use_ssl = self.config.relocation_ssl if ssl is None else bool(ssl)
        try:
            port = int(port or 0)
            node = int(-1 if node is None else node)
        except (TypeError, ValueError):
            raise XendError(f"bad port {port!r} or node {node!r}") from None
        if not 0 <= port <= 65535:
            raise XendError(f"bad port {port}")
        if port == 0:
            port = self.config.relocation_ssl_port if use_ssl else self.config.relocation_port
        domid = self.domid(dom)
        info = self._check_can_checkpoint(domid, "migrate")
        name = info.name
        self._claim(domid, "migrated")

        def work(job: Job) -> Dict[str, Any]:
            renamed = []

            def accepted() -> None:
                self.hv.rename_domain(domid, MIGRATING_PREFIX + name)
                renamed.append(True)

            try:
                report = relocation.migrate(_KeepName(self.hv, domid, name), domid, dst, port,
                                            live=bool(live),
                                            hooks=self.hooks, node=node, use_ssl=use_ssl,
                                            progress=job.progress, cancel=job.cancel,
                                            on_accepted=accepted)
            except BaseException:
                if renamed:
                    self._rename(domid, name)
                raise
            self._destroy_source(domid, name)
            log.info("migrated domain %s (%d) to %s:%d", name, domid, dst, port)
            return {"op": "migrate", "domain": name, "domid": domid, "host": dst, "port": port,
                    "ssl": use_ssl, **report}

        return self.jobs.start("migrate", name, work, cleanup=lambda: self._release(domid)).id

    # -- jobs -----------------------------------------------------------------
    def job_status(self, job_id: int) -> Dict[str, Any]:
        return self.jobs.get(job_id).status()

    def job_cancel(self, job_id: int) -> bool:
        job = self.jobs.get(job_id)
        job.cancel.set()
        return job.finished is None

    def _wait(self, job_id: int) -> Dict[str, Any]:
        job = self.jobs.get(job_id)
        job.finished_event.wait(BLOCKING_WAIT_S)
        job.reported.set()
        if job.result is None:
            from xmlrpc.client import Fault
            raise Fault(job.fault_code or 1, job.error or "operation did not finish")
        return job.result

    def domain_save(self, dom: Any, path: str, checkpoint: bool = False) -> Dict[str, Any]:
        """xend's blocking ``xend.domain.save``."""
        return self._wait(self.job_save(dom, path, checkpoint))

    def domain_restore(self, path: str, paused: bool = False) -> Dict[str, Any]:
        return self._wait(self.job_restore(path, paused))

    def domain_migrate(self, dom: Any, dst: str, live: bool = False, port: int = 0,
                       node: int = -1, ssl: Optional[bool] = None,
                       change_home_server: bool = False) -> Dict[str, Any]:
        return self._wait(self.job_migrate(dom, dst, live, port, node, ssl, change_home_server))

    # -- relocation server callbacks --------------------------------------------
    def incoming_restore(self, stream, peer: str) -> Tuple[int, Dict[str, Any]]:
        domid, report = restore_domain(self.hv, stream, hooks=self.hooks, cancel=self._stopping)
        log.info("domain %s (%d) arrived from %s", report.get("name"), domid, peer)
        return domid, report

    def check_offer(self, offer: Dict[str, Any]) -> List[str]:
        """The pre-flight answer: reasons this host cannot take the domain."""
        reasons: List[str] = []
        plugins = offer.get("plugins")
        plugins = {} if plugins is None else plugins
        if not isinstance(plugins, dict):
            return ["malformed pre-flight offer"]
        enabled = set(self.hooks.enabled)
        for pname in sorted(plugins):
            if plugins[pname] and pname not in enabled:
                reasons.append(f"the domain carries {pname} state but checkpoint plugin "
                               f"'{pname}' is not enabled on this host")
        reasons.extend(self.hooks.migrate_check(self.hv, {k: v for k, v in plugins.items()
                                                          if k in enabled}))
        node = offer.get("node", -1)
        if node not in (-1, 0, None):
            reasons.append(f"no NUMA node {node} on this host (it has node 0 only)")
        domain = offer.get("domain") or {}
        name = domain.get("name") if isinstance(domain, dict) else None
        if isinstance(name, str):
            other = self._name_in_use(name)
            if other is not None:
                reasons.append(f"a domain named {name} already exists here (id {other})")
        return reasons

    def discard_domain(self, domid: int) -> None:
        try:
            self.hv.destroy_domain(domid)
        except XendTmemError as exc:
            log.error("could not remove domain %d: %s", domid, exc)

    # -- node -----------------------------------------------------------------
    def node_info(self) -> List[List[Any]]:
        """``xm info``: ordered (key, value) pairs."""
        hv = self.hv
        rel = [f"{s.address or '*'}:{s.port}" + (" (ssl)" if s.ssl_context else "")
               for s in self.relocation_servers]
        pairs: List[Tuple[str, Any]] = [
            ("host", socket.gethostname()),
            ("release", platform.release()),
            ("machine", platform.machine()),
            ("hypervisor", self.config.hypervisor.backend),
            ("nr_domains", len(hv.list_domains())),
            ("tmem_spec_version", hv.tmem_version()),
            ("tmem_capacity_mb", self.config.hypervisor.tmem_capacity_mb),
            ("tmem_free_mb", hv.tmem_free_pages() * 4096 // (1 << 20)),
            ("tmem_freeable_mb", hv.query_freeable_mb()),
            ("checkpoint_plugins", " ".join(self.hooks.enabled) or "(none)"),
        ]
        if self.plugin_errors:
            pairs.append(("checkpoint_plugin_errors", "; ".join(self.plugin_errors)))
        pairs += [
            ("xend_version", __version__),
            ("xend_config_file", self.config.path or "(defaults)"),
            ("xend_unix_socket", self.config.unix_socket),
            ("xend_relocation_server", ", ".join(rel) or "off"),
            ("xend_jobs_running", len(self.jobs.running())),
        ]
        return [[k, v] for k, v in pairs]

    # -- tmem (xend.node.tmem_*; -1 means every domain with tmem) ---------------
    def _tmem_targets(self, dom: Any, what: str) -> List[int]:
        """``[-1]`` (Xen's "every client") for -a, else the one domain if not busy."""
        if dom in (-1, "-1"):
            return [ALL_CLIENTS]
        domid = self.domid(dom)
        self._refuse_busy(domid, what)
        return [domid]

    def tmem_list(self, dom: Any = -1, long: bool = False) -> str:
        target = None if dom in (-1, "-1", None) else self.domid(dom)
        return self.hv.tmem_list(target, bool(long))

    def tmem_freeze(self, dom: Any) -> bool:
        for domid in self._tmem_targets(dom, "freeze the tmem of"):
            self.hv.freeze(domid)
        return True

    def tmem_thaw(self, dom: Any) -> bool:
        for domid in self._tmem_targets(dom, "thaw the tmem of"):
            self.hv.thaw(domid)
        return True

    def tmem_flush(self, dom: Any, pages: int = -1) -> int:
        flushed = 0
        for domid in self._tmem_targets(dom, "flush the tmem of"):
            flushed += int(self.hv.flush(domid, int(pages)) or 0)
        return flushed

    def tmem_destroy(self, dom: Any) -> bool:
        for domid in self._tmem_targets(dom, "destroy the tmem of"):
            self.hv.destroy(domid)
        return True

    def tmem_set_weight(self, dom: Any, weight: int) -> bool:
        return self._tmem_set(dom, self.hv.set_weight, _u32(weight, "weight"))

    def tmem_set_cap(self, dom: Any, cap: int) -> bool:
        return self._tmem_set(dom, self.hv.set_cap, _u32(cap, "cap"))

    def tmem_set_compress(self, dom: Any, compress: int) -> bool:
        return self._tmem_set(dom, self.hv.set_compress, bool(_u32(compress, "compress")))

    def _tmem_set(self, dom: Any, op: Callable[[int, Any], None], value: Any) -> bool:
        for domid in self._tmem_targets(dom, "change the tmem of"):
            op(domid, value)
        return True

    def tmem_query_freeable_mb(self) -> int:
        return int(self.hv.query_freeable_mb())

    # -- lifecycle --------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> None:
        """Cancel running jobs and incoming restores, and wait for them."""
        self._stopping.set()
        self.jobs.cancel_all()
        for server in self.relocation_servers:
            server.stop(timeout)
        if not self.jobs.wait_all(timeout, reported_within=REPORT_GRACE_S):
            log.error("some jobs did not stop within %.0f s", timeout)


def _u32(value: Any, what: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise XendError(f"{what} must be a number, got {value!r}") from None
    if not 0 <= n <= 0xFFFFFFFF:
        raise XendError(f"{what} must be 0..4294967295, got {n}")
    return n


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["XendService", "XendError", "MIGRATING_PREFIX"]
