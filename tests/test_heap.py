"""lmadapt.heap: inside reuse_freed_memory() a large tensor freed and allocated again reuses
the heap's pages (few page faults) and the heap keeps them; outside, glibc maps fresh zeroed
pages for every such tensor, and leaving the context gives the kept memory back."""

import resource
from pathlib import Path

import pytest
import torch

from lmadapt import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None or not Path("/proc/self/statm").exists(),
                                reason="glibc's malloc on Linux only")

FLOATS = 16 * 2**20  # 64 MB: above glibc's largest mmap threshold (32 MB)
PAGES = FLOATS * 4 // 4096


def faults_of_repeated_allocation(times: int = 8) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        t = torch.empty(FLOATS)
        t.fill_(1.0)  # touch every page
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def resident_pages() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1])


def test_freed_memory_is_reused_inside_and_returned_after():
    assert faults_of_repeated_allocation() > 6 * PAGES  # fresh pages at every one of the 8
    with heap.reuse_freed_memory() as active:
        assert active
        # the heap grows to hold them (over a round or two, as fragmentation allows), then
        # its pages are reused: a later round of 8 touches almost no fresh page
        rounds = [faults_of_repeated_allocation() for _ in range(4)]
        assert rounds[-1] < PAGES // 4, rounds
        held = resident_pages()
    assert resident_pages() < held - PAGES // 2  # given back on leaving


def test_the_environment_can_leave_malloc_alone(monkeypatch):
    monkeypatch.setenv("LMADAPT_MALLOC_DEFAULTS", "1")
    with heap.reuse_freed_memory() as active:
        assert not active
        faults_of_repeated_allocation(2)
        assert faults_of_repeated_allocation() > 6 * PAGES  # still mapped afresh every time


def test_a_nested_use_leaves_the_outer_one_in_force():
    with heap.reuse_freed_memory():
        faults_of_repeated_allocation(2)  # the heap now holds a freed 64 MB block
        held = resident_pages()
        with heap.reuse_freed_memory():
            pass
        assert resident_pages() > held - PAGES // 2  # the inner exit gave nothing back
    assert resident_pages() < held - PAGES // 2  # the outer one did
