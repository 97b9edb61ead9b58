#!/usr/bin/env python3
"""The writer lock's alternatives (issue 13), each measured against LMDB in the same run.

For every candidate lock:

(a) the uncontended lock + unlock pair, ns (median of repeats; wall and CPU);
(b) two forked processes each doing N cycles of lock / increment a shared
    counter / unlock: total ops/s, fairness (first finisher's time / last
    finisher's) and a lost-update check (the counter must end at 2N);
(c) the safety properties a script can check cheaply, PASS/FAIL;
(d) npcalls ``start()`` itself with the candidate in place of the lock
    (``npcalls.single``'s ``_enter``/``_leave`` swapped in this process and
    its writer subprocesses only: npcalls/locking.py is not changed),
    single-process and as two writer processes, against LMDB put in its own
    write transaction and two LMDB writers (bench_core's and targets.py's
    own harnesses); and, with a stopwatch in place of the lock, the time
    ``start()`` holds it, which bounds two writers whatever the lock costs.

Run from the repository root::

    .venv/bin/python bench/bench_locks.py            # about 2 minutes on 2 cores
    .venv/bin/python bench/bench_locks.py --quick    # smoke run
    .venv/bin/python bench/bench_locks.py --json /tmp/locks.json

Candidate 7 (a robust pthread mutex behind a ~50-line C extension) is built
with the system C compiler into a temporary directory, for this run only; it
is left out (with a note) when no compiler or Python.h is found.
See bench/README.md, "bench_locks.py".
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import gc
import importlib.util
import json
import mmap
import os
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import bench_core  # noqa: E402
import targets  # noqa: E402

import npcalls  # noqa: E402
from npcalls import locking  # noqa: E402
from npcalls import single as np_single  # noqa: E402

PY = sys.executable
BUSY = (errno.EAGAIN, errno.EACCES)
SPIN = locking.SPIN_TRIES
_yield = os.sched_yield
F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38          # Linux, every architecture
_FLOCK = locking._FLOCK                                       # struct flock layout (x86-64)
WR = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
UN = struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)
EOWNERDEAD = errno.EOWNERDEAD


def _libc() -> tuple[Any, Any]:
    """libc twice: CDLL (drops the GIL: blocking calls) and PyDLL (keeps it: cheap calls)."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    return ctypes.CDLL(name, use_errno=True), ctypes.PyDLL(name)


LIBC, PLIBC = _libc()


# ====================================================================== candidates

class Handle:
    """One process's handle on a candidate lock."""

    def try_lock(self) -> bool:
        raise NotImplementedError

    def lock_blocking(self) -> None:
        raise NotImplementedError

    def unlock(self) -> None:
        raise NotImplementedError

    def lock(self) -> None:
        """Like npcalls' _lock_ex: one try, SPIN_TRIES tries after sched_yield, then block."""
        t = self.try_lock
        if t():
            return
        for _ in range(SPIN):
            _yield()
            if t():
                return
        self.lock_blocking()

    def pair_loop(self, n: int) -> None:
        """``n`` uncontended lock + unlock pairs, written as tight as the candidate allows."""
        raise NotImplementedError

    # The forms enter()/leave() call: the first try inlined, as npcalls' _lock_ex
    # does, and the unlock as a C-level callable where possible (no extra frame).
    @property
    def fast_lock(self) -> Callable[[], None]:
        return self.lock

    @property
    def fast_unlock(self) -> Callable[[], Any]:
        return self.unlock

    def close(self) -> None:
        pass


class Cand:
    """A lock candidate: ``prepare`` makes its file once; ``attach`` gives a process its handle."""

    key = ""
    title = ""
    file_lock = False           # a lock on a lock file (interoperates with today's lock?)
    compiled = False

    def prepare(self, work: str) -> None:
        self.path = os.path.join(work, f"{self.key}.lock")
        _unlink(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def attach(self) -> Handle:
        raise NotImplementedError


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _open_fd(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


class _FdHandle(Handle):
    """The file-lock candidates: ``try_call`` raises EAGAIN/EACCES when busy."""

    def __init__(self, fd: int, try_call: Callable[[], Any], block_call: Callable[[], Any],
                 unlock_call: Callable[[], Any], loop: Callable[[int], None]) -> None:
        self.fd = fd
        self._try, self.lock_blocking, self.unlock, self.pair_loop = \
            try_call, block_call, unlock_call, loop

    def try_lock(self) -> bool:
        try:
            self._try()
            return True
        except OSError as e:
            if e.errno not in BUSY:
                raise
            return False

    @property
    def fast_lock(self) -> Callable[[], None]:
        t, slow = self._try, self.lock

        def lock() -> None:
            try:
                t()
            except OSError as e:
                if e.errno not in BUSY:
                    raise
                slow()
        return lock

    def close(self) -> None:
        os.close(self.fd)


class Lockf(Cand):
    key, title, file_lock = "lockf", "1. fcntl.lockf LOCK_EX|LOCK_NB / LOCK_UN (today)", True

    def attach(self) -> Handle:
        fd = _open_fd(self.path)
        f, ex, un = fcntl.lockf, fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_UN

        def loop(n: int) -> None:
            for _ in range(n):
                f(fd, ex)
                f(fd, un)
        p = functools.partial
        return _FdHandle(fd, p(f, fd, ex), p(f, fd, fcntl.LOCK_EX), p(f, fd, un), loop)


class EnterLeave(Cand):
    key, title, file_lock = "enter", "1b. npcalls.locking.enter/leave (today, thread lock incl.)", True

    def attach(self) -> Handle:
        return _EnterHandle(locking.WriterLock(self.path))


class _EnterHandle(Handle):
    """npcalls' own writer lock: enter/leave for the hot paths, acquire(timeout=0) to try."""

    def __init__(self, wl: locking.WriterLock) -> None:
        self.wl = wl
        lf = wl.lock_file
        e, le = locking.enter, locking.leave

        def loop(n: int) -> None:
            for _ in range(n):
                e(lf)
                le(lf)
        self.pair_loop = loop               # type: ignore[method-assign]
        self.lock = functools.partial(e, lf)    # type: ignore[method-assign]  # spins itself
        self.unlock = functools.partial(le, lf)  # type: ignore[method-assign]

    def try_lock(self) -> bool:
        try:
            self.wl.acquire(timeout=0)
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.wl.close()


_LOCK_EX_TODAY = locking._lock_ex
_MAIN_PID = os.getpid()


class FcntlBytes(Cand):
    key, title, file_lock = "fcntl", "2. fcntl.fcntl F_SETLK(W), prebuilt struct flock", True

    def attach(self) -> Handle:
        fd = _open_fd(self.path)
        f, setlk = fcntl.fcntl, fcntl.F_SETLK

        def loop(n: int) -> None:
            for _ in range(n):
                f(fd, setlk, WR)
                f(fd, setlk, UN)
        p = functools.partial
        return _FdHandle(fd, p(f, fd, setlk, WR), p(f, fd, fcntl.F_SETLKW, WR), p(f, fd, setlk, UN),
                         loop)


class OsLockf(Cand):
    key, title, file_lock = "oslockf", "3. os.lockf F_TLOCK / F_ULOCK (libc lockf)", True

    def attach(self) -> Handle:
        fd = _open_fd(self.path)
        f, tl, ul = os.lockf, os.F_TLOCK, os.F_ULOCK

        def loop(n: int) -> None:
            for _ in range(n):
                f(fd, tl, 0)
                f(fd, ul, 0)
        p = functools.partial
        return _FdHandle(fd, p(f, fd, tl, 0), p(f, fd, os.F_LOCK, 0), p(f, fd, ul, 0), loop)


class Ofd(Cand):
    key, title, file_lock = "ofd", "4. OFD lock F_OFD_SETLK(W) (37/38), prebuilt struct", True

    def attach(self) -> Handle:
        fd = _open_fd(self.path)
        f = fcntl.fcntl

        def loop(n: int) -> None:
            for _ in range(n):
                f(fd, F_OFD_SETLK, WR)
                f(fd, F_OFD_SETLK, UN)
        p = functools.partial
        return _FdHandle(fd, p(f, fd, F_OFD_SETLK, WR), p(f, fd, F_OFD_SETLKW, WR),
                         p(f, fd, F_OFD_SETLK, UN), loop)


class _Shm(Cand):
    """A candidate living in a shared-memory file (a page of /dev/shm or the work dir)."""

    def prepare(self, work: str) -> None:
        self.path = os.path.join(work, f"{self.key}.shm")
        _unlink(self.path)                  # a fresh word: a dead holder may have left it taken
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, mmap.PAGESIZE)
        os.close(fd)

    def _map(self) -> tuple[mmap.mmap, Any, int]:
        fd = _open_fd(self.path)
        mm = mmap.mmap(fd, mmap.PAGESIZE)
        os.close(fd)
        buf = (ctypes.c_char * mmap.PAGESIZE).from_buffer(mm)
        return mm, buf, ctypes.addressof(buf)


def _init_robust_mutex(addr: int) -> None:
    attr = ctypes.create_string_buffer(64)       # pthread_mutexattr_t is 4 bytes on glibc
    for fn, *args in (("pthread_mutexattr_init",), ("pthread_mutexattr_setpshared", 1),
                      ("pthread_mutexattr_setrobust", 1)):
        r = getattr(LIBC, fn)(attr, *args)
        if r:
            raise OSError(r, f"{fn}: {os.strerror(r)}")
    r = LIBC.pthread_mutex_init(ctypes.c_void_p(addr), attr)
    if r:
        raise OSError(r, f"pthread_mutex_init: {os.strerror(r)}")


class _MutexHandle(Handle):
    def __init__(self, mm: mmap.mmap, buf: Any, addr: int) -> None:
        self.mm, self.buf = mm, buf
        self.p = p = ctypes.c_void_p(addr)
        tl, ul = PLIBC.pthread_mutex_trylock, PLIBC.pthread_mutex_unlock
        self._tl, self._ul, self._lk = tl, ul, LIBC.pthread_mutex_lock
        self.recovered = 0

        def loop(n: int) -> None:
            for _ in range(n):
                tl(p)
                ul(p)
        self.pair_loop = loop               # type: ignore[method-assign]

    def try_lock(self) -> bool:
        r = self._tl(self.p)
        if r == 0:
            return True
        if r == errno.EBUSY:
            return False
        if r == EOWNERDEAD:                 # the holder died: ours now, after marking it usable
            self.recovered += 1
            LIBC.pthread_mutex_consistent(self.p)
            return True
        raise OSError(r, os.strerror(r))

    @property
    def fast_lock(self) -> Callable[[], None]:
        tl, p, slow, consistent = self._tl, self.p, self.lock, LIBC.pthread_mutex_consistent

        def lock() -> None:
            r = tl(p)
            if r:
                if r == EOWNERDEAD:         # ours, from a holder that died
                    consistent(p)
                else:
                    slow()
        return lock

    @property
    def fast_unlock(self) -> Callable[[], Any]:
        return functools.partial(self._ul, self.p)

    def lock_blocking(self) -> None:
        r = self._lk(self.p)
        if r == EOWNERDEAD:
            self.recovered += 1
            LIBC.pthread_mutex_consistent(self.p)
        elif r:
            raise OSError(r, os.strerror(r))

    def unlock(self) -> None:
        r = self._ul(self.p)
        if r:
            raise OSError(r, os.strerror(r))

    def close(self) -> None:
        del self.buf
        self.mm.close()


class PthreadCtypes(_Shm):
    key, title = "pthread", "5. robust pshared pthread mutex in shm, via ctypes"

    def prepare(self, work: str) -> None:
        super().prepare(work)
        mm, buf, addr = self._map()
        _init_robust_mutex(addr)
        del buf
        mm.close()

    def attach(self) -> Handle:
        return _MutexHandle(*self._map())


def _atomic() -> Any:
    """libatomic's out-of-line compare-and-swap, the one CAS reachable without a compiler."""
    name = ctypes.util.find_library("atomic")
    if not name:
        return None
    lib = ctypes.PyDLL(name)
    f = lib.__atomic_compare_exchange_4
    f.restype = ctypes.c_bool
    return f


CAS = _atomic()
SEQ_CST = 5
WAITERS = 1 << 31
SYS_FUTEX, FUTEX_WAIT, FUTEX_WAKE = 202, 0, 1                 # x86-64


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _FutexHandle(Handle):
    """A futex word: 0 free, else the holder's pid (| WAITERS when someone sleeps on it).

    Not robust: nothing clears the word when its holder dies (that needs the
    kernel's robust-futex list, which glibc owns per thread); the pid in the
    word would let a waiter test the holder's liveness, at the price of pid
    reuse and of kill(pid, 0) failing across users.
    """

    def __init__(self, mm: mmap.mmap, buf: Any, addr: int) -> None:
        self.mm, self.buf = mm, buf
        self.p = p = ctypes.c_void_p(addr)
        self.word = memoryview(mm).cast("I")
        self.me = me = os.getpid()
        self.exp = exp = ctypes.c_uint32(0)
        self.pexp = pexp = ctypes.byref(exp)
        self.cme = ctypes.c_uint32(me)
        self.ts = _Timespec(0, 10_000_000)
        cas = CAS

        def loop(n: int) -> None:
            for _ in range(n):
                exp.value = 0
                cas(p, pexp, me, SEQ_CST, SEQ_CST)
                exp.value = me
                cas(p, pexp, 0, SEQ_CST, SEQ_CST)
        self.pair_loop = loop               # type: ignore[method-assign]

    def _cas(self, old: int, new: int) -> bool:
        self.exp.value = old
        return CAS(self.p, self.pexp, new, SEQ_CST, SEQ_CST)

    def try_lock(self) -> bool:
        return self._cas(0, self.me)

    @property
    def fast_lock(self) -> Callable[[], None]:
        exp, p, pexp, me, slow = self.exp, self.p, self.pexp, self.me, self.lock

        def lock() -> None:
            exp.value = 0
            if not CAS(p, pexp, me, SEQ_CST, SEQ_CST):
                slow()
        return lock

    def lock_blocking(self) -> None:
        me = self.me
        while True:
            v = self.word[0]
            if v == 0:
                if self._cas(0, me | WAITERS):      # others may still sleep: keep the flag
                    return
                continue
            if not v & WAITERS and not self._cas(v, v | WAITERS):
                continue
            LIBC.syscall(ctypes.c_long(SYS_FUTEX), self.p, ctypes.c_int(FUTEX_WAIT),
                         ctypes.c_uint32(v | WAITERS), ctypes.byref(self.ts), None, None)

    def unlock(self) -> None:
        if self._cas(self.me, 0):
            return
        if self._cas(self.me | WAITERS, 0):
            LIBC.syscall(ctypes.c_long(SYS_FUTEX), self.p, ctypes.c_int(FUTEX_WAKE),
                         ctypes.c_int(1), None, None, None)
            return
        raise OSError(errno.EPERM, "futex lock not held by this process")

    def close(self) -> None:
        self.word.release()
        del self.buf
        self.mm.close()


class FutexCtypes(_Shm):
    key, title = "futex", "6. futex word: libatomic CAS + SYS_futex, via ctypes"

    def attach(self) -> Handle:
        return _FutexHandle(*self._map())


# ---- candidate 7: the same robust mutex behind a tiny C extension

_CEXT_SRC = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>

/* A robust, process-shared pthread mutex in shared memory (initialised by the
   caller); one per process here, an object per table in a real extension. */
static pthread_mutex_t *mx;

static PyObject *fail(int r) { errno = r; return PyErr_SetFromErrno(PyExc_OSError); }

static PyObject *bind(PyObject *self, PyObject *addr) {
    mx = (pthread_mutex_t *)PyLong_AsVoidPtr(addr);
    if (mx == NULL && PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}
static PyObject *trylock(PyObject *self, PyObject *unused) {
    int r = pthread_mutex_trylock(mx);
    if (r == 0) Py_RETURN_TRUE;
    if (r == EBUSY) Py_RETURN_FALSE;
    if (r == EOWNERDEAD) { pthread_mutex_consistent(mx); Py_RETURN_TRUE; }
    return fail(r);
}
static PyObject *lock(PyObject *self, PyObject *unused) {
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = pthread_mutex_lock(mx);
    Py_END_ALLOW_THREADS
    if (r == EOWNERDEAD) { pthread_mutex_consistent(mx); r = 0; }
    if (r) return fail(r);
    Py_RETURN_NONE;
}
static PyObject *unlock(PyObject *self, PyObject *unused) {
    int r = pthread_mutex_unlock(mx);
    if (r) return fail(r);
    Py_RETURN_NONE;
}
static PyMethodDef methods[] = {
    {"bind", bind, METH_O, NULL}, {"trylock", trylock, METH_NOARGS, NULL},
    {"lock", lock, METH_NOARGS, NULL}, {"unlock", unlock, METH_NOARGS, NULL}, {NULL}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_bench_robust_mutex", NULL, -1, methods};
PyMODINIT_FUNC PyInit__bench_robust_mutex(void) { return PyModule_Create(&mod); }
"""


def build_cext(work: str) -> tuple[str | None, str]:
    """Compile the extension into ``work``; (module file or None, why not)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    inc = sysconfig.get_paths()["include"]
    if not cc:
        return None, "no C compiler"
    if not os.path.exists(os.path.join(inc, "Python.h")):
        return None, f"no Python.h in {inc}"
    src = os.path.join(work, "_bench_robust_mutex.c")
    with open(src, "w") as f:
        f.write(_CEXT_SRC)
    out = os.path.join(work, "_bench_robust_mutex" + sysconfig.get_config_var("EXT_SUFFIX"))
    r = subprocess.run([cc, "-O2", "-shared", "-fPIC", f"-I{inc}", src, "-o", out, "-pthread"],
                       capture_output=True, text=True)
    if r.returncode:
        return None, f"compile failed: {r.stderr.strip()[:200]}"
    return out, ""


def _load_cext(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("_bench_robust_mutex", path)
    m = importlib.util.module_from_spec(spec)       # type: ignore[arg-type]
    spec.loader.exec_module(m)                      # type: ignore[union-attr]
    return m


class _CextHandle(Handle):
    def __init__(self, mod: Any, mm: mmap.mmap, buf: Any, addr: int) -> None:
        self.mm, self.buf = mm, buf
        mod.bind(addr)
        self.try_lock = mod.trylock             # type: ignore[method-assign]
        self.lock_blocking = mod.lock           # type: ignore[method-assign]
        self.unlock = mod.unlock                # type: ignore[method-assign]
        tl, ul = mod.trylock, mod.unlock

        def loop(n: int) -> None:
            for _ in range(n):
                tl()
                ul()
        self.pair_loop = loop                   # type: ignore[method-assign]

    @property
    def fast_lock(self) -> Callable[[], None]:
        tl, slow = self.try_lock, self.lock

        def lock() -> None:
            if not tl():
                slow()
        return lock

    def close(self) -> None:
        del self.buf
        self.mm.close()


class PthreadCext(PthreadCtypes):
    key, title, compiled = "cext", "7. robust pshared pthread mutex, ~50-line C extension", True
    so = ""

    def attach(self) -> Handle:
        return _CextHandle(_load_cext(self.so), *self._map())


class _NullHandle(Handle):
    def try_lock(self) -> bool:
        return True

    def lock_blocking(self) -> None:
        pass

    def unlock(self) -> None:
        pass

    def pair_loop(self, n: int) -> None:
        f = self.unlock
        for _ in range(n):
            f()
            f()


class _StopwatchHandle(_NullHandle):
    """No lock either: times what start() does between enter and leave (the critical section)."""

    def __init__(self) -> None:
        self.total = self.count = self.t = 0
        clock = time.perf_counter_ns

        def lock() -> None:
            self.t = clock()

        def unlock() -> None:
            self.total += clock() - self.t
            self.count += 1
        self.lock, self.unlock = lock, unlock      # type: ignore[method-assign]


def critical_section_ns(T: Any, keys: list[str]) -> float:
    """Mean ns that one start() of a new key spends between taking and dropping the lock."""
    h = _StopwatchHandle()
    swap_lock(h)
    try:
        bench_core.single_op_loops(T, {}, None)["np_start"](keys)
    finally:
        swap_lock(None)
        T.remove_many(keys)
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(10_000):                 # the stopwatch's own cost, taken off
        clock()
    own = (clock() - t0) / 10_000
    return h.total / h.count - own


class NoLock(Cand):
    """Not a lock: two no-op calls, the floor any lock's start() could reach."""

    key, title = "none", "0. no lock at all (floor; excludes nobody)"

    def attach(self) -> Handle:
        return _NullHandle()


def candidates(cext_so: str | None) -> list[Cand]:
    cs: list[Cand] = [NoLock(), Lockf(), EnterLeave(), FcntlBytes(), OsLockf(), Ofd(),
                      PthreadCtypes()]
    if CAS is not None:
        cs.append(FutexCtypes())
    if cext_so:
        c = PthreadCext()
        c.so = cext_so
        cs.append(c)
    return cs


# ====================================================================== (a) lock pair

def _pair_once(h: Handle, n: int) -> tuple[float, float]:
    """ns per uncontended lock + unlock pair over ``n`` pairs: (wall, CPU)."""
    gc.collect()
    gc.disable()
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        h.pair_loop(n)
        t1, c1 = time.perf_counter(), time.process_time()
    finally:
        gc.enable()
    return (t1 - t0) / n * 1e9, (c1 - c0) / n * 1e9


def pair_costs(cs: list[Cand], n: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Median ns of one uncontended pair per candidate; the candidates take turns in
    every repeat, so a change of the machine's load hits them all alike."""
    hs = {c.key: c.attach() for c in cs}
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in hs}
    try:
        for h in hs.values():
            h.pair_loop(min(n, 2000))       # warm
        for _ in range(repeats):
            for k, h in hs.items():
                runs[k].append(_pair_once(h, n))
    finally:
        for h in hs.values():
            h.close()
    return {k: {"wall_ns": statistics.median(w for w, _ in v),
                "cpu_ns": statistics.median(c for _, c in v), "wall_all": [w for w, _ in v]}
            for k, v in runs.items()}


# ====================================================================== (b) two processes

def contend(c: Cand, n: int) -> dict[str, Any]:
    """Two forked processes, ``n`` lock / counter += 1 / unlock cycles each."""
    shared = mmap.mmap(-1, 4096)            # MAP_SHARED | MAP_ANONYMOUS: seen by both children
    mv = memoryview(shared).cast("q")
    go = time.perf_counter_ns() + 300_000_000       # CLOCK_MONOTONIC: one clock for both
    pids = []
    for w in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                h = c.attach()
                lock, unlock = h.fast_lock, h.fast_unlock
                while time.perf_counter_ns() < go:
                    time.sleep(0.0005)
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    lock()
                    mv[0] = mv[0] + 1       # read-modify-write: lost updates if not exclusive
                    unlock()
                mv[2 + 2 * w], mv[3 + 2 * w] = t0, time.perf_counter_ns()
                code = 0
            except BaseException as e:      # reported by the exit code
                sys.stderr.write(f"{c.key} worker {w}: {e!r}\n")
            finally:
                os._exit(code)
        pids.append(pid)
    codes = [_reap(p, 120) for p in pids]
    count = mv[0]
    t0s, t1s = [mv[2], mv[4]], [mv[3], mv[5]]
    mv.release()
    shared.close()
    if any(codes):
        return {"error": f"worker exit codes {codes}"}
    els = [b - a for a, b in zip(t0s, t1s)]
    return {"ops_per_s": 2 * n / ((max(t1s) - min(t0s)) / 1e9),
            "fairness": min(els) / max(els), "exclusive": count == 2 * n, "count": count}


def _reap(pid: int, timeout: float) -> int:
    """Exit status of child ``pid``, SIGKILLing it after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        p, st = os.waitpid(pid, os.WNOHANG)
        if p:
            return os.waitstatus_to_exitcode(st)
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            _, st = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(st)
        time.sleep(0.002)


# ====================================================================== (c) safety

def _read_int(r: int, timeout: float) -> int | None:
    if not select.select([r], [], [], timeout)[0]:
        return None
    b = os.read(r, 8)
    return struct.unpack("q", b)[0] if len(b) == 8 else None


def _child(fn: Callable[[], int | None], w: int) -> None:
    """In a forked child: run ``fn``, send its int to ``w``, then wait to be killed or exit."""
    code = 1
    try:
        v = fn()
        os.write(w, struct.pack("q", -1 if v is None else v))
        code = 0
    except BaseException as e:
        sys.stderr.write(f"safety child: {e!r}\n")
    finally:
        os._exit(code)


def check_kill(c: Cand, keep_child: bool, limit_ms: float) -> tuple[str, float | None]:
    """SIGKILL the holder (optionally after it forked a child that lives on): does the lock free up?"""
    r, w = os.pipe()
    kids: list[int] = []
    try:
        pid = os.fork()
        if pid == 0:
            def hold() -> int:
                h = c.attach()
                h.lock()
                g = 0
                if keep_child:              # a worker forked while the lock was held
                    g = os.fork()
                    if g == 0:
                        time.sleep(60)
                        os._exit(0)
                os.write(w, struct.pack("q", g))
                time.sleep(60)
                return 0
            _child(hold, w)
        kids.append(pid)
        g = _read_int(r, 10)
        if g is None:
            return "ERROR", None
        if g:
            kids.append(g)
        h = c.attach()
        try:
            if h.try_lock():
                return "FAIL (not held)", None
            os.kill(pid, signal.SIGKILL)
            t0 = time.perf_counter()
            while not h.try_lock():
                if (time.perf_counter() - t0) * 1e3 > limit_ms:
                    return f"FAIL (held >{limit_ms:.0f} ms)", None
                time.sleep(0.0002)
            ms = (time.perf_counter() - t0) * 1e3
            h.unlock()
            return f"PASS {ms:.1f} ms", ms
        finally:
            h.close()
    finally:
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if kids:
            _reap(kids[0], 10)          # the grandchild went to init (or a subreaper)
        os.close(r)
        os.close(w)


def check_fork(c: Cand) -> tuple[str, str]:
    """Holder forks a child: may the child lock through the inherited handle?
    Does the child's unlock release the parent's lock?"""
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            def holder() -> int:
                h = c.attach()
                h.lock()
                r2, w2 = os.pipe()
                k = os.fork()
                if k == 0:
                    def child() -> int:
                        got = h.try_lock()
                        try:
                            h.unlock()
                        except Exception:       # not the owner: refused, which is right
                            pass
                        return int(got)
                    _child(child, w2)
                got = _read_int(r2, 10)
                _reap(k, 10)
                t = os.fork()
                if t == 0:
                    def third() -> int:
                        h3 = c.attach()
                        return int(h3.try_lock())
                    _child(third, w2)
                free = _read_int(r2, 10)
                _reap(t, 10)
                return (got or 0) * 2 + (free or 0) if got is not None and free is not None else -9
            _child(holder, w)
        v = _read_int(r, 30)
        _reap(pid, 10)
    finally:
        os.close(r)
        os.close(w)
    if v is None or v < 0:
        return "ERROR", "ERROR"
    got, free = v >> 1, v & 1
    return ("FAIL (child locks too)" if got else "PASS",
            "FAIL (parent's lock gone)" if free else "PASS")


def check_interop(c: Cand) -> str:
    """A holder of the candidate lock: does today's lockf writer (another process) stay out?"""
    if not c.file_lock:
        return "no (other mechanism)"
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            def hold() -> int:
                h = c.attach()
                h.lock()
                os.write(w, struct.pack("q", 1))
                time.sleep(60)
                return 0
            _child(hold, w)
        if _read_int(r, 10) is None:
            return "ERROR"
        fd = _open_fd(c.path)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            ok = False
        except OSError as e:
            if e.errno not in BUSY:
                raise
            ok = True
        finally:
            os.close(fd)
        os.kill(pid, signal.SIGKILL)
        _reap(pid, 10)
        return "PASS" if ok else "FAIL"
    finally:
        os.close(r)
        os.close(w)


# ====================================================================== (d) start() with it

def _patched(h: Handle) -> tuple[Callable[[Any], None], Callable[[Any], None]]:
    """locking.enter/leave with the candidate in place of the file lock (same shape)."""
    lock, unlock = h.fast_lock, h.fast_unlock

    def enter(lf: Any) -> None:
        lf.rlock.acquire()
        if lf.depth == 0:
            try:
                lock()
            except BaseException:
                lf.rlock.release()
                raise
        lf.depth += 1

    def leave(lf: Any) -> None:
        lf.depth -= 1
        if lf.depth == 0:
            unlock()        # ctypes mutex: its return code goes unchecked here (one compare)
        lf.rlock.release()
    return enter, leave


def swap_lock(h: Handle | None) -> None:
    """Make npcalls' single-key writes use ``h`` (None: the real lock again)."""
    locking._lock_ex = _LOCK_EX_TODAY
    if h is None or isinstance(h, _EnterHandle):
        np_single._enter, np_single._leave = locking.enter, locking.leave
    else:
        np_single._enter, np_single._leave = _patched(h)


def start_costs(T: Any, env: Any, cs: list[Cand],
                runs: list[list[str]]) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) ns per op of LMDB put, today's start() and start() with each candidate.

    Every run's keys go through each contender in turn (bench_core's loops;
    the keys are removed again after each, not timed), so all see the same
    keys at the same load factor and the same machine load.
    """
    start = bench_core.single_op_loops(T, {}, None)["np_start"]
    lput = bench_core.single_op_loops(None, {}, env)["l_put"]
    hs = {c.key: c.attach() for c in cs if c.key != "enter"}
    out: dict[str, list[tuple[float, float]]] = {"lmdb put": [], "today": [], **{k: [] for k in hs}}

    def per_op(fn: Callable[[], Any], n: int) -> tuple[float, float]:
        # as bench_core.timed (cyclic GC collected first, then off), CPU time too
        gc.collect()
        gc.disable()
        try:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
        finally:
            gc.enable()
        return (t1 - t0) / n * 1e9, (c1 - c0) / n * 1e9
    try:
        for ks in runs:
            kb = [k.encode() for k in ks]
            out["lmdb put"].append(per_op(lambda: lput(kb), len(kb)))
            with env.begin(write=True) as txn:
                for k in kb:
                    txn.delete(k)
            for k, h in [("today", None), *hs.items()]:
                swap_lock(h)
                try:
                    out[k].append(per_op(lambda: start(ks), len(ks)))
                finally:
                    swap_lock(None)
                T.remove_many(ks)
    finally:
        for h in hs.values():
            h.close()
    return out


def _med(v: list[tuple[float, float]], i: int) -> float:
    return statistics.median(x[i] for x in v)


_WRITER = """
    import json, sys, time
    sys.path.insert(0, "bench")
    sys.modules["pandas"] = None        # bench_core's optional peer: not needed, slow to import
    import bench_locks as B
    import npcalls
    key, path, table, so, w, n, go = sys.argv[1:8]
    c = {x.key: x for x in B.candidates(so or None)}[key]
    c.path = path
    B.swap_lock(c.attach())
    keys = [f"w{w}-{i}-a84b4c76e66710@pc33.example.com" for i in range(int(n))]
    t = npcalls.CallTable.open(table)
    ts = 1_700_000_000_000_000_000
    while time.time() < float(go):
        time.sleep(0.001)
    t0 = time.perf_counter()
    for k in keys:
        t.start(k, ts)
    dt = time.perf_counter() - t0
    t.close()
    print(json.dumps({"seconds": dt, "ops": len(keys)}))
"""


def writers_with(c: Cand, n: int, table: str) -> float:
    """Ops/s of two writer processes doing start() with candidate ``c`` as the lock."""
    go = time.time() + 1.5
    so = getattr(c, "so", "")
    ps = [subprocess.Popen([PY, "-c", textwrap.dedent(_WRITER), c.key, c.path, table, so, str(w),
                            str(n), str(go)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
          for w in range(2)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ps]
    if any(p.returncode for p in ps):
        raise RuntimeError(f"a {c.key} writer failed")
    return 2 * n / max(o["seconds"] for o in outs)


# ====================================================================== run + report

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--pairs", type=int, default=20_000, help="lock pairs per repeat (a)")
    ap.add_argument("--repeats", type=int, default=7, help="repeats of (a) and of start()")
    ap.add_argument("--cycles", type=int, default=20_000, help="cycles per process (b)")
    ap.add_argument("--writer-ops", type=int, default=20_000, help="start() per writer (d)")
    ap.add_argument("--rounds", type=int, default=3, help="two-writer rounds (median) (d)")
    ap.add_argument("--preload", type=int, default=200_000,
                    help="keys in the table and the LMDB database before single ops")
    ap.add_argument("--kill-limit-ms", type=float, default=1000.0,
                    help="a SIGKILLed holder's lock must be free within this (c)")
    ap.add_argument("--no-cext", action="store_true", help="skip candidate 7 (C extension)")
    ap.add_argument("--json", help="also write every figure here")
    a = ap.parse_args(argv)
    if a.quick:
        a.pairs, a.repeats, a.cycles, a.writer_ops, a.rounds, a.preload = \
            5_000, 3, 5_000, 5_000, 1, 50_000
    if bench_core.lmdb is None:
        ap.error("py-lmdb is missing: install the dev extras (pip install -e '.[dev]')")
    # SIGTERM unwinds like Ctrl-C, so the tables, LMDB and lock files below are removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work = tempfile.mkdtemp(prefix="npcalls-bench-locks-", dir="/dev/shm"
                            if os.path.isdir("/dev/shm") else None)
    res = bench_core.Resources()
    res.prefix = f"bench-locks-{os.getpid()}"
    snap0, load0, t_start = bench_core.cpu_snapshot(), bench_core.loadavg(), time.perf_counter()
    out: dict[str, Any] = {"args": vars(a), "cands": {}}
    say = bench_core.say
    try:
        so, why = (None, "--no-cext") if a.no_cext else build_cext(work)
        cs = candidates(so)
        for c in cs:
            c.prepare(work)
        say(f"bench_locks: npcalls {bench_core.git_state()}, Python {sys.version.split()[0]}, "
            f"{os.cpu_count()} CPUs, load average {load0}")
        if not so:
            say(f"  candidate 7 (C extension) left out: {why}")
        if CAS is None:
            say("  candidate 6 left out: no libatomic (no compare-and-swap reachable from ctypes)")

        # (a) the pair, candidates taking turns
        say("(a) uncontended lock pairs ...")
        pairs = pair_costs(cs, a.pairs, a.repeats)

        # (d1) start() and LMDB put, on a table / database of --preload keys, taking turns
        say("(d) start() with each candidate, LMDB put ...")
        m = max(1000, a.writer_ops // 2)
        pool = bench_core.make_call_ids(a.preload + m * a.repeats, 20240601)
        pre, fresh = pool[:a.preload], pool[a.preload:]
        runs = [fresh[i * m:(i + 1) * m] for i in range(a.repeats)]
        T, _, _ = res.new_table(2 * a.preload)
        T.start_many(pre, bench_core.TS0)
        env = res.new_lmdb()
        with env.begin(write=True) as txn:
            txn.cursor().putmulti([(k.encode(), b"\0" * 16) for k in pre])
        single = start_costs(T, env, cs, runs)
        crit = critical_section_ns(T, runs[0])
        lmdb_put, start_today = _med(single["lmdb put"], 0), _med(single["today"], 0)
        say(f"  LMDB put {lmdb_put:,.0f} ns, npcalls start() {start_today:,.0f} ns "
            f"({start_today / lmdb_put:.2f}x)")

        # (d2) two writers: LMDB and today's npcalls (targets.py's harness), then each
        # candidate swapped in (the same shape of process), alternating in every round
        say("(d) two writer processes: LMDB, npcalls today, each candidate ...")
        two: dict[str, list[float]] = {"lmdb": [], "npcalls": [],
                                       **{c.key: [] for c in cs if c.key not in ("none", "enter")}}
        for r in range(a.rounds):
            for k in two:
                tn = f"{res.prefix}-w-{k}-{r}"
                if k == "lmdb":
                    where = os.path.join(work, f"lmdb-w-{r}")
                    os.makedirs(where)
                    two[k].append(targets._writers("lmdb", where, a.writer_ops, 2))
                    shutil.rmtree(where, ignore_errors=True)
                    continue
                npcalls.CallTable.create(tn, capacity=8 * a.writer_ops, key_width=64).close()
                try:
                    if k == "npcalls":
                        two[k].append(targets._writers("npcalls", tn, a.writer_ops, 2))
                    else:
                        two[k].append(writers_with(next(c for c in cs if c.key == k),
                                                   a.writer_ops, tn))
                finally:
                    npcalls.CallTable.unlink(tn)
        lmdb2, np2 = statistics.median(two["lmdb"]), statistics.median(two["npcalls"])
        say(f"  LMDB {lmdb2:,.0f} ops/s, npcalls start() {np2:,.0f} ops/s ({np2 / lmdb2:.2f}x)")
        out["peers"] = {"lmdb_put_ns": lmdb_put, "lmdb_put_cpu_ns": _med(single["lmdb put"], 1),
                        "lmdb_put_all": single["lmdb put"], "start_today_ns": start_today,
                        "start_today_cpu_ns": _med(single["today"], 1),
                        "start_today_all": single["today"],
                        "two_writers": two, "lmdb_two_writers": lmdb2, "npcalls_two_writers": np2,
                        "crit_ns": crit}

        for c in cs:
            say(f"(b), (c): {c.title} ...")
            d: dict[str, Any] = {"title": c.title, "compiled": c.compiled, "pair": pairs[c.key]}
            c.prepare(work)
            d["contend"] = contend(c, a.cycles)
            if c.key in single:
                d["start_ns"], d["start_cpu_ns"] = _med(single[c.key], 0), _med(single[c.key], 1)
                d["start_all"] = single[c.key]
            if c.key in two:
                d["two_writers"] = statistics.median(two[c.key])
                d["two_writers_all"] = two[c.key]
            out["cands"][c.key] = d
            if c.key == "none":
                continue
            # last: a killed holder may leave a non-robust lock taken (a fresh file each)
            for name, check in (("kill", lambda: check_kill(c, False, a.kill_limit_ms)[0]),
                                ("kill_child", lambda: check_kill(c, True, a.kill_limit_ms)[0]),
                                ("fork", lambda: check_fork(c)), ("interop", lambda: check_interop(c))):
                c.prepare(work)
                d[name] = check()
            d["fork_lock"], d["fork_unlock"] = d.pop("fork")
            out["cands"][c.key] = d
        snap1 = bench_core.cpu_snapshot()
    finally:
        res.cleanup()
        shutil.rmtree(work, ignore_errors=True)

    busy = bench_core.other_load(snap0, snap1)
    elapsed = time.perf_counter() - t_start
    out["machine"] = {"load_start": load0, "load_end": bench_core.loadavg(),
                      "other_cpus_busy": busy[0] if busy else None, "elapsed_s": elapsed}
    report(out, a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def report(out: dict[str, Any], a: argparse.Namespace) -> None:
    say = bench_core.say
    p = out["peers"]
    lput, lm2, lput_cpu = p["lmdb_put_ns"], p["lmdb_two_writers"], p["lmdb_put_cpu_ns"]
    m = out["machine"]
    say()
    say(f"WRITER LOCK CANDIDATES, one run ({m['elapsed_s']:.0f} s; load average at start "
        f"{m['load_start']}, at end {m['load_end']}; other processes kept "
        + (f"{m['other_cpus_busy']:.2f}" if m["other_cpus_busy"] is not None else "?")
        + f" of {os.cpu_count()} CPUs busy)")
    say(f"peers: LMDB put in own write txn {lput:,.0f} ns (CPU {lput_cpu:,.0f}); two LMDB writers "
        f"{lm2:,.0f} ops/s; npcalls start() today {p['start_today_ns']:,.0f} ns "
        f"({p['start_today_ns'] / lput:.2f}x put; CPU {p['start_today_cpu_ns']:,.0f}, "
        f"{p['start_today_cpu_ns'] / lput_cpu:.2f}x), "
        f"two npcalls writers today {p['npcalls_two_writers']:,.0f} ops/s "
        f"({p['npcalls_two_writers'] / lm2:.2f}x)")
    say()
    say(f"(a) uncontended pair, (b) 2 processes x {a.cycles:,} lock/counter+=1/unlock cycles "
        "(lost: counter updates lost, 0 unless the lock fails to exclude), "
        "(d) start() with the candidate as the lock")
    hdr = (f"{'candidate':58} {'pair ns':>8} {'cpu ns':>7} {'/put':>5} | {'2-proc ops/s':>12} "
           f"{'/LMDB2':>6} {'fair':>5} {'lost':>4} | {'start ns':>8} {'/put':>5} {'cpu ns':>7} {'/put':>5} "
           f"{'2 writers':>9} {'/LMDB2':>6}")
    say(hdr)
    say("-" * len(hdr))
    for k, d in out["cands"].items():
        pr, ct = d["pair"], d["contend"]
        if "error" in ct:
            b = f"{ct['error']:>36}"
        else:
            b = (f"{ct['ops_per_s']:>12,.0f} {ct['ops_per_s'] / lm2:>5.2f}x {ct['fairness']:>5.2f} "
                 f"{2 * a.cycles - ct['count']:>4}")
        if "start_ns" in d:
            s = (f"{d['start_ns']:>8,.0f} {d['start_ns'] / lput:>4.2f}x {d['start_cpu_ns']:>7,.0f} "
                 f"{d['start_cpu_ns'] / lput_cpu:>4.2f}x ")
            s += (f"{d['two_writers']:>9,.0f} {d['two_writers'] / lm2:>5.2f}x" if "two_writers" in d
                  else f"{'(unsafe)':>9} {'':>6}")
        else:
            s = f"{'(= today, in the peers line)':>52}"
        say(f"{d['title'][:58]:58} {pr['wall_ns']:>8,.0f} {pr['cpu_ns']:>7,.0f} "
            f"{pr['wall_ns'] / lput:>4.2f}x | {b} | {s}")
    crit = p.get("crit_ns")
    if crit:
        say(f"start() spends {crit:,.0f} ns between enter and leave (stopwatch, no lock): two "
            f"writers serialised on it reach at most {1e9 / crit:,.0f} ops/s with a free lock, "
            f"{1e9 / crit / lm2:.2f}x LMDB's two writers")
    say()
    say(f"(c) safety: holder SIGKILLed -> lock free within {a.kill_limit_ms:.0f} ms (alone / while "
        "a child it forked lives on); fork child cannot lock through the inherited handle; "
        "the fork child's unlock leaves the parent's lock held; excludes today's lockf writer")
    hdr = (f"{'candidate':58} {'kill':>14} {'kill, child lives':>22} {'fork child locks':>22} "
           f"{'child unlock':>26} {'vs today':>20}")
    say(hdr)
    say("-" * len(hdr))
    for k, d in out["cands"].items():
        if "kill" not in d:
            continue
        say(f"{d['title'][:58]:58} {d['kill']:>14} {d['kill_child']:>22} {d['fork_lock']:>22} "
            f"{d['fork_unlock']:>26} {d['interop']:>20}")
    say()
    say("targets: start() <= 0.6x LMDB put; two writers >= 2x LMDB's two writers")


if __name__ == "__main__":
    sys.exit(main())
