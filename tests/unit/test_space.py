"""Reserving room for managed-save images before a save starts."""

from __future__ import annotations

from guestwarden.supervisor.space import MIB, SpaceBudget, is_local


def budget(free_mib: int, reserve_mib: int = 100) -> SpaceBudget:
    return SpaceBudget("/save", reserve_mib, free=lambda _path: free_mib * MIB)


def test_saves_in_progress_hold_their_room() -> None:
    space = budget(free_mib=1000)
    assert space.try_reserve("a", "qemu:///system", 500 * MIB) is None
    why = space.try_reserve("b", "qemu:///system", 500 * MIB)
    assert why is not None and "needs 500 MiB, 400 MiB available" in why and "/save" in why
    space.release("a")
    assert space.try_reserve("b", "qemu:///system", 500 * MIB) is None


def test_remote_uris_and_unknown_sizes_are_not_checked() -> None:
    space = budget(free_mib=0)
    assert space.try_reserve("a", "qemu+ssh://far/system", 500 * MIB) is None
    assert space.try_reserve("b", "qemu:///system", 0) is None
    assert is_local("qemu+unix:///system?socket=/tmp/x") and not is_local("qemu+tcp://h/system")


def test_an_unreadable_save_dir_turns_the_check_off() -> None:
    def broken(_path: str) -> int:
        raise FileNotFoundError(2, "No such file or directory")

    space = SpaceBudget("/nope", 0, free=broken)
    assert space.try_reserve("a", "qemu:///system", 10 * MIB) is None
