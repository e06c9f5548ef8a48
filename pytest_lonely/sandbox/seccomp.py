"""A seccomp filter that keeps a container's hands off the terminal pytest runs in.

A container stays in pytest's session, so pytest's terminal is its
controlling terminal too (that is what lets ``--pdb -s`` read it).  Where
``dev.tty.legacy_tiocsti`` is 1 (the default on kernels before 6.2 and on
many since), ``ioctl(TIOCSTI)`` on one's own controlling terminal needs no
capability at all: root inside could push ``rm -rf ~`` into the shell that
started pytest, to run as the user once pytest exits (CVE-2017-5226 was this
hole in bubblewrap, which answered with ``--new-session``).  A new session
would cost the container its terminal, and PID 1 may not lead a process group
(``killpg(1, ...)`` is ``kill(-1, ...)``), so the one call is refused instead,
as Flatpak does: ``TIOCSTI`` and ``TIOCLINUX`` (which can do the same on a
virtual console) fail with ``EPERM``; every other call is untouched.

The filter is built once, at import, for the machine's own system call ABI
and the compat ABIs the kernel accepts from the same process (i386 and x32 on
x86-64, 32-bit ARM on arm64).  A filter can only be added, never removed, and
it is inherited by everything the test starts.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import sys
from typing import Final

from ._syscalls import LIBC

__all__ = ["AVAILABLE", "install"]

_TIOCSTI: Final = 0x5412
_TIOCLINUX: Final = 0x541C

_PR_SET_SECCOMP: Final = 22
_SECCOMP_MODE_FILTER: Final = 2
_RET_ALLOW: Final = 0x7FFF0000
_RET_ERRNO: Final = 0x00050000

_LD_W_ABS: Final = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K: Final = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K: Final = 0x06  # BPF_RET | BPF_K

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
_NR: Final = 0
_ARCH: Final = 4
#: The low 32 bits of args[1] (``ioctl``'s request is an ``unsigned int`` in the kernel).
_ARG1_LOW: Final = 24 if sys.byteorder == "little" else 28

#: ``ioctl``'s number per audit architecture this process may call with.
_IOCTL: Final[dict[str, tuple[tuple[int, tuple[int, ...]], ...]]] = {
    # x86-64 (16, and x32's 514 with its ABI bit), i386 through int 0x80 (54)
    "x86_64": ((0xC000003E, (16, 0x40000000 | 514)), (0x40000003, (54,))),
    # arm64 (29), 32-bit ARM (54)
    "aarch64": ((0xC00000B7, (29,)), (0x40000028, (54,))),
}


def _assemble(arches: tuple[tuple[int, tuple[int, ...]], ...]) -> list[tuple[int, int, int, int]]:
    """The program: for an ``ioctl`` of a known ABI whose request is one of ours, ``EPERM``; else allow.

    Jumps are forward offsets, counted from the next instruction.
    """
    program: list[tuple[int, int, int, int]] = [(_LD_W_ABS, 0, 0, _ARCH)]
    # Layout: per ABI a block [jeq arch; ld nr; jeq nr...; ret allow]; then [ret allow]; then the request check.
    blocks = [2 + len(numbers) + 1 for _, numbers in arches]
    check = sum(blocks) + 1 + 1  # index of the request check: after the arch load, the blocks, the final allow
    for (arch, numbers), size in zip(arches, blocks, strict=True):
        program.append((_JEQ_K, 0, size - 1, arch))  # not this ABI: skip its block
        program.append((_LD_W_ABS, 0, 0, _NR))
        for number in numbers:
            here = len(program)
            program.append((_JEQ_K, check - here - 1, 0, number))
        program.append((_RET_K, 0, 0, _RET_ALLOW))
    program.append((_RET_K, 0, 0, _RET_ALLOW))
    assert len(program) == check
    program += [
        (_LD_W_ABS, 0, 0, _ARG1_LOW),
        (_JEQ_K, 2, 0, _TIOCSTI),
        (_JEQ_K, 1, 0, _TIOCLINUX),
        (_RET_K, 0, 0, _RET_ALLOW),
        (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),
    ]
    return program


class _Filter(ctypes.Structure):
    _fields_ = (("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32))


class _Program(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter)))


_ABIS = _IOCTL.get(platform.machine()) if platform.system() == "Linux" else None
#: Whether this machine's ABI is known here; elsewhere the filter is not installed (and the README says so).
AVAILABLE: Final = _ABIS is not None
_INSTRUCTIONS = _assemble(_ABIS) if _ABIS is not None else []
_ARRAY = (_Filter * len(_INSTRUCTIONS))(*(_Filter(*ins) for ins in _INSTRUCTIONS))
_PROGRAM = _Program(len(_INSTRUCTIONS), ctypes.cast(_ARRAY, ctypes.POINTER(_Filter)))
#: The module imports on every platform (the plugin must load on macOS too); only Linux's libc has prctl.
_prctl = getattr(LIBC, "prctl", None)
if _prctl is not None:
    _prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong)
    _prctl.restype = ctypes.c_int


def install() -> None:
    """Refuse ``TIOCSTI`` and ``TIOCLINUX`` to this process and everything it starts, from now on.

    Needs ``CAP_SYS_ADMIN`` in the caller's user namespace (PID 1 has it in
    its own) or ``no_new_privs``, which we do not set: it would make setuid
    programs inside powerless.  Raises ``OSError`` if the kernel refuses.
    """
    if not AVAILABLE or _prctl is None:
        return
    if _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(_PROGRAM), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): the terminal filter was refused: {errno.errorcode.get(err, err)}")
