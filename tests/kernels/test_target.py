"""The target's cache sizes come from sysfs, with a fallback where it says nothing."""

from __future__ import annotations

from kernels.target import CACHE_FALLBACK, _cpu_caches, cpu_target


def _index(root, n: int, level: int, kind: str, size: str) -> None:
    d = root / f"index{n}"
    d.mkdir(parents=True)
    for name, text in (("level", f"{level}\n"), ("type", f"{kind}\n"), ("size", f"{size}\n")):
        (d / name).write_text(text)


def test_caches_are_read_from_sysfs(tmp_path):
    _index(tmp_path, 0, 1, "Data", "48K")
    _index(tmp_path, 1, 1, "Instruction", "32K")   # not a data cache
    _index(tmp_path, 2, 2, "Unified", "1280K")
    _index(tmp_path, 3, 3, "Unified", "48M")
    assert _cpu_caches(str(tmp_path)) == (48 << 10, 1280 << 10, 48 << 20)


def test_a_missing_level_is_zero_and_no_sysfs_is_the_fallback(tmp_path):
    _index(tmp_path, 0, 1, "Data", "32K")
    _index(tmp_path, 2, 2, "Unified", "512K")
    assert _cpu_caches(str(tmp_path)) == (32 << 10, 512 << 10, 0)
    assert _cpu_caches(str(tmp_path / "absent")) == CACHE_FALLBACK


def test_this_cpu_is_described():
    t = cpu_target()
    assert t.l1_bytes > 0 and t.l2_bytes >= t.l1_bytes
    assert {"l1_bytes", "l2_bytes"} <= t.to_json().keys() and "registers_per_block" not in t.to_json()
