"""SXP codec: xend's config text, parse/print round trips, lookup and dict bridge."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xend_tmem.codec import sxp
from xend_tmem.errors import ConfigError

XEND_CONFIG = """\
(domain
    (domid 3)
    (on_crash restart)
    (uuid 5c0d8a1e-6c2b-4f6a-9a64-3f0e3b8f2a11)
    (bootloader_args )
    (vcpus 2)
    (name web1)
    (cpus (()))
    (on_poweroff destroy)
    (maxmem 512)
    (memory 512)
    (shadow_memory 0)
    (features )
    (cpu_time 12.5)
    (image
        (linux
            (kernel /boot/vmlinuz-2.6.32-xen)
            (ramdisk /boot/initrd-2.6.32-xen.img)
            (args 'root=/dev/xvda1 ro console=hvc0')
            (notes (HV_START_LOW 18446603336221196288)
                   (FEATURES '!writable_page_tables|pae_pgdir_above_4gb'))
        )
    )
    (state -b----)
    (device (vif (bridge xenbr0) (mac 00:16:3e:12:34:56) (script /etc/xen/scripts/vif-bridge)))
    (device (vbd (uname phy:/dev/vg0/web1) (dev xvda1:disk) (mode w) (bootable 1)))
    (device (console (protocol vt100) (location 2)))
)
"""


def test_realistic_xend_config_parses_and_round_trips():
    cfg = sxp.parse(XEND_CONFIG)
    assert cfg[0] == "domain"
    assert sxp.child_value(cfg, "memory") == "512"
    assert sxp.child_value(cfg, "name") == "web1"
    assert sxp.child(cfg, "bootloader_args") == ["bootloader_args"]
    assert sxp.child_value(cfg, "bootloader_args", "none") == "none"
    assert sxp.child(cfg, "cpus") == ["cpus", [[]]]
    linux = sxp.child(sxp.child(cfg, "image"), "linux")
    assert sxp.child_value(linux, "args") == "root=/dev/xvda1 ro console=hvc0"
    assert sxp.child_value(sxp.child(linux, "notes"), "FEATURES") == \
        "!writable_page_tables|pae_pgdir_above_4gb"
    devs = sxp.children(cfg, "device")
    assert [d[1][0] for d in devs] == ["vif", "vbd", "console"]
    text = sxp.to_string(cfg)
    assert text.startswith("(domain (domid 3) (on_crash restart) ")
    assert "(args \"root=/dev/xvda1 ro console=hvc0\")" in text
    assert sxp.parse(text) == cfg
    assert sxp.parse(sxp.to_string(cfg, pretty=True)) == cfg


def test_to_string_is_xend_style():
    x = ["domain", ["domid", "3"], ["name", "web1"], ["memory", 512], ["vcpus", 1],
         ["image", ["linux", ["kernel", "/boot/vmlinuz"]]]]
    assert sxp.to_string(x) == ("(domain (domid 3) (name web1) (memory 512) (vcpus 1) "
                                "(image (linux (kernel /boot/vmlinuz))))")


@pytest.mark.parametrize("atom, shown", [
    ("web1", "web1"),
    ("", '""'),
    ("two words", '"two words"'),
    ("(paren", '"(paren"'),
    ("it's", '"it\'s"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("#notcomment", '"#notcomment"'),
    ("a#b", "a#b"),
    ("line\nbreak\ttab", '"line\\nbreak\\ttab"'),
    ("\x01ctl", '"\\x01ctl"'),
    ("naïve", "naïve"),
])
def test_quote(atom, shown):
    assert sxp.quote(atom) == shown
    assert sxp.parse(shown) == atom


def test_escapes_and_quotes():
    got = sxp.parse(r"""(a "x\"y" 'p\'q' "\t\n\\" "\x41\101\q")""")
    assert got == ["a", 'x"y', "p'q", "\t\n\\", "AAq"]


def test_comments_and_parse_all():
    text = """# xend-config.sxp
(xend-relocation-server yes)   # trailing comment
(xend-relocation-port 8002)
(logfile "/var/log/xen/xend.log")
"""
    assert sxp.parse_all(text) == [["xend-relocation-server", "yes"],
                                   ["xend-relocation-port", "8002"],
                                   ["logfile", "/var/log/xen/xend.log"]]
    assert sxp.parse("(a #b)", comments=False) == ["a", "#b"]


@pytest.mark.parametrize("text, line, col, problem", [
    ("(domain (name web1)", 1, 1, "never closed"),
    ("(a))", 1, 4, "without a matching"),
    ('(a\n  "open)', 2, 3, "unterminated"),
    ("(a) (b)", 1, 5, "continues after"),
    ("   # only a comment\n", 2, 1, "no SXP expression"),
])
def test_syntax_errors_name_position(text, line, col, problem):
    with pytest.raises(ConfigError) as ei:
        sxp.parse(text, source="web1.sxp")
    e = ei.value
    assert isinstance(e, sxp.SxpSyntaxError)
    assert (e.line, e.col) == (line, col)
    assert problem in str(e)
    assert str(e).startswith("web1.sxp: ")
    assert "\n" not in str(e)


def test_nesting_cap():
    with pytest.raises(ConfigError, match="deeper"):
        sxp.parse("(" * (sxp.MAX_DEPTH + 2) + ")" * (sxp.MAX_DEPTH + 2))
    deep = "(" * sxp.MAX_DEPTH + ")" * sxp.MAX_DEPTH
    assert sxp.parse(sxp.to_string(sxp.parse(deep))) == sxp.parse(deep)


def test_unwritable_atom():
    with pytest.raises(ConfigError, match="NoneType"):
        sxp.to_string(["a", None])


atoms = st.text(max_size=12)
trees = st.recursive(atoms, lambda kids: st.lists(kids, max_size=5), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(trees)
def test_round_trip_property(x):
    assert sxp.parse(sxp.to_string(x)) == x
    assert sxp.parse(sxp.to_string(x, pretty=True)) == x
    assert sxp.parse(sxp.to_string(x), comments=False) == x


def test_from_mapping_builds_domain_sxp():
    desc = {
        "name": "web1", "memory": 512, "vcpus": 1, "acpi": True,
        "image": {"linux": {"kernel": "/boot/vmlinuz", "args": "root=/dev/xvda1 ro"}},
        "cpus": ("0", "1"),
        "device": [{"vif": {"mac": "00:16:3e:00:00:01"}}, {"vbd": {"dev": "xvda1"}}],
        "features": {},
    }
    x = sxp.from_mapping("domain", desc)
    assert sxp.to_string(x) == (
        '(domain (name web1) (memory 512) (vcpus 1) (acpi 1) '
        '(image (linux (kernel /boot/vmlinuz) (args "root=/dev/xvda1 ro"))) (cpus 0 1) '
        '(device (vif (mac 00:16:3e:00:00:01))) (device (vbd (dev xvda1))) (features))')
    back = sxp.to_mapping(sxp.parse(sxp.to_string(x)))
    assert back == {
        "name": "web1", "memory": "512", "vcpus": "1", "acpi": "1",
        "image": {"linux": {"kernel": "/boot/vmlinuz", "args": "root=/dev/xvda1 ro"}},
        "cpus": ("0", "1"),
        "device": [{"vif": {"mac": "00:16:3e:00:00:01"}}, {"vbd": {"dev": "xvda1"}}],
        "features": {},
    }


def test_to_mapping_keeps_every_value_of_a_real_config():
    cfg = sxp.parse(XEND_CONFIG)
    m = sxp.to_mapping(cfg)
    assert m["cpus"] == ([[]],)
    assert m["image"]["linux"]["notes"]["HV_START_LOW"] == "18446603336221196288"
    assert len(m["device"]) == 3
    again = sxp.from_mapping(cfg[0], m)
    # same forms; repeated keys are grouped, which this config already does
    assert again == cfg


@pytest.mark.parametrize("bad", [
    {"memory": None},
    {"": "x"},
    {"device": [["nested"]]},
    {"x": object()},
])
def test_from_mapping_rejects(bad):
    with pytest.raises(ConfigError):
        sxp.from_mapping("domain", bad)


def test_to_mapping_rejects_non_forms():
    with pytest.raises(ConfigError, match="not a \\(key value"):
        sxp.to_mapping(["domain", "stray"])
    with pytest.raises(ConfigError):
        sxp.to_mapping("domain")
