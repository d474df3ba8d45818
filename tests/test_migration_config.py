"""The ``migration:`` section of the toolstack configuration (issue 7's knobs)."""
from __future__ import annotations

import os
import tempfile

import pytest

from xend_tmem.config import (MigrationSettings, load_toolstack_config,
                              parse_toolstack_config)
from xend_tmem.errors import ConfigError
from xend_tmem.tmem.settings import parse_settings, with_host_limit

HERE = os.path.dirname(os.path.abspath(__file__))


def mig(section=None, **top) -> MigrationSettings:
    data = dict(top)
    if section is not None:
        data["migration"] = section
    return parse_toolstack_config(data, "/etc/xen/xend-config.yaml").migration


def test_defaults_are_xens_ceiling_and_no_cap() -> None:
    m = mig()
    assert m == MigrationSettings()
    assert (m.max_rate_mbit, m.downtime_limit_ms, m.on_limit_miss, m.max_iters,
            m.max_total_s) == (0.0, 300.0, "best-effort", 29, 0.0)
    assert m.max_rate_bps is None and m.downtime_limit_from == ""


def test_every_key_is_read() -> None:
    m = mig({"max-rate-mbit": 1000, "downtime-limit-ms": 50, "on-limit-miss": "strict",
             "max-iters": 10, "max-total-s": 120})
    assert m.max_rate_mbit == 1000 and m.max_rate_bps == 125e6
    assert m.downtime_limit_ms == 50 and m.downtime_limit_from == "migration.downtime-limit-ms"
    assert m.on_limit_miss == "strict" and m.max_iters == 10 and m.max_total_s == 120
    lim = m.limits()
    assert (lim.downtime_limit_ms, lim.on_limit_miss, lim.max_iters, lim.max_total_s) == \
        (50, "strict", 10, 120)


def test_the_old_tmem_key_is_an_alias() -> None:
    m = mig(tmem={"downtime-limit-ms": 120})
    assert m.downtime_limit_ms == 120 and m.downtime_limit_from == "tmem.downtime-limit-ms"
    # both, agreeing: fine; disagreeing: one line naming the old key
    assert mig({"downtime-limit-ms": 120}, tmem={"downtime-limit-ms": 120}).downtime_limit_ms \
        == 120
    with pytest.raises(ConfigError, match=r"tmem\.downtime-limit-ms: is the old name of "
                                          r"migration\.downtime-limit-ms .*120.* 80"):
        mig({"downtime-limit-ms": 80}, tmem={"downtime-limit-ms": 120})
    # the plugin still accepts its old key, and the host's limit replaces it
    section = with_host_limit({"plan": "auto", "downtime-limit-ms": 900}, 40)
    assert section["downtime-limit-ms"] == 40 and parse_settings(section).plan == "auto"


@pytest.mark.parametrize("section,match", [
    ({"max-rate-mbit": -1}, r"migration\.max-rate-mbit: expected a number 0\.\.1e\+06, got -1"),
    ({"max-rate-mbit": "fast"}, r"migration\.max-rate-mbit: expected a number"),
    ({"downtime-limit-ms": 0}, r"migration\.downtime-limit-ms: expected a number 1\.\."),
    ({"downtime-limit-ms": True}, r"migration\.downtime-limit-ms: expected a number"),
    ({"on-limit-miss": "maybe"}, r"migration\.on-limit-miss: expected one of "
                                 r"best-effort \| strict, got 'maybe'"),
    ({"max-iters": 0}, r"migration\.max-iters: expected an integer 1\.\.1000, got 0"),
    ({"max-iters": 2.5}, r"migration\.max-iters: expected an integer"),
    ({"max-total-s": -3}, r"migration\.max-total-s: expected a number 0\.\.86400"),
    ({"max-rate": 100}, r"migration\.max-rate: unknown key \(did you mean 'max-rate-mbit'\?\)"),
    ([1, 2], r"migration: expected a mapping"),
])
def test_errors_name_the_key(section, match) -> None:
    with pytest.raises(ConfigError, match=r"/etc/xen/xend-config\.yaml: " + match):
        mig(section)


def test_bad_alias_value_names_the_old_key() -> None:
    with pytest.raises(ConfigError, match=r"tmem\.downtime-limit-ms: expected a number"):
        mig(tmem={"downtime-limit-ms": "fast"})


def test_the_shipped_configuration_documents_the_section() -> None:
    path = os.path.join(HERE, os.pardir, "config", "xend-config.yaml")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for key in ("max-rate-mbit", "downtime-limit-ms", "on-limit-miss", "max-iters",
                "max-total-s"):
        assert f"  {key}:" in text
    m = load_toolstack_config(path).migration
    assert m.downtime_limit_from == "migration.downtime-limit-ms"
    assert m == MigrationSettings(downtime_limit_from="migration.downtime-limit-ms")


def test_a_file_with_only_the_old_key_keeps_its_limit() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "xend-config.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write("checkpoint-plugins: [tmem]\ntmem:\n  downtime-limit-ms: 75\n")
        m = load_toolstack_config(path).migration
    assert m.downtime_limit_ms == 75 and m.downtime_limit_from == "tmem.downtime-limit-ms"
