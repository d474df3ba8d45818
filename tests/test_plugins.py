"""The plugin manager factory and the hook contract's rules."""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from xend_tmem import plugins
from xend_tmem.errors import ConfigError, PluginError
from xend_tmem.hooks import hookimpl, hookspecs
from xend_tmem.hooks import tmem as tmem_plugin
from xend_tmem.session import Outcome


def test_tmem_plugin_loads_by_entry_point_name():
    hooks = plugins.get_plugin_manager(["tmem"], {})
    assert hooks.pm.get_plugin("tmem") is tmem_plugin
    assert hooks.restore_markers() == {-5, -6}


def test_no_plugins_means_no_markers():
    hooks = plugins.get_plugin_manager([], {})
    assert hooks.restore_markers() == set()


def test_unknown_plugin_named():
    with pytest.raises(PluginError, match="'nosuch' is not installed"):
        plugins.get_plugin_manager(["nosuch"], {})


def test_broken_plugin_named_at_load(mocker):
    class EP:
        name = "broken"

        def load(self):
            raise ImportError("No module named 'missing_dep'")

    mocker.patch.object(plugins, "installed_plugins", return_value={"broken": EP()})
    with pytest.raises(PluginError, match="'broken' failed to load: ImportError"):
        plugins.get_plugin_manager(["broken"], {})


def test_unknown_hook_caught_by_check_pending():
    class Typo:
        @hookimpl
        def checkpoint_save_setpu(self, session):
            pass

    with pytest.raises(PluginError, match="unknown hook"):
        plugins.get_plugin_manager([], {}, extra=[Typo()])


@pytest.mark.parametrize("marker,msg", [(-5, "both declare"), (-7, "parses itself"),
                                        (3, "negative")])
def test_marker_ownership(marker, msg):
    class Claim:
        @hookimpl
        def checkpoint_restore_markers(self):
            return [marker]

    with pytest.raises(PluginError, match=msg):
        plugins.get_plugin_manager(["tmem"], {}, extra=[Claim()])


def test_bad_tmem_settings_named():
    with pytest.raises(ConfigError, match=r"tmem\.plan"):
        plugins.get_plugin_manager(["tmem"], {"tmem": {"plan": "sometimes"}})
    with pytest.raises(ConfigError, match=r"tmem\.colour"):
        plugins.get_plugin_manager(["tmem"], {"tmem": {"colour": 1}})
    with pytest.raises(ConfigError, match=r"downtime-limit-ms"):
        plugins.get_plugin_manager(["tmem"], {"tmem": {"downtime-limit-ms": "fast"}})


def test_done_runs_every_impl_even_if_one_raises():
    calls = []

    class A:
        @hookimpl
        def checkpoint_save_done(self, session, outcome):
            calls.append("A")
            raise RuntimeError("A broke")

    class B:
        @hookimpl
        def checkpoint_save_done(self, session, outcome):
            calls.append("B")

    hooks = plugins.get_plugin_manager([], {}, extra=[A(), B()])
    errors = hooks.save_done(object(), Outcome())
    assert sorted(calls) == ["A", "B"]
    assert len(errors) == 1 and str(errors[0][1]) == "A broke"


def test_migrate_check_refuses_offer_for_missing_plugin():
    hooks = plugins.get_plugin_manager([], {})
    assert hooks.migrate_check(None, {"tmem": {"version": 1}}) == [
        "this host has no 'tmem' checkpoint plugin enabled"]
    assert hooks.migrate_check(None, {}) == []


def test_hookimpls_have_no_defaults_and_specs_have_docs():
    for name, fn in inspect.getmembers(tmem_plugin, inspect.isfunction):
        if name.startswith("checkpoint_"):
            for p in inspect.signature(fn).parameters.values():
                assert p.default is inspect.Parameter.empty, (name, p.name)
    specs = [f for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if n.startswith("checkpoint_")]
    assert len(specs) >= 12
    for fn in specs:
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, fn.__name__


def test_bare_hooks_package_not_importable(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import hooks"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'hooks'" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import xend_tmem.hooks.hookspecs"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
