"""Regression tests for issue 8 #10 (progress and reports).

- the progress display never goes backwards (tmem 87 % was followed by RAM 66 %
  on the same status line) and stays readable in a log off a terminal;
- report text says "1 round", not "1 rounds";
- ``xend-tmem --help`` shows plain text, not RST ``markup``;
- each checkpoint plugin renders its own report lines (hook
  ``checkpoint_report_lines``); the host knows none of their keys, and the
  daemon, which has the plugins, renders them into the job result.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from xend_tmem.cli import tool
from xend_tmem.config import parse_toolstack_config
from xend_tmem.domconfig import parse_domain_config
from xend_tmem.hooks import hookimpl, hookspecs
from xend_tmem.hypervisor.sim import SimHypervisor
from xend_tmem.plugins import get_plugin_manager
from xend_tmem.xend import progress, xm
from xend_tmem.xend.service import XendService

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def percents_per_line(text: str) -> List[List[int]]:
    """The percentages of each terminal line, frame by frame (frames split on CR)."""
    out = []
    for line in text.split("\n"):
        out.append([int(m.group(1)) for frame in line.split("\r")
                    for m in [re.search(r"\s(\d{1,3})%", frame)] if m])
    return out


# A precopy migration as the daemon reports it: the tmem phase counts towards the
# end of the tmem chunk, the RAM rounds towards the estimated end of the stream.
PRECOPY = [("connect", 0, None), ("preflight", 0, None),
           ("tmem", 1 * MiB, 70 * MiB), ("tmem", 30 * MiB, 70 * MiB),
           ("tmem", 61 * MiB, 70 * MiB),                       # 87 %
           ("rounds", 70 * MiB, 106 * MiB),                    # 66 % of the whole stream
           ("rounds", 90 * MiB, 106 * MiB), ("rounds", 104 * MiB, 106 * MiB),
           ("suspend", 105 * MiB, 106 * MiB), ("tail", 106 * MiB, 106 * MiB)]


def test_progress_never_goes_backwards_on_a_terminal() -> None:
    clock, tty = Clock(), Terminal()
    d = progress.ProgressDisplay(tty, "migrate", clock=clock)
    for phase, done, total in PRECOPY:
        clock.now += 0.5
        d.update(phase, done, total)
    d.finish(None)
    text = tty.getvalue()
    for pcts in percents_per_line(text):
        assert pcts == sorted(pcts), f"a status line went backwards: {pcts} in {text!r}"
    lines = text.split("\n")
    assert not any("tmem" in ln and "memory rounds" in ln for ln in lines), \
        "tmem and the RAM rounds share one bar"
    # the RAM bar counts the RAM still to go, not the tmem already sent
    rounds = [ln for ln in lines if "memory rounds" in ln][0]
    assert percents_per_line(rounds)[0][0] == 0


def test_off_a_terminal_progress_is_lines_for_a_log() -> None:
    clock, log = Clock(), io.StringIO()          # not a terminal
    d = progress.ProgressDisplay(log, "migrate", clock=clock)
    for i in range(100):                         # 10 s of RAM rounds, polled every 0.1 s
        clock.now = i * 0.1
        d.update("rounds", i * MiB, 200 * MiB)
    for i in range(10):                          # then 1 s of tmem
        clock.now = 10 + i * 0.1
        d.update("tmem", (100 + i) * MiB, 110 * MiB)
    d.finish("migrate: done  110.0 MiB in 11.00 s")
    text = log.getvalue()
    assert "\r" not in text, "carriage returns garble a log"
    lines = text.splitlines()
    assert 3 <= len(lines) <= 10, lines          # a line per phase change / every few seconds
    assert any("memory rounds" in ln and "MiB/s" in ln and "ETA" in ln for ln in lines), lines
    assert any("tmem" in ln for ln in lines) and lines[-1].startswith("migrate: done")


def test_the_daemons_phase_start_sets_the_boundary() -> None:
    clock, log = Clock(), io.StringIO()
    d = progress.ProgressDisplay(log, "save", clock=clock)
    for done in (10, 30):
        clock.now += 1
        d.update("rounds", done * MiB, 100 * MiB, 0)
    clock.now += 1
    d.update("tmem", 50 * MiB, 80 * MiB, 40 * MiB)   # tmem began at 40 MiB, first seen at 50
    clock.now += 1
    d.update("tmem", 60 * MiB, 80 * MiB, 40 * MiB)
    d.finish("save: done")
    rounds, tmem, done = log.getvalue().splitlines()
    assert "40.0 MiB / 100.0 MiB  40%" in rounds, rounds
    assert "20.0 MiB / 40.0 MiB  50%" in tmem, tmem


def test_a_job_says_where_its_phase_began() -> None:
    from xend_tmem.xend.jobs import Job
    job = Job(1, "migrate", "web1")
    job.progress("rounds", 4, 100)
    job.progress("rounds", 8, 100)
    assert job.status()["phase_start"] == 0
    job.progress("tmem", 12, 20)             # reported after its first piece of work
    assert job.status()["phase_start"] == 8
    job.progress("commit", 0, None)          # a counter that restarted
    assert job.status()["phase_start"] == 0


@pytest.fixture
def proxy(mocker):
    p = mocker.MagicMock(name="proxy")
    mocker.patch.object(xm, "server", return_value=p)
    mocker.patch.object(xm, "POLL_S", 0.0)
    return p


def test_xm_progress_option_writes_phase_lines_off_a_terminal(proxy, capsys) -> None:
    result = {"op": "migrate", "domain": "web1", "domid": 3, "host": "h", "port": 8002,
              "live": True, "bytes": 106 * MiB, "elapsed_s": 1.0, "rounds": 3,
              "pages_sent": 30000, "plugins": {}}
    proxy.xend.job.migrate.return_value = 5
    proxy.xend.job.status.side_effect = [
        {"state": "running", "phase": p, "done": d, "total": t} for p, d, t in PRECOPY
    ] + [{"state": "done", "phase": "tail", "done": 106 * MiB, "total": None, "result": result}]
    assert xm.main(["migrate", "--live", "--progress", "web1", "h"]) == 0
    err = capsys.readouterr().err                # pytest's stderr is no terminal
    assert "\r" not in err
    assert "migrate: tmem" in err and "migrate: memory rounds" in err


# -- grammar -------------------------------------------------------------------------

def test_report_says_one_round_not_one_rounds() -> None:
    lines = progress.report_lines({"op": "save", "domain": "x", "path": "/p", "bytes": 4096,
                                   "elapsed_s": 0.1, "rounds": 1, "pages_sent": 1,
                                   "plugins": {}})
    assert "1 round," in lines[0] and "1 RAM page" in lines[0], lines
    assert "1 rounds" not in lines[0] and "1 RAM pages" not in lines[0]


# -- help text -----------------------------------------------------------------------

def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_help_is_plain_text_without_rst_markup() -> None:
    for parser in _parsers(tool.build_parser()):
        text = parser.format_help()
        assert "``" not in text, f"{parser.prog} --help shows RST markup:\n{text}"
        assert ":mod:" not in text and ":func:" not in text, text


# -- plugins render their own report lines ------------------------------------------------

class _Acme:
    """A third-party plugin whose report keys happen to look like tmem's."""

    __name__ = "acme"

    @hookimpl
    def checkpoint_report_lines(self, report):
        mine = (report.get("plugins") or {}).get("acme")
        if not mine:
            return None
        return [f"acme: {mine['pages']} widgets moved"]


ACME_RESULT = {"op": "save", "domain": "x", "path": "/p", "bytes": 4096, "elapsed_s": 0.1,
               "rounds": 2, "pages_sent": 2, "plugins": {"acme": {"plan": "fast", "pages": 3}}}


def test_the_hook_is_specified() -> None:
    spec = getattr(hookspecs, "checkpoint_report_lines", None)
    assert spec is not None, "no checkpoint_report_lines hook: the host renders plugins' keys"
    doc = spec.__doc__ or ""
    assert "report" in doc and "None" in doc


def test_the_host_knows_no_plugin_keys() -> None:
    text = "\n".join(progress.report_lines(ACME_RESULT))
    assert "tmem pages" not in text and "of tmem" not in text, \
        f"the host read a plugin's keys as tmem's:\n{text}"


def test_a_plugin_renders_its_own_lines() -> None:
    hooks = get_plugin_manager([], {}, extra=[_Acme()])
    lines = progress.report_lines(ACME_RESULT, hooks)
    assert "acme: 3 widgets moved" in lines
    assert not any(ln.startswith("acme: ") and "plan" in ln for ln in lines), lines


def test_a_plugin_that_fails_to_render_does_not_cost_the_report() -> None:
    class Broken:
        __name__ = "broken"

        @hookimpl
        def checkpoint_report_lines(self, report):
            raise ValueError("boom")

    hooks = get_plugin_manager([], {}, extra=[_Acme(), Broken()])
    lines = progress.report_lines(ACME_RESULT, hooks)
    assert "acme: 3 widgets moved" in lines
    assert any(ln.startswith("broken: ") and "boom" in ln for ln in lines), lines


def test_tmem_and_digest_plugins_render_their_sections_with_grammar() -> None:
    hooks = get_plugin_manager(["tmem", "tmem-digest"], {})
    result = {"op": "migrate", "domain": "w", "host": "h", "port": 1, "live": True,
              "bytes": 8 * MiB, "elapsed_s": 0.5, "rounds": 1, "pages_sent": 1,
              "plugins": {"tmem": {"plan": "precopy", "reason": "it fits", "tmem_bytes": 4096,
                                   "pages": 1, "invalidations": 1, "freeze_ms": 250.0,
                                   "persistent_pages_at_start": 1, "pools": 1},
                          "tmem-digest": {"at": "suspend", "persistent_pages": 1,
                                          "pools": {"0": {"pages": 1, "sha256": "ab" * 32}}}}}
    lines = progress.report_lines(result, hooks)
    text = "\n".join(lines)
    assert "tmem: plan precopy (it fits)" in lines
    assert "4.0 KiB of tmem (1 page)" in text and "1 page invalidated" in text
    assert "1 pages" not in text and "1 pools" not in text, text
    assert any(ln.startswith("tmem-digest: ") for ln in lines), lines


def test_restore_report_of_the_tmem_plugin() -> None:
    hooks = get_plugin_manager(["tmem"], {})
    lines = progress.report_lines({"op": "restore", "domain": "w", "domid": 4, "path": "/p",
                                   "bytes": 1, "elapsed_s": 0.1, "pages": 1,
                                   "plugins": {"tmem": {"pages": 2, "invalidations": 0,
                                                        "tmem_bytes": 8192, "frozen": True}}},
                                  hooks)
    tmem = [ln for ln in lines if ln.startswith("tmem: ")]
    assert tmem and "8.0 KiB of tmem (2 pages)" in tmem[0] and "frozen" in tmem[0], lines


DOMAIN = {"name": "web1", "memory": 4,
          "tmem": {"version": 1, "pools": [{"id": 0, "persistent": True,
                                            "bulk": {"pages": 8}}]}}


def test_the_daemon_renders_its_plugins_lines_into_the_result(tmp_path: Path) -> None:
    hv = SimHypervisor()
    hv.create_domain(parse_domain_config(DOMAIN))
    svc = XendService(parse_toolstack_config({"xend-state-dir": str(tmp_path / "state")}), hv,
                      get_plugin_manager(["tmem"], {}))
    try:
        job = svc.jobs.get(svc.job_save("web1", str(tmp_path / "web1.img"), False))
        assert job.finished_event.wait(20)
        result = job.status()["result"]
    finally:
        svc.stop(5)
    lines = result.get("report_lines")
    assert isinstance(lines, list), "the job result carries no rendered report"
    assert lines[0].startswith("Saved domain web1 to ")
    assert any(ln.startswith("tmem: plan non-live") for ln in lines), lines
    assert any("of tmem (8 pages)" in ln for ln in lines), lines


def test_xm_prints_the_daemons_lines_and_json_is_the_result(proxy, capsys, tmp_path) -> None:
    result: Dict[str, Any] = {**ACME_RESULT, "path": str(tmp_path / "x.img"),
                              "report_lines": ["Saved domain x to somewhere: 4.0 KiB",
                                               "acme: 3 widgets moved"]}
    for argv, check in ((["save", "x", str(tmp_path / "x.img")],
                         lambda out: out.splitlines() == result["report_lines"]),
                        (["save", "--json", "x", str(tmp_path / "x.img")],
                         lambda out: json.loads(out) == result)):
        proxy.xend.job.save.return_value = 1
        proxy.xend.job.status.side_effect = [{"state": "done", "phase": "tail", "done": 4096,
                                              "total": None, "result": result}]
        assert xm.main(argv) == 0
        out = capsys.readouterr().out
        assert check(out), out


# -- the demo ------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_the_demo_shows_its_phases_in_a_log() -> None:
    r = subprocess.run([sys.executable, "-m", "xend_tmem.cli.tool", "demo", "--size", "small"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    log = r.stderr
    assert "\r" not in log
    phases = [ln for ln in log.splitlines() if ln.startswith("migrate: ")]
    assert any(ln.startswith("migrate: tmem") and "/s" in ln for ln in phases), log
    assert any(ln.startswith("migrate: memory rounds") and "/s" in ln for ln in phases), log
    assert "1 rounds" not in r.stdout and "1 pages" not in r.stdout
