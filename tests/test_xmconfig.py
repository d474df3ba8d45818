"""xm's own domain files (Python syntax and SXP), read without being executed."""
from __future__ import annotations

from pathlib import Path

import pytest

from xend_tmem.domconfig import parse_domain_config
from xend_tmem.errors import ConfigError
from xend_tmem.xmconfig import MAX_FILE_BYTES, load_domain_file, parse_domain_file

XMCONFIGS = Path(__file__).resolve().parent / "data" / "xmconfigs"


def parse(text: str, source: str = "dom.cfg"):
    return parse_domain_file(text.encode(), source)


def error(text: str, source: str = "dom.cfg") -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, source)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- the three real-world files -------------------------------------------------------

def test_pv_file_with_kernel_disks_and_vifs() -> None:
    f = load_domain_file(str(XMCONFIGS / "web1.cfg"))
    assert f.format == "xm" and f.builder == "linux"
    assert f.config == {"name": "web1", "memory": 256, "vcpus": 2}
    assert f.settings["disk"] == ["phy:/dev/vg0/web1-root,xvda1,w",
                                  "phy:/dev/vg0/web1-swap,xvda2,w"]
    assert f.settings["kernel"] == "/boot/vmlinuz-2.6.32.57-xen"
    assert f.settings["on_reboot"] == "restart"
    notes = " ".join(f.notes)
    for key in ("kernel", "ramdisk", "disk", "vif"):
        assert key in notes
    assert parse_domain_config(f.config).name == "web1"


def test_pygrub_file_with_memory_as_a_string() -> None:
    f = load_domain_file(str(XMCONFIGS / "db2.cfg"))
    assert f.config == {"name": "db2", "memory": 128, "vcpus": 1}
    assert f.settings["bootloader"] == "/usr/bin/pygrub"
    assert "bootloader" in " ".join(f.notes)


def test_hvm_file_runs_as_a_simulated_pv_guest_with_a_note() -> None:
    f = load_domain_file(str(XMCONFIGS / "winsrv.hvm"))
    assert f.builder == "hvm"
    assert f.config == {"name": "winsrv", "memory": 256, "vcpus": 2}
    hvm_note = [n for n in f.notes if "HVM" in n]
    assert hvm_note and "PV" in hvm_note[0] and "device_model" in " ".join(f.notes)


# -- never executed ----------------------------------------------------------------------

@pytest.mark.parametrize("text, line, word", [
    ('name = "x"\nimport os\n', 2, "import"),
    ('name = "x"\n\nmemory = 256 * 2\n', 3, "memory"),
    ('name = __import__("os").getcwd()\n', 1, "name"),
    ('name = "x"\nexec("print(1)")\n', 2, "statement"),
    ('name = "x"\nif True:\n    memory = 64\n', 2, "statement"),
    ('name = "x"\nmemory = open("/etc/passwd").read()\n', 2, "memory"),
    ('name, memory = "x", 64\n', 1, "name"),
    ('name = f"x{1}"\n', 1, "name"),
])
def test_anything_but_literal_assignments_is_refused_naming_the_line(text: str, line: int,
                                                                    word: str) -> None:
    message = error(text)
    assert f"dom.cfg:{line}:" in message and word in message, message


def test_a_refused_file_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(ConfigError):
        parse(f'name = "x"\n__import__("os").system("touch {marker}")\n')
    with pytest.raises(ConfigError):
        parse(f'name = "x"\nmemory = [open("{marker}", "w")]\n')
    assert not marker.exists()


def test_syntax_errors_name_the_line() -> None:
    message = error('name = "x"\nmemory = = 3\n')
    assert "dom.cfg:2:" in message and "syntax" in message.lower()


def test_bounded_input() -> None:
    message = error("#" * (MAX_FILE_BYTES + 1))
    assert "too large" in message
    message = error("name = " + "[" * 5000 + "]" * 5000 + "\n")      # no RecursionError
    assert "dom.cfg" in message


# -- values --------------------------------------------------------------------------------

def test_types_are_checked_per_setting() -> None:
    assert "vcpus" in error('name = "x"\nvcpus = "two"\n')
    assert "dom.cfg:2:" in error('name = "x"\ndisk = "phy:/dev/sda,xvda,w"\n')
    assert "name" in error('memory = 64\n')                         # name is required
    assert "memory" in error('name = "x"\nmemory = 0\n')


def test_tmem_and_workload_point_to_the_yaml_form() -> None:
    for key in ("tmem", "workload"):
        message = error(f'name = "x"\n{key} = {{}}\n')
        assert "dom.cfg:2:" in message and key in message and "YAML" in message


def test_unknown_settings_are_noted_with_a_suggestion() -> None:
    f = parse('name = "x"\nmemroy = 64\n')
    assert f.config == {"name": "x", "memory": 128, "vcpus": 1}
    assert any("memroy" in n and "memory" in n and "dom.cfg:2" in n for n in f.notes)


def test_maxmem_above_memory_is_noted() -> None:
    f = parse('name = "x"\nmemory = 64\nmaxmem = 128\n')
    assert f.config["memory"] == 64
    assert any("maxmem" in n for n in f.notes)


def test_semicolons_comments_and_later_assignments_win() -> None:
    f = parse('name = "a"; memory = 32  # small\nvcpus = 1\nvcpus = 2\n')
    assert f.config == {"name": "a", "memory": 32, "vcpus": 2}


# -- SXP and YAML ----------------------------------------------------------------------------

def test_sxp_domain_file() -> None:
    f = parse("(vm (name s1) (memory 48) (vcpus 2)\n"
              "  (image (linux (kernel /boot/vmlinuz) (root '/dev/xvda1 ro')))\n"
              "  (device (vbd (uname phy:/dev/sda1) (dev xvda1) (mode w))))\n", "s1.sxp")
    assert f.format == "sxp" and f.builder == "linux"
    assert f.config == {"name": "s1", "memory": 48, "vcpus": 2}
    assert any("device" in n or "vbd" in n for n in f.notes)


def test_sxp_hvm_image_and_tmem_pointer() -> None:
    f = parse("(vm (name h1) (memory 64) (image (hvm (kernel /usr/lib/xen/boot/hvmloader))))")
    assert f.builder == "hvm" and any("HVM" in n for n in f.notes)
    message = error("(vm (name t1) (memory 64) (tmem (pools)))")
    assert "tmem" in message and "YAML" in message
    assert "memory" in error("(vm (name t1) (memory lots))")


def test_yaml_files_are_yaml() -> None:
    f = parse("name: y1\nmemory: 32\n", "y1.yaml")
    assert f.format == "yaml" and f.config == {"name": "y1", "memory": 32}
    f = parse("name: y2\nvcpus: 2\n", "y2")                # not Python assignments: YAML
    assert f.format == "yaml" and f.config == {"name": "y2", "vcpus": 2}
