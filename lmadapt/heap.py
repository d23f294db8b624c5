"""Keep freed memory in the process's heap during passes that allocate large tensors.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MB) with a
fresh mmap and returns it to the kernel on free. A batched pass over a large vocabulary
allocates such tensors at every step (dynamic evaluation's statistics at batch 100 on
WikiText-2: logits and their gradient of 100 x 5 x 33,278 floats, 67 MB each), so the
kernel maps, zeroes and unmaps ~230 MB per step: a fifth of that pass's time went to
page faults. `reuse_freed_memory()` tells malloc to take everything from its heap and
not to trim it for the duration, then restores glibc's documented defaults and gives the
memory back (setting them also freezes glibc's self-adjusting mmap threshold where it
stood, which the small allocations of an evaluation do not notice). A no-op where the C
library is not glibc, or when the environment sets LMADAPT_MALLOC_DEFAULTS=1 (leave malloc
as it is: the heap then holds the pass's peak until the pass ends, which a machine short of
memory may not want).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's documented defaults (mallopt(3)), restored after the pass
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc (and not e.g. musl or macOS) has all three
        libc.malloc_trim
        libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    return libc


_depth = 0  # nested uses: only the outermost one sets and restores


@contextlib.contextmanager
def reuse_freed_memory():
    global _depth
    libc = None if os.environ.get("LMADAPT_MALLOC_DEFAULTS") == "1" else _glibc()
    if libc is None:
        yield False
        return
    if _depth == 0:
        libc.mallopt(_M_MMAP_MAX, 0)  # no mmap'd chunks: large blocks come from the heap
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # and stay there while the pass runs
    _depth += 1
    try:
        yield True
    finally:
        _depth -= 1
        if _depth == 0:
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)  # what the pass held goes back to the kernel
