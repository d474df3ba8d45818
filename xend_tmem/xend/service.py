"""What the xend daemon does for ``xm``: every XML-RPC method, and the rules
around save, restore and migration that belong to the toolstack, not the engine.

Those rules are xend's (SPEC §9): domain 0 and domains that are not running are
never saved or migrated; during a save or migration the source is called
``migrating-NAME`` and gets its name back if the operation fails; a second save
or migration of a domain already in one is refused. Additions: a save to a
regular file goes to a temporary file beside the target (beside what a symlink
names) and is renamed into place only when complete, with the old file's mode,
so a failed save leaves no partial image (xend left one); a FIFO or device is
written through. While a domain is saved, restored or migrated (on either
host) no tmem command changes it, and an ``-a`` one is refused naming it.

Every save, restore and migration is journaled (:mod:`.journal`) phase by
phase; :meth:`XendService.recover` (at ``xend start``) ends what a killed xend
left in flight: a source is resumed with its tmem thawed and its name back, a
half-restored domain is destroyed, a partial image removed, and a migration
whose ``go`` may have gone out is settled by asking the destination.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import re
import stat
import platform
import socket
import threading
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .. import __version__
from .. import integrity
from ..binio import DropBehind, Source
from ..checkpoint import domain_sxp, restore_domain, save_domain
from ..codec import sxp
from ..config import ToolstackConfig
from ..domconfig import WORKLOAD_KEYS, load_domain_config, parse_domain_config, workload_from_image
from ..errors import ConfigError, HypervisorError, NoSuchDomain, XendTmemError
from ..hypervisor.interface import DomainInfo, Hypervisor
from ..plugins import CheckpointHooks, get_plugin_manager
from ..xen import ALL_CLIENTS, DOM0, PAGE_SIZE, SHUTDOWN_REASONS
from . import journal as jrn
from .relocation import client as relocation_client
from .relocation import protocol as relocation_protocol
from .relocation.server import RelocationServer
from .jobs import Job, JobTable
from .progress import report_lines
from .rpcserver import UnixXMLRPCServer

log = logging.getLogger("xend_tmem.xend")

MIGRATING_PREFIX = "migrating-"
STATES = ("running", "blocked", "paused", "shutdown", "crashed", "dying")
BLOCKING_WAIT_S = 24 * 3600.0
REPORT_GRACE_S = 1.0         # at stop: time for xm to read how its job ended
RECOVERY_QUERY_WINDOW_S = 10.0   # xend start: how long to try a destination that is down
IN_DOUBT_RETRY_S = relocation_protocol.timeout_from_env("XEND_TMEM_TEST_IN_DOUBT_RETRY_S", 30.0)
OVERHEAD_SAMPLES = 5          # migrations whose fixed handover cost the next estimate uses


class XendError(XendTmemError):
    """A request the daemon refuses: privileged or busy domain, bad argument."""


def _state_flags(info: DomainInfo) -> Dict[str, bool]:
    return {s: bool(getattr(info, s, False)) for s in STATES}


def _is_running(info: DomainInfo) -> bool:
    f = _state_flags(info)
    return not (f["paused"] or f["shutdown"] or f["crashed"] or f["dying"])


def _config_mapping(path: str) -> Dict[str, Any]:
    """The domain YAML file as the mapping ``create_domain`` builds the domain from
    (already validated by :func:`load_domain_config`)."""
    from ..yamlfile import parse_yaml
    with open(path, "rb") as f:
        return dict(parse_yaml(f.read(), path))


class XendService:
    """The daemon's state: hypervisor, plugin hooks, jobs, busy domains."""

    def __init__(self, config: ToolstackConfig, hv: Hypervisor, hooks: CheckpointHooks,
                 plugin_errors: Sequence[str] = (), journal: Optional[jrn.Journal] = None) -> None:
        self.config = config
        self.hv = hv
        self.hooks = hooks
        self.plugin_errors = list(plugin_errors)
        self.journal = journal if journal is not None else jrn.Journal(config.state_dir)
        self.jobs = JobTable()
        self._relocation_servers: List[RelocationServer] = []
        self._lock = threading.RLock()
        self._busy: Dict[int, str] = {}
        # restores whose domain does not exist yet: token -> what, so an -a
        # tmem command cannot reach the domain the moment it is created
        self._starting: Dict[object, str] = {}
        self._stopping = threading.Event()
        self.recovered: List[str] = []          # what recover() ended, for xm info
        self._doubt_thread: Optional[threading.Thread] = None
        self.query_window = relocation_client.QUERY_WINDOW_S   # a job asking its destination
        self.ack_timeout = relocation_client.ACK_TIMEOUT_S
        self._outgoing: Dict[int, Tuple[int, str]] = {}  # migrate job id -> (domid, name)
        # destination -> the last migrations' suspend -> running cost beyond the
        # image and the destination's restore (the last bytes' transit, the
        # handshake): the next estimate's fixed overhead is the least of them
        # (a descheduled process only ever adds to a fixed cost)
        self._overhead_ms: Dict[Tuple[str, int], List[float]] = {}

    @property
    def relocation_servers(self) -> List[RelocationServer]:
        return self._relocation_servers

    @relocation_servers.setter
    def relocation_servers(self, servers: List[RelocationServer]) -> None:
        """The daemon hands over its servers; they start domains and journal through us."""
        for server in servers:
            server.bind(unpause=self.incoming_started, journal=self.journal, hv=self.hv)
        self._relocation_servers = list(servers)

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
            "xend.job.migrate_cancel": self.job_migrate_cancel,
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
            "xend_tmem.identify": self.identify,
            **self.xm_methods(),
        }

    def register(self, server: UnixXMLRPCServer) -> None:
        for name, fn in self.methods().items():
            server.register_function(fn, name)

    # -- helpers --------------------------------------------------------------
    def domid(self, dom: Any) -> int:
        """A domain id from an id or a name (xm accepts both everywhere)."""
        if isinstance(dom, bool) or dom is None:
            raise NoSuchDomain(dom)
        text = str(dom).strip()
        domains = self.hv.list_domains()
        if isinstance(dom, int) or text.lstrip("-").isdigit():
            found = [d.domid for d in domains if d.domid == int(text)]
        else:
            found = [d.domid for d in domains if d.name == text]
        if not found:
            raise NoSuchDomain(dom)
        return found[0]

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
            name = self._busy_name(domid)
            raise XendError(f"Cannot {what} domain {name}: it is being {op}; try again once "
                            "that has finished (xm list shows it)")

    def _busy_name(self, domid: int) -> str:
        try:
            return self.hv.domain_info(domid).name
        except NoSuchDomain:
            return f"({domid})"

    def _refuse_any_busy(self, what: str) -> None:
        """``-a``: refused while any domain is in a save, restore or migration,
        on either side, naming them (Xen's "every client" would reach them)."""
        with self._lock:
            busy = sorted(self._busy.items())
            starting = list(self._starting.values())
        if not busy and not starting:
            return
        parts = [f"domain {self._busy_name(d)} is being {op}" for d, op in busy] + starting
        raise XendError(f"Cannot {what} every domain: {'; '.join(parts)}; name the domains "
                        "to change, or try again once that has finished")

    def _claim_new(self, domid: int, op: str, token: object) -> None:
        """A restore's domain was just created: busy from now on."""
        with self._lock:
            self._starting.pop(token, None)
            self._busy[domid] = op

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
        return self._create(load_domain_config(path), _config_mapping(path), path)

    def _create(self, cfg: Any, mapping: Dict[str, Any], source: str) -> Dict[str, Any]:
        """Create the domain ``cfg`` (parsed from ``mapping``) unless its name is taken."""
        with self._lock:
            other = self._name_in_use(cfg.name)
            if other is not None:
                raise XendError(f"Domain '{cfg.name}' already exists with ID '{other}'")
            domid = self.hv.create_domain(mapping)
        log.info("created domain %s (%d) from %s", cfg.name, domid, source)
        return {"domid": domid, "name": cfg.name}

    def _changeable(self, dom: Any, what: str) -> int:
        """``dom``'s id, refused if it is dom0 or in a save, restore or migration."""
        domid = self.domid(dom)
        self._refuse_privileged(domid, what)
        self._refuse_busy(domid, what)
        return domid

    def domain_destroy(self, dom: Any) -> bool:
        domid = self._changeable(dom, "destroy")
        self.hv.destroy_domain(domid)
        log.info("destroyed domain %s", dom)
        return True

    def domain_pause(self, dom: Any) -> bool:
        self.hv.pause(self._changeable(dom, "pause"))
        return True

    def domain_unpause(self, dom: Any) -> bool:
        self.hv.unpause(self._changeable(dom, "unpause"))
        return True

    def _describe(self, info: DomainInfo, detail: bool) -> Dict[str, Any]:
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
    def job_save(self, dom: Any, path: str, checkpoint: bool = False,
                 umask: Optional[int] = None) -> int:
        """Start ``xm save``; returns the job id. Refusals come back at once.

        The target keeps its nature (:func:`_save_target`): a regular file (or a
        new one) is written beside what ``path`` resolves to and renamed over it
        when complete, with the old file's mode and owner, or for a new image
        ``0666 & ~umask`` (``umask`` is xm's, sent with the request; None: the
        daemon's). A FIFO, device or socket is written through."""
        if not isinstance(path, str) or not os.path.isabs(path):
            raise XendError(f"save path must be absolute, got {path!r}")
        if umask is not None and (isinstance(umask, bool) or not isinstance(umask, int)
                                  or not 0 <= umask <= 0o777):
            raise XendError(f"umask must be 0..0o777, got {umask!r}")
        into, old = _save_target(path)
        domid = self.domid(dom)
        info = self._check_can_checkpoint(domid, "save")
        name = info.name
        self._claim(domid, "saved")
        entry: Optional[jrn.Entry] = None
        through = old is not None and not stat.S_ISREG(old.st_mode)
        tmp = ""
        fd = -1
        try:
            if not through:
                directory, base = os.path.split(into)
                tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.part")
            # journaled before the file exists, so a crash can never orphan it
            entry = self.journal.begin(jrn.SAVE, domain=name, domid=domid, path=path, tmp=tmp,
                                       into=into, checkpoint=bool(checkpoint), phase="saving")
            if not through:
                fd = _create_beside(tmp, path, old, _daemon_umask() if umask is None else umask)
        except BaseException:
            if entry is not None:
                entry.remove()
            self._release(domid)
            raise

        def work(job: Job) -> Dict[str, Any]:
            renamed = False
            saved = False
            out: Optional[_SaveTarget] = None
            try:
                raw = _open_through(into, path, job.cancel) if through else \
                    os.fdopen(fd, "wb", buffering=0)
                out = _SaveTarget(raw, path)
                # a regular file gets its page checksums beside it (issue 8 #4)
                page_log = None if through else integrity.PageLog()
                crc_out = None if through else integrity.CrcWriter(out, page_log)
                jrn.killpoint("save-start")
                if not checkpoint:
                    self.hv.rename_domain(domid, MIGRATING_PREFIX + name)
                    renamed = True
                # xend saved non-live, checkpoint or not: the guest is suspended throughout
                report = save_domain(self.hv, domid,
                                     jrn.killpoint_stream(crc_out or out, "save-stream"),
                                     hooks=self.hooks, live=False,
                                     checkpoint=bool(checkpoint), progress=job.progress,
                                     cancel=job.cancel, name=name, journal=entry.note,
                                     page_log=page_log)
                saved = True
                out.finish(sync=not through)
                entry.update(phase="written", notes={})
                jrn.killpoint("save-written")
                if page_log is not None and crc_out is not None:   # a regular file
                    # page checksums beside it; an older image's sidecar never pairs with
                    # the new image (removed first; recovery renames a complete .part)
                    side = integrity.sidecar_path(into)
                    part = integrity.write_sidecar(side, page_log, crc_out, rename=False)
                    _unlink(side)
                    os.replace(tmp, into)
                    os.replace(part, side)
                    _fsync_dir(into)
            except BaseException:
                if out is not None:
                    out.close_quietly()
                elif not through:
                    _close_quietly(fd)
                if tmp:
                    _unlink(tmp)
                    _unlink(integrity.sidecar_path(into) + ".part")
                if saved and not checkpoint:
                    self.hv.resume(domid)      # saved but not kept: run it again
                if renamed:
                    self._rename(domid, name)
                entry.remove()
                raise
            if not checkpoint:
                self._destroy_source(domid, name)
            entry.remove()
            log.info("saved domain %s (%d) to %s%s", name, domid, path,
                     " (checkpoint)" if checkpoint else "")
            return {"op": "save", "domain": name, "domid": domid, "path": path,
                    "checkpoint": bool(checkpoint), **report}

        try:
            return self.jobs.start("save", name, self._reported(work),
                                   cleanup=lambda: self._release(domid)).id
        except BaseException:
            if not through:
                _close_quietly(fd)
                _unlink(tmp)
            entry.remove()
            raise

    # -- restore --------------------------------------------------------------
    def job_restore(self, path: str, paused: bool = False, width: int = 0) -> int:
        """``width`` 4|8 overrides the saving tools' word size; 0 infers it."""
        self._refuse_when_stopping()
        if not isinstance(path, str) or not os.path.isabs(path):
            raise XendError(f"restore path must be absolute, got {path!r}")
        if width not in (0, 4, 8) or isinstance(width, bool):
            raise XendError(f"restore width must be 4 or 8 (0 to infer it), got {width!r}")
        try:
            inp = open(path, "rb")  # noqa: SIM115 - closed by the job (``with inp``) or below
        except OSError as exc:
            raise XendError(f"Unable to read file {path}: {exc.strerror or exc}") from None
        try:
            regular = stat.S_ISREG(os.fstat(inp.fileno()).st_mode)
            if regular:
                # read once, front to back: twice the kernel's readahead (measured in
                # this VM on an uncached 1.5 GiB image: 0.7 s instead of 1.6-2.9 s)
                with contextlib.suppress(OSError):       # only advice
                    os.posix_fadvise(inp.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            # the page checksums xm save wrote beside the image, if they match it (issue 8 #4)
            check, note = (integrity.load_sidecar(os.path.realpath(path), inp.fileno())
                           if regular else (None, ""))
        except BaseException:
            inp.close()                  # e.g. an I/O error reading the sidecar
            raise
        if note:
            log.warning("restore %s: %s", path, note)
        token = object()
        claimed: List[int] = []
        entry: Optional[jrn.Entry] = None

        def created(d: int) -> None:
            assert entry is not None        # work() begins it before the domain exists
            entry.update(domid=d)
            self._claim_new(d, "restored", token)
            claimed.append(d)

        def work(job: Job) -> Dict[str, Any]:
            nonlocal entry
            entry = self.journal.begin(jrn.RESTORE, path=path, paused=bool(paused),
                                       phase="restoring")
            try:
                with inp, self._capacity_refusal(f"restore {path}"):
                    # read once: what has been read leaves the page cache (binio.DropBehind)
                    once: Any = DropBehind(inp) if regular else inp
                    src = check.reader(once) if check is not None else once
                    domid, report = restore_domain(
                        self.hv, jrn.killpoint_stream(src, "restore-stream"), hooks=self.hooks,
                        paused=True, progress=job.progress, cancel=job.cancel,
                        width=width or None, on_created=created, page_check=check)
                    report["integrity"] = (f"every page checked against {check.source}"
                                           if check is not None else note or "no checksums")
                entry.update(phase="restored", domid=domid)
                jrn.killpoint("restore-restored")
                if not paused:
                    self.hv.unpause(domid)
            finally:
                entry.remove()
            name = report.get("name") or self.hv.domain_info(domid).name
            log.info("restored domain %s (%d) from %s", name, domid, path)
            return {"op": "restore", "domain": name, "path": path, "paused": bool(paused),
                    **report, "domid": domid}

        def release() -> None:
            with self._lock:
                self._starting.pop(token, None)
                for d in claimed:
                    self._busy.pop(d, None)

        with self._lock:
            self._starting[token] = f"a restore of {path} is starting"
        try:
            return self.jobs.start("restore", os.path.basename(path), self._reported(work),
                                   cleanup=release).id
        except BaseException:
            inp.close()
            release()
            raise

    @contextlib.contextmanager
    def _capacity_refusal(self, what: str) -> Iterator[None]:
        """A restore that ran out of this host's tmem is a capacity refusal that
        says what to do, not a broken stream or a hypervisor failure."""
        try:
            yield
        except XendTmemError as exc:
            full = _tmem_full(exc)
            if full is None:
                raise
            where = self.config.path or "the xend configuration"
            raise XendError(
                f"Cannot {what}: this host's tmem is full ({full}); free some first (xm "
                f"tmem-flush DOM, or xm tmem-destroy DOM for a domain that can lose its tmem) "
                f"or give the hypervisor more tmem (hypervisor: tmem-capacity-mb in {where}, "
                f"then xend restart), and try again") from exc

    # -- migrate --------------------------------------------------------------
    def job_migrate(self, dom: Any, dst: str, live: bool = False, port: int = 0,
                    node: int = -1, ssl: Optional[bool] = None,
                    change_home_server: bool = False,
                    options: Optional[Dict[str, Any]] = None) -> int:
        """Start ``xm migrate``. ``port`` 0 means the configured relocation port;
        ``ssl`` None means the configuration's ``xend-relocation-ssl``.
        ``change_home_server`` concerns xend's managed (XenAPI) domains; this
        toolstack has none, so it changes nothing. ``options``: this migration's
        overrides of the ``migration:`` section (:meth:`_migrate_overrides`)."""
        if not isinstance(dst, str) or not dst:
            raise XendError("migrate needs a destination host")
        limits, rate_cap_bps, settings = self._migrate_overrides(options or {})
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
        mid = uuid.uuid4().hex

        def work(job: Job) -> Dict[str, Any]:
            renamed = []
            entry = self.journal.begin(jrn.MIGRATE_OUT, domain=name, domid=domid, host=dst,
                                       port=port, ssl=use_ssl, migration=mid, phase="preflight")

            def accepted() -> None:
                entry.update(phase="streaming")
                self.hv.rename_domain(domid, MIGRATING_PREFIX + name)
                renamed.append(True)
                jrn.killpoint("migrate-accepted")

            def received(peer_domid: int) -> None:
                jrn.killpoint("migrate-received")
                entry.update(phase="go-sent", peer_domid=peer_domid)

            try:
                progress = jrn.killpoint_progress(job.progress, "migrate-stream")
                report = relocation_client.migrate(self.hv, domid, dst, port, live=bool(live),
                                                   hooks=self.hooks, node=node, use_ssl=use_ssl,
                                                   progress=progress,
                                                   cancel=job.cancel, on_accepted=accepted,
                                                   on_received=received, name=name,
                                                   migration_id=mid, journal=entry.note,
                                                   query_window=self.query_window,
                                                   ack_timeout=self.ack_timeout,
                                                   tls=self.config.relocation_tls() if use_ssl
                                                   else None,
                                                   limits=limits, rate_cap_bps=rate_cap_bps,
                                                   settings=settings,
                                                   overhead_ms=min(
                                                       self._overhead_ms.get((dst, port))
                                                       or [0.0]))
            except relocation_client.MigrationInDoubt:
                entry.update(phase="in-doubt", notes={})
                self._watch_in_doubt()
                raise
            except BaseException:
                if renamed:
                    self._rename(domid, name)
                entry.remove()
                raise
            entry.update(phase="done", notes={})
            if all(isinstance(report.get(k), (int, float))
                   for k in ("downtime_ms", "image_ms", "restore_ms")):
                # the fixed part after the image (the last bytes' transit, the
                # handshake): the destination's restore work is its own pre-flight
                # figure, and the source drains the receiver before it suspends
                seen = self._overhead_ms.setdefault((dst, port), [])
                seen[:] = seen[-(OVERHEAD_SAMPLES - 1):] + [
                    max(0.0, float(report["downtime_ms"]) - float(report["image_ms"])
                        - float(report["restore_ms"]))]
            jrn.killpoint("migrate-done")
            self._destroy_source(domid, name)
            entry.remove()
            log.info("migrated domain %s (%d) to %s:%d", name, domid, dst, port)
            # a plugin's plan decision (its inputs, every alternative's estimates)
            # at the top, next to the figures it is judged by
            decisions = [sec["policy"] for sec in (report.get("plugins") or {}).values()
                         if isinstance(sec, dict) and isinstance(sec.get("policy"), dict)]
            return {"op": "migrate", "domain": name, "domid": domid, "host": dst, "port": port,
                    "ssl": use_ssl, "guest_downtime_ms": None, "restore_ms": None,
                    "handshake_ms": None, **({"policy": decisions[0]} if decisions else {}),
                    **report}

        def cleanup() -> None:
            with self._lock:
                for jid in [j for j, (d, _) in self._outgoing.items() if d == domid]:
                    del self._outgoing[jid]
            self._release(domid)

        with self._lock:
            job = self.jobs.start("migrate", name, self._reported(work), cleanup=cleanup)
            if job.finished is None:
                self._outgoing[job.id] = (domid, name)
        return job.id

    def _migrate_overrides(self, options: Dict[str, Any]
                           ) -> Tuple[Any, Optional[float], Optional[Dict[str, Dict[str, Any]]]]:
        """The stop rule, rate cap and plugin settings of one migration: the
        ``migration:`` section, overridden by ``xm migrate``'s ``resource_mbit``
        (``-r``), ``downtime_limit_ms``, ``max_iters`` and ``plan`` (the tmem
        plugin's). The tmem plugin is handed the same downtime limit as the host."""
        from ..tmem.settings import PLANS, parse_settings, with_host_limit
        if not isinstance(options, dict):
            raise XendError(f"migrate options must be a mapping, got {options!r}")
        known = ("resource_mbit", "downtime_limit_ms", "max_iters", "plan")
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise XendError(f"unknown migrate option {unknown[0]!r} (known: {', '.join(known)})")
        mig = self.config.migration
        rate = options.get("resource_mbit")
        if rate is not None:
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) \
                    or not 0 < rate <= 1e6:
                raise XendError(f"-r/--resource must be 1..1000000 Mbit/s, got {rate!r}")
            rate_cap_bps: Optional[float] = float(rate) * 1e6 / 8
        else:
            rate_cap_bps = mig.max_rate_bps
        limits = mig.limits()
        limit = options.get("downtime_limit_ms")
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) \
                    or not 1 <= limit <= 3.6e6:
                raise XendError(f"--downtime-limit-ms must be 1..3600000, got {limit!r}")
            limits = dataclasses.replace(limits, downtime_limit_ms=float(limit))
        iters = options.get("max_iters")
        if iters is not None:
            if isinstance(iters, bool) or not isinstance(iters, int) or not 1 <= iters <= 1000:
                raise XendError(f"--max-iters must be 1..1000, got {iters!r}")
            limits = dataclasses.replace(limits, max_iters=iters)
        plan = options.get("plan")
        if "tmem" not in self.hooks.enabled:
            if plan is not None:
                raise XendError("--plan is the tmem plugin's plan, and checkpoint plugin "
                                "'tmem' is not enabled on this host")
            return limits, rate_cap_bps, None
        section = dict(self.hooks.settings.get("tmem") or {})
        if plan is not None:
            if plan not in PLANS:
                raise XendError(f"--plan must be one of {', '.join(PLANS)}, got {plan!r}")
            section["plan"] = plan
        if limits.downtime_limit_ms is not None:
            section = with_host_limit(section, limits.downtime_limit_ms)
        try:
            parse_settings(section, "xm migrate --plan" if plan is not None else "tmem")
        except ConfigError as exc:
            raise XendError(str(exc)) from None
        return limits, rate_cap_bps, {"tmem": section}

    def job_migrate_cancel(self, dom: Any) -> int:
        """``xm migrate-cancel DOM``: cancel the migration of ``DOM`` that is in
        progress (by name, its ``migrating-`` name while it moves, or id), as
        Ctrl-C on its ``xm migrate`` would; returns its job id to wait on."""
        text = str(dom).strip()
        with self._lock:
            found = [jid for jid, (d, name) in self._outgoing.items()
                     if text in (name, MIGRATING_PREFIX + name, str(d))]
        if not found:
            raise XendError(f"no migration of domain {text} is in progress here")
        job = self.jobs.get(found[0])
        job.cancel.set()
        log.info("migration of domain %s (job %d) cancelled by xm migrate-cancel", text, job.id)
        return job.id

    # -- jobs -----------------------------------------------------------------
    def _reported(self, work: Callable[[Job], Dict[str, Any]]) -> Callable[[Job], Dict[str, Any]]:
        """``work`` whose result also carries its human report (``report_lines``),
        rendered here because only this daemon's plugins know their report keys."""
        def run(job: Job) -> Dict[str, Any]:
            result = work(job)
            try:
                result["report_lines"] = report_lines(result, self.hooks)
            except Exception:   # the operation succeeded; xm then renders the host's part
                log.exception("job %d: rendering its report failed", job.id)
            return result
        return run

    def job_status(self, job_id: int, wait: float = 0.0) -> Dict[str, Any]:
        """``wait``: first wait up to that many seconds (at most 1) for the job to
        end, so a poller learns of the end when it happens, not a poll later."""
        job = self.jobs.get(job_id)
        if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > 0:
            job.finished_event.wait(min(float(wait), 1.0))
        return job.status()

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

    def domain_restore(self, path: str, paused: bool = False, width: int = 0) -> Dict[str, Any]:
        return self._wait(self.job_restore(path, paused, width))

    def domain_migrate(self, dom: Any, dst: str, live: bool = False, port: int = 0,
                       node: int = -1, ssl: Optional[bool] = None,
                       change_home_server: bool = False,
                       options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        return self._wait(self.job_migrate(dom, dst, live, port, node, ssl, change_home_server,
                                           options))

    # -- relocation server callbacks --------------------------------------------
    def incoming_restore(self, stream: Source, peer: str, paused: bool = False,
                         on_created: Optional[Callable[[int], None]] = None,
                         page_check: Optional[integrity.PageCheck] = None
                         ) -> Tuple[int, Dict[str, Any]]:
        """Restore an incoming migration (left paused for ``go`` when ``paused``);
        ``page_check`` checks its pages against the checksums its frames carry.

        Its domain is busy from creation until it runs here
        (:meth:`incoming_started`) or is removed (:meth:`discard_domain`)."""
        token = object()
        claimed: List[int] = []

        def created(d: int) -> None:
            self._claim_new(d, f"migrated here from {peer}", token)
            claimed.append(d)
            if on_created is not None:
                on_created(d)

        with self._lock:
            self._starting[token] = f"an incoming migration from {peer} is starting"
        try:
            with self._capacity_refusal(f"take the domain from {peer}"):
                domid, report = restore_domain(self.hv,
                                               jrn.killpoint_stream(stream, "incoming-stream"),
                                               hooks=self.hooks, cancel=self._stopping,
                                               paused=paused, on_created=created,
                                               page_check=page_check)
        except BaseException:
            with self._lock:
                self._starting.pop(token, None)
                for d in claimed:
                    self._busy.pop(d, None)
            raise
        if not paused:
            self._release(domid)
        log.info("domain %s (%d) arrived from %s%s", report.get("name"), domid, peer,
                 " (paused until the source says go)" if paused else "")
        return domid, report

    def restore_cost_ms(self, offer: Dict[str, Any]) -> float:
        """The pre-flight's ``restore-ms``: this host's plugins' expected work
        between the end of the image and the domain restored (in the downtime)."""
        plugins = offer.get("plugins")
        if not isinstance(plugins, dict):
            return 0.0
        return self.hooks.migrate_restore_cost(
            self.hv, {k: v for k, v in plugins.items() if k in set(self.hooks.enabled)})

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

    def incoming_started(self, domid: int) -> None:
        """``go`` arrived (or a stock sender finished): start the incoming domain;
        from now on it is an ordinary domain here."""
        self.hv.unpause(domid)
        self._release(domid)

    def discard_domain(self, domid: int) -> None:
        try:
            self.hv.destroy_domain(domid)
        except XendTmemError as exc:
            log.error("could not remove domain %d: %s", domid, exc)
        finally:
            self._release(domid)

    def identify(self) -> Dict[str, Any]:
        """What answers on this socket: lets a second daemon (and ``xm``) tell
        xend-tmem from a stock xend, which has no such method."""
        return {"product": "xend-tmem", "version": __version__, "pid": os.getpid(),
                "config": self.config.path or ""}

    # -- node -----------------------------------------------------------------
    def node_info(self) -> List[List[Any]]:
        """``xm info``: ordered (key, value) pairs."""
        hv = self.hv
        host = hv.host_info()
        rel = [f"{s.address or '*'}:{s.port}" + (" (ssl)" if s.ssl_context else "")
               for s in self.relocation_servers]
        pairs: List[Tuple[str, Any]] = [
            ("host", socket.gethostname()),
            ("release", platform.release()),
            ("machine", platform.machine()),
            ("hypervisor", self.config.hypervisor.backend),
            ("nr_domains", len(hv.list_domains())),
            ("tmem_spec_version", hv.tmem_version()),
            ("xen_release", host.xen_release),
            ("tmem_can_move", "yes" if host.can_move_tmem else
             f"no: this host cannot move tmem (Xen {host.xen_release}: the hypervisor copies "
             "tmem pages only on its compression path, H8)"),
            ("tmem_capacity_mb", self.config.hypervisor.tmem_capacity_mb),
            ("tmem_free_mb", hv.tmem_free_pages() * PAGE_SIZE // (1 << 20)),
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
            ("xend_recovered", "; ".join(self.recovered) or "nothing"),
        ]
        return [[k, v] for k, v in pairs]

    # -- tmem (xend.node.tmem_*; -1 means every domain with tmem) ---------------
    def _tmem_targets(self, dom: Any, what: str) -> List[int]:
        """``[-1]`` (Xen's "every client") for -a if no domain is busy, else the
        one domain if it is not."""
        if dom in (-1, "-1"):
            self._refuse_any_busy(what)
            return [ALL_CLIENTS]
        domid = self.domid(dom)
        self._refuse_busy(domid, what)
        return [domid]

    def tmem_list(self, dom: Any = -1, long: bool = False) -> str:
        target = None if dom in (-1, "-1", None) else self.domid(dom)
        return self.hv.tmem_list(target, bool(long))

    def _tmem_each(self, dom: Any, what: str, op: Callable[[int], Any]) -> List[Any]:
        """``op`` on each target; the busy check and the change happen under the
        lock that claims domains, so no save, restore or migration starts between."""
        with self._lock:
            return [op(domid) for domid in self._tmem_targets(dom, what)]

    def tmem_freeze(self, dom: Any) -> bool:
        self._tmem_each(dom, "freeze the tmem of", self.hv.freeze)
        return True

    def tmem_thaw(self, dom: Any) -> bool:
        self._tmem_each(dom, "thaw the tmem of", self.hv.thaw)
        return True

    def tmem_flush(self, dom: Any, pages: int = -1) -> int:
        n = _int(pages, "pages to flush (-1 for all)")
        return sum(int(r or 0) for r in
                   self._tmem_each(dom, "flush the tmem of", lambda d: self.hv.flush(d, n)))

    def tmem_destroy(self, dom: Any) -> bool:
        self._tmem_each(dom, "destroy the tmem of", self.hv.destroy)
        return True

    def tmem_set_weight(self, dom: Any, weight: int) -> bool:
        return self._tmem_set(dom, self.hv.set_weight, _u32(weight, "weight"))

    def tmem_set_cap(self, dom: Any, cap: int) -> bool:
        return self._tmem_set(dom, self.hv.set_cap, _u32(cap, "cap"))

    def tmem_set_compress(self, dom: Any, compress: int) -> bool:
        return self._tmem_set(dom, self.hv.set_compress, bool(_u32(compress, "compress")))

    def _tmem_set(self, dom: Any, op: Callable[[int, Any], None], value: Any) -> bool:
        self._tmem_each(dom, "change the tmem of", lambda d: op(d, value))
        return True

    def tmem_query_freeable_mb(self) -> int:
        return int(self.hv.query_freeable_mb())

    # -- crash recovery ---------------------------------------------------------
    def recover(self) -> List[str]:
        """End every job a killed xend left in the journal; returns (and keeps
        for ``xm info``) one line per job saying what was done.

        Runs at ``xend start`` once the hypervisor is attached. A migration
        whose outcome its destination cannot tell yet stays journaled (its
        source paused) and is asked about again at the next start.
        """
        done: List[str] = []
        for entry in self.journal.entries():
            try:
                line, finished = self._recover_entry(entry)
            except Exception as exc:     # one broken entry must not stop the others
                log.error("recovery: %s: failed: %s", entry.path, exc, exc_info=exc)
                line, finished = f"{entry.op} {entry.doc.get('domain') or ''}: " \
                                 f"recovery failed: {exc}", False
            log.warning("recovery: %s", line)
            done.append(line)
            if finished:
                entry.remove()
        self.recovered = done
        if not done:
            log.info("recovery: no job was left in flight")
        self._watch_in_doubt()
        return done

    def _watch_in_doubt(self) -> None:
        """Keep asking the destinations of migrations in doubt (their sources
        stay paused) until each is settled or xend stops."""
        with self._lock:
            if self._doubt_thread is not None and self._doubt_thread.is_alive():
                return
            self._doubt_thread = threading.Thread(target=self._settle_in_doubt, daemon=True,
                                                  name="migrations-in-doubt")
            self._doubt_thread.start()

    def _settle_in_doubt(self) -> None:
        while not self._stopping.wait(IN_DOUBT_RETRY_S):
            left = 0
            for entry in self.journal.entries():
                if entry.op != jrn.MIGRATE_OUT or entry.doc.get("phase") != "in-doubt":
                    continue
                try:
                    line, finished = self._recover_entry(entry)
                except Exception as exc:  # noqa: BLE001 - logged; the others still recover
                    log.error("migration in doubt %s: %s", entry.path, exc)
                    left += 1
                    continue
                if finished:
                    entry.remove()
                    log.warning("migration in doubt settled: %s", line)
                    self.recovered.append(line)
                else:
                    left += 1
            if not left:
                return

    def _find(self, domid: Any, *names: str) -> Optional[DomainInfo]:
        """The domain ``domid`` if it still carries one of ``names`` (ids are
        reused; a domain by another name is not ours to touch)."""
        if not isinstance(domid, int) or domid <= DOM0:
            return None
        for info in self.hv.list_domains():
            if info.domid == domid:
                return info if not names or info.name in names else None
        return None

    def _recover_source(self, info: DomainInfo, name: str, notes: Dict[str, Any]) -> str:
        """A source whose save or migration died: plugins undo (tmem SAVE_END),
        log-dirty off, resumed, its name back."""
        domid = info.domid
        for plugin, exc in self.hooks.recover(self.hv, domid, notes or {}):
            log.error("recovery: checkpoint plugin '%s' could not recover domain %s (%d): %s",
                      plugin, name, domid, exc)
        for step in (self.hv.disable_logdirty, self.hv.resume):
            try:
                step(domid)
            except XendTmemError as exc:
                log.error("recovery: %s of domain %s (%d) failed: %s", step.__name__, name,
                          domid, exc)
        if info.name != name:
            self._rename(domid, name)
        thawed = " with its tmem thawed" if notes.get("tmem") else ""
        return f"domain {name} ({domid}) resumed{thawed}"

    def _recover_entry(self, entry: jrn.Entry) -> Tuple[str, bool]:
        d = entry.doc
        op = entry.op
        name = str(d.get("domain") or "")
        domid = d.get("domid")
        raw_notes = d.get("notes")
        notes: Dict[str, Any] = raw_notes if isinstance(raw_notes, dict) else {}
        phase = d.get("phase")
        if op == jrn.SAVE:
            return self._recover_save(d, name, domid, notes, phase), True
        if op == jrn.RESTORE:
            info = self._find(domid)
            if phase == "restored" and info is not None:
                if not d.get("paused"):
                    self.hv.unpause(info.domid)
                return (f"restore of {d.get('path')}: complete; domain {info.name} "
                        f"({info.domid}) {'left paused' if d.get('paused') else 'started'}"), True
            if info is not None:
                self.hv.destroy_domain(info.domid)
                return (f"restore of {d.get('path')}: interrupted; half-restored domain "
                        f"{info.name} ({info.domid}) destroyed"), True
            return f"restore of {d.get('path')}: interrupted before a domain existed", True
        if op == jrn.MIGRATE_IN:
            return self._recover_incoming(d, name, domid, phase), True
        if op == jrn.MIGRATE_OUT:
            return self._recover_outgoing(entry, d, name, domid, notes, phase)
        return f"unknown journal entry {entry.path}", False

    def _recover_save(self, d: Dict[str, Any], name: str, domid: Any, notes: Dict[str, Any],
                      phase: Any) -> str:
        path, tmp = str(d.get("path") or ""), str(d.get("tmp") or "")
        checkpoint = bool(d.get("checkpoint"))
        info = self._find(domid, name, MIGRATING_PREFIX + name)
        if phase == "written":
            into = str(d.get("into") or path)         # where a symlink pointed
            side = integrity.sidecar_path(into)
            if tmp and os.path.exists(tmp):
                _unlink(side)                 # the old image's checksums
                os.replace(tmp, into)         # complete and fsynced before "written"
                _fsync_dir(into)
            if os.path.exists(side + ".part"):
                os.replace(side + ".part", side)      # checked against the image when used
                _fsync_dir(into)
            if info is None:
                return f"save of {name} to {path}: complete"
            if checkpoint:
                return f"save of {name} to {path}: complete; " + \
                    self._recover_source(info, name, notes)
            self.hv.destroy_domain(info.domid)
            return (f"save of {name} to {path}: complete; domain {name} ({info.domid}) "
                    "destroyed as xm save does")
        removed = ""
        if tmp and os.path.exists(tmp):
            _unlink(tmp)
            removed = f"; partial file {tmp} removed"
        if d.get("into") or path:
            _unlink(integrity.sidecar_path(str(d.get("into") or path)) + ".part")
        if info is None:
            return f"save of {name} to {path}: interrupted; the domain is gone{removed}"
        return (f"save of {name} to {path}: interrupted; "
                + self._recover_source(info, name, notes) + removed)

    def _recover_incoming(self, d: Dict[str, Any], name: str, domid: Any, phase: Any) -> str:
        mid = str(d.get("migration") or "")
        peer = d.get("peer")
        info = self._find(domid, name) if name else self._find(domid)
        if phase in ("go", "restored"):
            # "go" arrived (or a stock sender, which has no commit): it is ours
            if info is not None and info.paused:
                self.hv.unpause(info.domid)
            self.journal.record_outcome(mid, relocation_protocol.RUNNING)
            where = f"domain {info.name} ({info.domid})" if info else "the domain (gone since)"
            return (f"incoming migration {mid or ''} of {name or 'a domain'} from {peer}: "
                    f"cleared to run; {where} started")
        if info is not None:
            self.hv.destroy_domain(info.domid)
        self.journal.record_outcome(mid, relocation_protocol.ABORTED)
        what = f"domain {info.name} ({info.domid}) destroyed" if info else "no domain was left"
        return (f"incoming migration {mid or ''} of {name or 'a domain'} from {peer}: never "
                f"got go; {what} (the source keeps it)")

    def _recover_outgoing(self, entry: jrn.Entry, d: Dict[str, Any], name: str, domid: Any,
                          notes: Dict[str, Any], phase: Any) -> Tuple[str, bool]:
        host, mid = str(d.get("host") or ""), str(d.get("migration") or "")
        port = int(d.get("port") or 0)
        info = self._find(domid, name, MIGRATING_PREFIX + name)
        where = f"migration of {name} to {host}:{port}"
        if info is None:
            return f"{where}: the source domain is gone", True
        if phase == "done":
            self.hv.destroy_domain(info.domid)
            return f"{where}: it runs on {host}; the copy here ({info.domid}) destroyed", True
        if phase not in ("go-sent", "in-doubt"):
            return f"{where}: interrupted before go; " + \
                self._recover_source(info, name, notes), True
        answer, detail = relocation_client.query_migration(
            host, port, mid, use_ssl=bool(d.get("ssl")),
            window=min(self.query_window, RECOVERY_QUERY_WINDOW_S),
            tls=self.config.relocation_tls() if d.get("ssl") else None)
        if answer == relocation_protocol.RUNNING:
            self.hv.destroy_domain(info.domid)
            return f"{where}: {detail}: it runs there; the copy here ({info.domid}) destroyed", True
        if answer == relocation_protocol.ABORTED:
            return f"{where}: {detail}: " + self._recover_source(info, name, notes), True
        entry.update(phase="in-doubt")
        return (f"{where}: cannot tell whether it runs there ({detail}); domain {info.name} "
                f"({info.domid}) kept paused here; xend keeps asking {host}, or xm destroy "
                f"{info.name} once it runs on {host}"), False

    # -- lifecycle --------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> None:
        """Cancel running jobs and incoming restores, and wait for them."""
        self._stopping.set()
        self._join_shutdown_watch(timeout)
        self.jobs.cancel_all()
        for server in self.relocation_servers:
            server.stop(timeout)
        if not self.jobs.wait_all(timeout, reported_within=REPORT_GRACE_S):
            log.error("some jobs did not stop within %.0f s", timeout)

    # -- xm's everyday commands (issue 8 #9) ----------------------------------------
    _shutdown_watch: Optional[threading.Thread] = None
    _shutdown_requests: Optional[Dict[int, str]] = None

    def xm_methods(self) -> Dict[str, Callable[..., Any]]:
        """The XML-RPC methods of shutdown/reboot, mem-set, vcpu-list, uptime,
        console, dmesg, log, create from an xm/SXP file, and reload."""
        return {
            "xend.domain.create_config": self.domain_create_config,
            "xend.domain.shutdown": self.domain_shutdown,
            "xend.domain.setMemoryTarget": self.domain_set_memory_target,
            "xend.domain.getVCPUInfo": self.domain_vcpu_info,
            "xend.domain.uptime": self.domain_uptime,
            "xend.domain.console": self.domain_console,
            "xend.node.dmesg.info": self.node_dmesg,
            "xend.node.dmesg.clear": self.node_dmesg_clear,
            "xend.node.log": self.node_log,
            "xend.reload": self.reload,
        }

    def domain_create_config(self, config: Any, source: str = "domain file") -> Dict[str, Any]:
        """``xm create`` of an xm (Python-syntax) or SXP file, which xm reads itself
        (as xm did): the domain config mapping it made, validated here again."""
        if not isinstance(config, dict):
            raise XendError(f"a domain config is a mapping, got {type(config).__name__}")
        return self._create(parse_domain_config(dict(config), source=str(source)), dict(config),
                            str(source))

    def domain_shutdown(self, dom: Any, reason: str = "poweroff") -> Dict[str, Any]:
        """``xm shutdown``/``xm reboot``: ask the guest; once it has acknowledged,
        the domain is destroyed (poweroff, halt) or restarted with its config
        (reboot) by the shutdown watch. ``acknowledged`` is False for a paused
        guest, which acknowledges when unpaused."""
        if reason not in SHUTDOWN_REASONS:
            raise XendError(f"shutdown reason must be one of {', '.join(SHUTDOWN_REASONS)}, "
                            f"got {reason!r}")
        what = "reboot" if reason == "reboot" else "shut down"
        domid = self._changeable(dom, what)
        self._refuse_when_stopping()
        name = self.hv.domain_info(domid).name
        self.hv.shutdown_domain(domid, reason)
        log.info("domain %s (%d): %s requested", name, domid, reason)
        with self._lock:
            if self._shutdown_requests is None:
                self._shutdown_requests = {}
            self._shutdown_requests[domid] = reason
        acknowledged = bool(self.hv.domain_info(domid).shutdown_reason)
        self._start_shutdown_watch()
        return {"domid": domid, "name": name, "acknowledged": acknowledged}

    def _start_shutdown_watch(self) -> None:
        with self._lock:
            if self._shutdown_watch is not None and self._shutdown_watch.is_alive():
                return
            self._shutdown_watch = threading.Thread(target=self._shutdown_loop,
                                                    name="xend-shutdown-watch", daemon=True)
            self._shutdown_watch.start()

    def _join_shutdown_watch(self, timeout: float) -> None:
        watch = self._shutdown_watch
        if watch is not None:
            watch.join(timeout)

    def _shutdown_loop(self) -> None:
        """Xen's @releaseDomain watch, by polling: finish every acknowledged
        shutdown; ends when no requested shutdown is outstanding."""
        pause = SHUTDOWN_POLL_S
        while not self._stopping.wait(pause):
            try:
                outstanding = self.finish_shutdowns()
            except Exception as exc:          # e.g. the hypervisor is gone: retry, slower
                log.error("shutdown watch: %s", exc, exc_info=not isinstance(exc, XendTmemError))
                pause = SHUTDOWN_RETRY_S
                continue
            pause = SHUTDOWN_POLL_S
            if not outstanding:
                with self._lock:
                    if not self._shutdown_requests:
                        self._shutdown_watch = None
                        return

    def finish_shutdowns(self) -> int:
        """Destroy or restart every guest that shut down (also run at ``xend
        start``, for guests that shut down while xend was away); returns how
        many requested shutdowns the guests have not acknowledged yet."""
        infos = self.hv.list_domains()
        live = {i.domid for i in infos}
        for info in infos:
            if info.domid == DOM0 or info.shutdown_reason not in SHUTDOWN_REASONS:
                continue
            with self._lock:
                if info.domid in self._busy:
                    continue
                self._complete_shutdown(info)
                live.discard(info.domid)
        with self._lock:
            requests = self._shutdown_requests or {}
            for domid in [d for d in requests if d not in live]:
                del requests[domid]
            return len(requests)

    def _complete_shutdown(self, info: DomainInfo) -> None:
        """xend's on_poweroff=destroy / on_reboot=restart (caller holds the lock)."""
        self.hv.destroy_domain(info.domid)
        if info.shutdown_reason != "reboot":
            log.info("domain %s (%d) shut down (%s); destroyed", info.name, info.domid,
                     info.shutdown_reason)
            return
        try:
            config = _restart_config(info)
            domid = self.hv.create_domain(config)
        except XendTmemError as exc:
            log.error("domain %s (%d) rebooted but could not be restarted: %s", info.name,
                      info.domid, exc)
            return
        log.info("domain %s (%d) rebooted; restarted as domain %d", info.name, info.domid,
                 domid)

    def domain_set_memory_target(self, dom: Any, mem: Any) -> bool:
        """``xm mem-set DOM MB``: the balloon target, within the domain's maximum."""
        domid = self.domid(dom)
        target = _u32(mem, "memory target (MiB)")
        self.hv.set_memory_target(domid, target)
        log.info("domain %s: memory target %d MiB", dom, target)
        return True

    def _domains_or_one(self, dom: Any) -> List[DomainInfo]:
        if dom in (None, ""):
            return sorted(self.hv.list_domains(), key=lambda i: i.domid)
        return [self.hv.domain_info(self.domid(dom))]

    def domain_vcpu_info(self, dom: Any = None) -> List[Dict[str, Any]]:
        """``xm vcpu-list [DOM]``: one row per vcpu (every domain without DOM)."""
        rows: List[Dict[str, Any]] = []
        for info in self._domains_or_one(dom):
            for v in self.hv.vcpu_info(info.domid):
                state = "--p" if info.paused else ("r--" if v["running"] else "-b-")
                rows.append({"name": info.name, "domid": info.domid, "vcpu": v["vcpu"],
                             "cpu": v["cpu"] if v["online"] else -1, "state": state,
                             "cpu_time": float(v["cpu_time"]), "affinity": v["affinity"]})
        return rows

    def domain_uptime(self, dom: Any = None) -> List[Dict[str, Any]]:
        """``xm uptime [DOM]``: seconds since each domain was built."""
        return [{"name": i.name, "domid": i.domid,
                 "uptime": float(self.hv.domain_uptime(i.domid))}
                for i in self._domains_or_one(dom)]

    def domain_console(self, dom: Any) -> str:
        """``xm console DOM``: what the guest printed (its console log)."""
        domid = self.domid(dom)
        if domid == DOM0:
            raise XendError("Domain-0's console is the host's own terminal")
        return self.hv.console_output(domid)

    def node_dmesg(self) -> str:
        """``xm dmesg``: the hypervisor's console ring."""
        return self.hv.read_console_ring(False)

    def node_dmesg_clear(self) -> str:
        """``xm dmesg -c``: the ring, then emptied."""
        return self.hv.read_console_ring(True)

    def node_log(self) -> str:
        """``xm log``: xend's log file (its last LOG_TAIL_BYTES)."""
        path = self.config.logfile
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - LOG_TAIL_BYTES))
                data = f.read(LOG_TAIL_BYTES)
        except OSError as exc:
            raise XendError(f"cannot read the log {path}: {exc.strerror or exc}") from None
        text = data.decode("utf-8", "replace")
        if size > LOG_TAIL_BYTES:
            text = f"(the first {size - LOG_TAIL_BYTES} bytes are left out; see {path})\n" + \
                text.split("\n", 1)[-1]
        return _XML_UNSAFE.sub("?", text)

    def reload(self) -> List[str]:
        """Re-read the configuration file (``xend reload``, SIGHUP) and apply what
        can change while xend runs: loglevel, xend-relocation-hosts-allow and the
        checkpoint plugins' sections (used from the next save, restore or
        migration). Every other changed key is named as needing a restart and
        keeps its running value. A broken file changes nothing (ConfigError).
        Returns one line per changed key."""
        from ..config import load_toolstack_config
        old = self.config
        new = load_toolstack_config(old.path)
        lines: List[str] = []
        hooks = self.hooks
        if new.plugin_settings != old.plugin_settings:
            if new.checkpoint_plugins == old.checkpoint_plugins:
                where = new.path or "configuration"
                try:
                    hooks = get_plugin_manager(self.hooks.enabled, new.plugin_settings)
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
                for name in sorted(set(new.plugin_settings) | set(old.plugin_settings)):
                    if new.plugin_settings.get(name) != old.plugin_settings.get(name):
                        lines.append(f"{name}: plugin settings applied (from the next save, "
                                     f"restore or migration)")
        if new.loglevel != old.loglevel:
            logging.getLogger().setLevel(getattr(logging, new.loglevel))
            lines.append(f"loglevel: {old.loglevel} -> {new.loglevel} (applied)")
        if new.relocation_hosts_allow != old.relocation_hosts_allow:
            patterns = new.hosts_allow_patterns()
            for server in self.relocation_servers:
                server.hosts_allow = list(patterns)
            shown = " ".join(new.relocation_hosts_allow) or "(every host)"
            lines.append(f"xend-relocation-hosts-allow: {shown} (applied)")
        plugins_applied = hooks is not self.hooks
        self.hooks = hooks
        for key in _restart_only_changes(old, new):
            lines.append(f"{key}: changed in the file; takes effect at the next xend restart "
                         f"(not applied)")
        self.config = dataclasses.replace(old, loglevel=new.loglevel,
                                          relocation_hosts_allow=new.relocation_hosts_allow,
                                          plugin_settings=new.plugin_settings
                                          if plugins_applied else old.plugin_settings)
        log.warning("configuration reloaded from %s: %s", old.path or "defaults",
                    "; ".join(lines) or "nothing changed")
        return lines


SHUTDOWN_POLL_S = 0.1
SHUTDOWN_RETRY_S = 5.0
LOG_TAIL_BYTES = 1 << 20
_XML_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _restart_config(info: DomainInfo) -> Dict[str, Any]:
    """A rebooted domain's config: its own, in the form ``create_domain`` takes
    (a restored domain's came from an image's SXP, where numbers are strings).
    A reboot is a fresh boot: the guest's tmem starts empty."""
    cfg = info.config or {}
    config: Dict[str, Any] = {"name": info.name,
                              "memory": int(str(cfg.get("memory", info.memory_mib))),
                              "vcpus": int(str(cfg.get("vcpus", info.vcpus)))}
    if isinstance(cfg.get("workload"), dict):
        spec = workload_from_image(cfg["workload"], f"domain {info.name} config")
        config["workload"] = {k: getattr(spec, k) for k in WORKLOAD_KEYS}
    return config


def _restart_only_changes(old: ToolstackConfig, new: ToolstackConfig) -> List[str]:
    """Configuration keys that differ and can change only with a restart."""
    from ..config import _KEYS
    names = {attr: key for key, (attr, _, _) in _KEYS.items()}
    names["hypervisor"] = "hypervisor"
    live = {"path", "loglevel", "relocation_hosts_allow", "plugin_settings"}
    out = []
    for f in dataclasses.fields(old):
        if f.name not in live and getattr(old, f.name) != getattr(new, f.name):
            out.append(names.get(f.name, f.name))
    if old.checkpoint_plugins != new.checkpoint_plugins and \
            old.plugin_settings != new.plugin_settings:
        out.append("plugin sections (with checkpoint-plugins changed)")
    return out


def _tmem_full(exc: BaseException) -> Optional[str]:
    """The hypervisor's words if ``exc`` (or what caused it) is tmem running
    out of room (Xen's -ENOMEM from a tmem put), else None."""
    seen = 0
    cur: Optional[BaseException] = exc
    while cur is not None and seen < 8:
        if isinstance(cur, HypervisorError) and cur.code == -errno.ENOMEM:
            text = str(cur)
            return text.split("tmem is full", 1)[-1].strip(" ()") if "tmem is full" in text \
                else text
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def _int(value: Any, what: str) -> int:
    """A number from xm's arguments; anything else is the user's mistake."""
    if isinstance(value, bool):
        raise XendError(f"{what} must be a number, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise XendError(f"{what} must be a number, got {value!r}") from None


def _u32(value: Any, what: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise XendError(f"{what} must be a number, got {value!r}") from None
    if not 0 <= n <= 0xFFFFFFFF:
        raise XendError(f"{what} must be 0..4294967295, got {n}")
    return n


# -- the target of xm save (issue 8 #3) ----------------------------------------------
THROUGH_POLL_S = 0.1


def _save_target(path: str) -> Tuple[str, Optional[os.stat_result]]:
    """Where a save to ``path`` really goes (symlinks resolved, so a link stays
    a link) and what is there now (None: nothing yet)."""
    into = os.path.realpath(path)
    try:
        old: Optional[os.stat_result] = os.stat(into)
    except FileNotFoundError:
        old = None
    except OSError as exc:
        raise XendError(f"{path}: {exc.strerror or exc}") from None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise XendError(f"Unable to create file {path}: it is a directory")
    if not os.path.isdir(os.path.dirname(into)):
        raise XendError(f"Unable to create file {path}: {os.path.dirname(into)} is not a "
                        "directory")
    return into, old


def _daemon_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would, for
    every thread at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _create_beside(tmp: str, path: str, old: Optional[os.stat_result], umask: int) -> int:
    """The temporary file a regular image is written to, with the mode (and as
    root the owner) the image keeps once renamed into place."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise XendError(f"Unable to create file {path}: {exc.strerror or exc}") from None
    try:
        if old is not None:
            os.fchmod(fd, stat.S_IMODE(old.st_mode))
            if os.geteuid() == 0 and (old.st_uid, old.st_gid) != (0, 0):
                os.fchown(fd, old.st_uid, old.st_gid)
        else:
            os.fchmod(fd, 0o666 & ~umask)
    except OSError as exc:
        os.close(fd)
        _unlink(tmp)
        raise XendError(f"{path}: {exc.strerror or exc}") from None
    return fd


def _open_through(into: str, path: str, cancel: threading.Event) -> Any:
    """A FIFO, device or socket, opened to write through (never truncated or
    replaced). A FIFO waits for its reader, as long as the job is not cancelled."""
    from ..errors import Cancelled
    while True:
        try:
            fd = os.open(into, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or not stat.S_ISFIFO(os.stat(into).st_mode):
                raise OSError(exc.errno, exc.strerror, path) from None
        if cancel.wait(THROUGH_POLL_S):
            raise Cancelled("cancelled")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    return os.fdopen(fd, "wb", buffering=0)


class _SaveTarget:
    """The image's output: an OS error while writing names the path the user
    gave (``/srv/web1.img: No space left on device``), not the temporary file."""

    def __init__(self, f: Any, path: str) -> None:
        self._f = f
        self.path = path

    def write(self, data: Any) -> Optional[int]:
        try:
            written: Optional[int] = self._f.write(data)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.path) from None
        return written

    def fileno(self) -> int:
        """The image's descriptor (the writer starts writeback of a regular file early)."""
        fd: int = self._f.fileno()
        return fd

    def finish(self, sync: bool) -> None:
        try:
            if sync:
                os.fsync(self._f.fileno())
            self._f.close()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, self.path) from None

    def close_quietly(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


def _close_quietly(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _fsync_dir(path: str) -> None:
    """Make a rename into ``path``'s directory durable."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["XendService", "XendError", "MIGRATING_PREFIX"]
