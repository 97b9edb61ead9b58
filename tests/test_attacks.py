"""Issue 9: the table's promises held against attacks from outside.

The lock file removed or replaced under writers, unlink() racing a rebuild,
rebuilds by another user, a retired file nothing replaced, a sparse file on a
full tmpfs, threads sharing one handle, and the smaller edge cases (a grow
without space, a writer sequence at the end of its range, a killed create's
temporary file, a long wait for the lock).  Every attack comes from outside:
separate processes (some as other users: the suite runs as root, children
drop to uids 4101/4102, which need no passwd entry), real files, a real small
tmpfs, real threads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import npcalls
from npcalls import CallTable, NpcallsError
from npcalls.layout import STATE_LIVE, STATE_RETIRED, W

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "helpers", "attack_workers.py")
OWNER, MEMBER, GROUP = 4101, 4102, 4200



def needs_root(f):
    """Tests that switch users or mount a tmpfs: the suite runs as root (CI too)."""
    return f


def _cmd(func: str, args: dict, uid: int | None = None, gid: int | None = None,
         groups: tuple = ()) -> list[str]:
    if uid is not None:
        args = dict(args, as_user=[uid, uid if gid is None else gid, list(groups)])
    return [sys.executable, WORKER, func, json.dumps(args)]


def run(func: str, *, uid: int | None = None, gid: int | None = None, groups: tuple = (),
        timeout: float = 120, **args) -> dict:
    r = subprocess.run(_cmd(func, args, uid, gid, groups), capture_output=True, text=True,
                       timeout=timeout, cwd=HERE)
    assert r.returncode == 0, (func, r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def spawn(func: str, *, uid: int | None = None, gid: int | None = None, groups: tuple = (),
          **args) -> subprocess.Popen:
    return subprocess.Popen(_cmd(func, args, uid, gid, groups), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE)


def result(p: subprocess.Popen, timeout: float = 180) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, (p.returncode, out, err)
    return json.loads(out.strip().splitlines()[-1])


def wait_file(path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.005)


def header_word(path: str, name: str) -> int:
    with open(path, "rb") as f:
        f.seek(W[name] * 8)
        return int.from_bytes(f.read(8), "little")


def set_header_word(path: str, name: str, value: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, value.to_bytes(8, "little"), W[name] * 8)
    finally:
        os.close(fd)


@pytest.fixture
def shared_dir():
    """A directory every test user can use: 0777, like a private /dev/shm without sticky bit."""
    d = tempfile.mkdtemp(prefix="npcalls-attack-", dir="/dev/shm")
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sticky_dir():
    """A sticky world-writable directory (mode 1777), as /dev/shm is."""
    d = tempfile.mkdtemp(prefix="npcalls-sticky-", dir="/dev/shm")
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------- 1. the lock file

@pytest.mark.parametrize("when", ["between-opens", "during-writes"])
def test_lock_file_removed_under_writers_never_lets_two_in(tmp_path, when):
    """Writers in separate processes, the lock file removed under them (a cleanup job's
    ``rm /dev/shm/*.lock``) before each new writer opens the table: every acknowledged
    write is kept and the table stays consistent.

    between-opens: A opens, the lock file is removed, B opens, then both write.
    during-writes: then three more writers start while the earlier ones are writing,
    each right after the lock file was removed again (so a writer may be inside).
    """
    path = str(tmp_path / "lockloss.npcalls")
    n, batch = (100_000, 5_000) if when == "between-opens" else (150_000, 5_000)
    nwriters = 2 if when == "between-opens" else 5
    CallTable.create(path, int(nwriters * n / 0.7)).close()
    lock = path + ".lock"
    go = str(tmp_path / "go")
    procs = []

    def writer(i: int) -> None:
        procs.append(spawn("batch_writer", path=path, prefix=f"w{i}", n=n, batch=batch,
                           ready=str(tmp_path / f"ready-{i}"), go=go))
        wait_file(str(tmp_path / f"ready-{i}"))

    writer(0)
    os.unlink(lock)
    writer(1)
    open(go, "w").close()
    for i in range(2, nwriters):            # while the others write: rm, a new writer
        time.sleep(0.1)
        os.unlink(lock)
        writer(i)
    acked = [result(p)["acked"] for p in procs]
    assert acked == [n] * nwriters
    t = CallTable.open(path)
    keys = [f"w{i}-{j}" for i in range(nwriters) for j in range(n)]
    got = t.get_many(keys)
    assert int(got.found.sum()) == nwriters * n
    assert (got.end == got.start + 1).all()
    rep = t.check()
    assert rep.ok, rep
    assert len(t) == nwriters * n
    t.close()


def test_lock_file_removed_under_forked_writers(tmp_path):
    """Forked children writing through the handle they inherited (opened before the lock
    file was removed) and a separate program that re-creates the lock file."""
    path = str(tmp_path / "lockfork.npcalls")
    n, batch = 60_000, 5_000
    CallTable.create(path, int(4 * n / 0.7)).close()
    go = str(tmp_path / "go")
    forker = spawn("forking_writer", path=path, prefix="f", n=n, batch=batch,
                   ready=str(tmp_path / "f-ready"), go=go, kids=2)
    wait_file(str(tmp_path / "f-ready"))
    os.unlink(path + ".lock")
    other = spawn("batch_writer", path=path, prefix="s", n=n, batch=batch,
                  ready=str(tmp_path / "s-ready"), go=go)
    wait_file(str(tmp_path / "s-ready"))
    open(go, "w").close()
    rf, rs = result(forker), result(other)
    assert rf == {"acked": n, "children": [0, 0]} and rs == {"acked": n}
    t = CallTable.open(path)
    keys = [f"f{k}-{j}" for k in range(3) for j in range(n)] + [f"s-{j}" for j in range(n)]
    got = t.get_many(keys)
    assert int(got.found.sum()) == 4 * n and (got.end == got.start + 1).all()
    rep = t.check()
    assert rep.ok, rep
    t.close()


def _plant(lock: str, kind: str) -> None:
    os.unlink(lock)
    if kind == "directory":
        os.mkdir(lock)
    elif kind == "fifo":
        os.mkfifo(lock, 0o600)
    elif kind == "symlink":
        os.symlink("/etc/hostname", lock)
    elif kind == "other-owner":
        open(lock, "w").close()
        os.chown(lock, MEMBER, MEMBER)
    elif kind == "mode-000":
        open(lock, "w").close()
        os.chown(lock, OWNER, OWNER)
        os.chmod(lock, 0)


@needs_root
@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink", "other-owner", "mode-000"])
def test_a_lock_file_that_is_not_one_gives_a_clear_error(shared_dir, kind):
    path = os.path.join(shared_dir, "hostile-lock.npcalls")
    CallTable.create(path, 64).close()
    os.chown(path, OWNER, OWNER)
    os.chown(path + ".lock", OWNER, OWNER)
    _plant(path + ".lock", kind)
    uid = OWNER if kind == "mode-000" else None       # root ignores permission bits
    r = run("open_and_start", path=path, uid=uid, timeout=60)
    assert r.get("error") and r["error"] != "TableRemovedError", r
    assert path + ".lock" in r["message"], r
    assert "remove" in r["message"] or "npcalls" in r["message"], r


# ----------------------------------------------------------------------------- 2. unlink vs grow

def _process_has_open(pid: int, path: str) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        for n in os.listdir(fd_dir):
            try:
                if os.readlink(os.path.join(fd_dir, n)) == path:
                    return True
            except OSError:
                pass
    except OSError:
        pass
    return False


def test_unlink_racing_a_grow_reaches_every_attached_process(tmp_path):
    """unlink opens the table and waits for the lock; meanwhile the lock holder grows
    the table (a new file renamed over the path) and a process attaches to the new
    file.  When unlink gets the lock it must remove the table the path names now:
    the process on the new file, and one on the old file, learn that the table is
    gone, also after a new table was created at the same path."""
    path = str(tmp_path / "race.npcalls")
    CallTable.create(path, 64).close()
    old = CallTable.open(path)              # attached to the file the grow retires
    old.start("old-handle", 1)
    f = {k: str(tmp_path / k) for k in ("held", "grow-now", "grown", "release",
                                        "att-ready", "att-go", "att-done")}
    holder = spawn("hold_grow_hold", path=path, held=f["held"], grow_now=f["grow-now"],
                   grown=f["grown"], release=f["release"], capacity=1024)
    wait_file(f["held"])
    un = spawn("unlink", path=path)
    deadline = time.monotonic() + 60
    while not _process_has_open(un.pid, path):       # unlink has the old file open
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)                                   # ... and is waiting for the lock
    open(f["grow-now"], "w").close()
    wait_file(f["grown"])
    attached = spawn("attached_writer", path=path, ready=f["att-ready"], go=f["att-go"],
                     done=f["att-done"], pre_write=False)   # attaches to the new file
    wait_file(f["att-ready"])
    open(f["release"], "w").close()
    assert result(holder) == {"grown": 1024}
    assert result(un) == {"existed": True}
    assert not os.path.exists(path) and not os.path.exists(path + ".lock")
    CallTable.create(path, 64).close()                # a new table at the same path
    open(f["att-go"], "w").close()
    r = result(attached)
    assert r.get("start_error") == "TableRemovedError", r
    assert r.get("get_error") == "TableRemovedError", r
    with pytest.raises(npcalls.TableRemovedError):
        old.start("lost-write", 3)
    with pytest.raises(npcalls.TableRemovedError):
        old.get("old-handle")
    old.close()
    fresh = CallTable.open(path)
    assert len(fresh) == 0 and fresh.get("lost-write") is None
    fresh.close()
    CallTable.unlink(path)


# ----------------------------------------------------------------------------- 3. ownership

@needs_root
def test_rebuild_by_root_keeps_owner_group_and_mode(shared_dir):
    path = os.path.join(shared_dir, "owned.npcalls")
    # the owner creates the table in its own process
    run("create", path=path, capacity=256, mode=0o640, uid=OWNER)
    st0 = os.stat(path)
    assert (st0.st_uid, st0.st_gid, stat.S_IMODE(st0.st_mode)) == (OWNER, OWNER, 0o640)
    owner = spawn("owner_loop", path=path, ready=os.path.join(shared_dir, "o-ready"),
                  go=os.path.join(shared_dir, "o-go"), n=200, uid=OWNER)
    wait_file(os.path.join(shared_dir, "o-ready"))
    t = CallTable.open(path)               # root
    t.grow(2048)
    t.compact()
    t.close()
    st1 = os.stat(path)
    assert st1.st_ino != st0.st_ino
    assert (st1.st_uid, st1.st_gid, stat.S_IMODE(st1.st_mode)) == (OWNER, OWNER, 0o640)
    open(os.path.join(shared_dir, "o-go"), "w").close()
    assert result(owner) == {"found": 200}


def _create_group_table(d: str, name: str, capacity: int = 256, seed: int = 1) -> str:
    path = os.path.join(d, name)
    run("create", path=path, capacity=capacity, mode=0o660, seed=seed, uid=OWNER, gid=GROUP,
        groups=(GROUP,))
    return path


@needs_root
@pytest.mark.parametrize("where", ["sticky", "shared"])
def test_group_member_rebuild_is_refused_before_anything_changes(request, where):
    d = request.getfixturevalue("sticky_dir" if where == "sticky" else "shared_dir")
    path = _create_group_table(d, "group.npcalls")
    t = CallTable.open(path)
    t.start_many([f"g{i}" for i in range(100)], 7)
    t.close()
    st0 = os.stat(path)
    assert (st0.st_uid, st0.st_gid) == (OWNER, GROUP)
    r = run("do_grow_or_error", path=path, capacity=4096, uid=MEMBER, groups=(GROUP,))
    assert r.get("error") == "NpcallsError", r
    assert path in r["message"] and str(OWNER) in r["message"], r
    st1 = os.stat(path)
    assert (st1.st_ino, st1.st_uid, st1.st_gid) == (st0.st_ino, OWNER, GROUP)
    assert header_word(path, "state") == STATE_LIVE
    assert header_word(path, "wseq") % 2 == 0
    assert [n for n in os.listdir(d) if ".new-" in n] == []
    # the owner still uses it, and nothing was lost
    assert run("open_and_start", path=path, key="owner-after", uid=OWNER) == {"started": True}
    t = CallTable.open(path)
    assert t.get_many([f"g{i}" for i in range(100)]).found.all()
    rep = t.check()
    assert rep.ok and not rep.notes, rep
    t.close()


@needs_root
def test_group_member_auto_compaction_keeps_the_table_its_owners(sticky_dir):
    """Inserts and removals by a group member push start() into compaction (with this
    seed, after 66 rounds): the member's writes keep working, the file stays the owner's."""
    path = _create_group_table(sticky_dir, "churn.npcalls", capacity=512, seed=1)
    st0 = os.stat(path)
    r = run("churn_until_compaction", path=path, rounds=100, prefill=330, uid=MEMBER,
            groups=(GROUP,))
    assert r.get("ok") == 330 + 100 * 40, r
    st1 = os.stat(path)
    assert (st1.st_uid, st1.st_gid, stat.S_IMODE(st1.st_mode)) == (OWNER, GROUP, 0o660)
    assert header_word(path, "state") == STATE_LIVE and header_word(path, "wseq") % 2 == 0
    assert run("open_and_start", path=path, key="owner-after", uid=OWNER) == {"started": True}
    t = CallTable.open(path)
    assert t.check().ok
    t.close()
    del st0


# ----------------------------------------------------------------------------- 4. retired, unreplaced

def test_a_retired_file_nothing_replaced_is_read_revived_and_repaired(tmp_path):
    path = str(tmp_path / "retired.npcalls")
    t = CallTable.create(path, 256)
    keys = [f"r{i}" for i in range(50)]
    t.start_many(keys, 3)
    t.close()
    # a rebuilder killed between retiring the old file and renaming the new one
    env = dict(os.environ, NPCALLS_CRASH_AT="rebuild-retired")
    p = subprocess.run([sys.executable, "-c",
                        "import sys; from npcalls import CallTable; "
                        "CallTable.open(sys.argv[1]).grow(1024)", path],
                       env=env, timeout=60, cwd=HERE, capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert header_word(path, "state") == STATE_RETIRED
    r = run("readers_everywhere", path=path, keys=keys)
    for tag in ("ro", "rw"):
        assert r[f"{tag}_get"] == [3, np.iinfo(np.int64).min], r
        assert r[f"{tag}_in"] is True
        assert r[f"{tag}_get_many"] == 50 and r[f"{tag}_snapshot"] == 50
    # reported like a crashed writer's leftovers: a note, which the next writer
    # (or --repair) takes care of
    ro = CallTable.open(path, readonly=True)
    rep = ro.check()
    assert any("retired" in n for n in rep.notes), rep
    t = CallTable.open(path)
    rep = t.check()
    assert any("retired" in n for n in rep.notes), rep
    assert header_word(path, "state") == STATE_RETIRED          # check alone changes nothing
    rep = t.check(repair=True)
    assert rep.ok and any("retired" in r for r in rep.repaired), rep
    assert header_word(path, "state") == STATE_LIVE
    assert ro.get("r1") == (3, np.iinfo(np.int64).min)
    ro.close()
    t.close()
    # and a writer revives it on its own
    set_header_word(path, "state", STATE_RETIRED)
    assert run("open_and_start", path=path, key="new") == {"started": True}
    assert header_word(path, "state") == STATE_LIVE
    t = CallTable.open(path)
    assert t.check().ok
    t.close()
    # the CLI reports and repairs it too
    set_header_word(path, "state", STATE_RETIRED)
    cli = [sys.executable, "-m", "npcalls", "check", path]
    c1 = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert c1.returncode == 0 and "retired" in (c1.stdout + c1.stderr), c1
    assert header_word(path, "state") == STATE_RETIRED
    c2 = subprocess.run(cli + ["--repair"], capture_output=True, text=True, timeout=60)
    assert c2.returncode == 0 and "retired" in (c2.stdout + c2.stderr), c2
    assert header_word(path, "state") == STATE_LIVE
    CallTable.unlink(path)


# ----------------------------------------------------------------------------- 5. sparse files

@pytest.fixture
def small_tmpfs():
    """A real 8 MiB tmpfs (the suite runs as root), unmounted afterwards."""
    d = tempfile.mkdtemp(prefix="npcalls-tmpfs-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=1777", "tmpfs", d],
                       capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(d)
        pytest.fail(f"cannot mount a tmpfs for this test (run the suite as root): {r.stderr}")
    yield d
    subprocess.run(["umount", "-l", d], check=False)
    os.rmdir(d)


def _fill(d: str) -> None:
    with open(os.path.join(d, "filler"), "wb") as f:
        chunk = b"\xff" * (1 << 16)
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass


@needs_root
def test_sparse_table_on_a_full_tmpfs_is_refused_not_a_sigbus(tmp_path, small_tmpfs):
    src = str(tmp_path / "dense.npcalls")
    t = CallTable.create(src, 40_000)            # ~4 MiB, mostly zeros
    t.start_many([f"s{i}" for i in range(100)], 1)
    t.close()
    dst = os.path.join(small_tmpfs, "sparse.npcalls")
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    st = os.stat(dst)
    assert st.st_blocks * 512 < st.st_size        # the copy is sparse
    _fill(small_tmpfs)
    for readonly in (True, False):
        r = run("snapshot_and_write", path=dst, readonly=readonly, timeout=60)
        assert r.get("error") in ("FormatError", "NpcallsError"), r
        assert dst in r["message"] and ("sparse" in r["message"] or "space" in r["message"]), r
    # with room again, a writable open reserves the space and everything works
    os.unlink(os.path.join(small_tmpfs, "filler"))
    r = run("snapshot_and_write", path=dst, readonly=False, timeout=60)
    assert r == {"snapshot": 100, "written": True}, r
    st = os.stat(dst)
    assert st.st_blocks * 512 >= st.st_size
    assert run("snapshot_and_write", path=dst, readonly=True) == {"snapshot": 1101}


# ----------------------------------------------------------------------------- 7. threads

def test_threads_share_one_handle_while_another_process_grows(tmp_path):
    path = str(tmp_path / "threads.npcalls")
    t = CallTable.create(path, 1024, auto_grow=True)
    keys = [f"perm-{i}" for i in range(300)]
    t.start_many(keys, 1)
    t.close()
    ready = str(tmp_path / "threads-ready")
    p = spawn("threaded_reads_while_grown", path=path, keys=keys, seconds=6.0, ready=ready)
    wait_file(ready)
    g = CallTable.open(path)
    cap = g.capacity
    deadline = time.monotonic() + 5.0
    grows = 0
    while time.monotonic() < deadline and p.poll() is None:
        cap = max(cap, g.capacity) * 2 if grows % 3 == 0 else max(cap, g.capacity)
        if cap > 1 << 18:
            cap = g.capacity
        g.grow(cap) if grows % 3 == 0 else g.compact()
        grows += 1
        time.sleep(0.02)
    g.close()
    r = result(p)
    assert r["errors"] == [], r
    assert r["reads"] > 0 and r["writes"] > 0 and grows > 5
    t = CallTable.open(path)
    assert t.check().ok
    t.close()


def test_threads_share_one_auto_grow_handle_that_grows_itself(tmp_path):
    """Two writer threads on one auto-grow handle (it doubles many times under them)
    and two reader threads on the same handle: no exception, every write present."""
    import threading
    path = str(tmp_path / "selfgrow.npcalls")
    t = CallTable.create(path, 64, auto_grow=True)
    errors: list[str] = []
    n = 20_000

    def writer(i: int) -> None:
        try:
            for j in range(n):
                if not t.start(f"t{i}-{j}", j + 1):
                    errors.append(f"writer {i}: start of a new key returned False")
                    return
                if j % 500 == 0:
                    t.start_many([f"b{i}-{j}-{k}" for k in range(100)], 7)
        except Exception as e:  # noqa: BLE001 - the test asserts there are none
            errors.append(f"writer {i}: {type(e).__name__}: {e}")

    def reader(i: int) -> None:
        try:
            for j in range(400):
                t.get_many([f"t0-{k}" for k in range(0, n, 97)])
                t.get(f"t1-{j}")
                if j % 50 == 0:
                    t.snapshot()
                    len(t)
        except Exception as e:  # noqa: BLE001
            errors.append(f"reader {i}: {type(e).__name__}: {e}")

    ths = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    ths += [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert errors == []
    assert t.stats().generation >= 8                    # it grew under the threads
    keys = [f"t{i}-{j}" for i in range(2) for j in range(n)]
    assert t.get_many(keys).found.all()
    assert t.check().ok
    t.close()


# ----------------------------------------------------------------------------- smaller ones

@needs_root
def test_grow_without_space_leaves_the_writer_sequence_even(small_tmpfs):
    path = os.path.join(small_tmpfs, "nospace.npcalls")
    t = CallTable.create(path, 30_000)           # ~3 MiB of the 8
    t.start_many([f"n{i}" for i in range(1000)], 1)
    with pytest.raises(NpcallsError, match="cannot reserve"):
        t.grow(60_000)
    assert header_word(path, "wseq") % 2 == 0
    assert header_word(path, "state") == STATE_LIVE
    rec = t.stats().n_recoveries
    assert t.start("after", 2)
    assert t.stats().n_recoveries == rec
    rep = t.check()
    assert rep.ok and not rep.notes, rep
    assert [n for n in os.listdir(small_tmpfs) if ".new-" in n] == []
    t.close()


@pytest.mark.parametrize("wseq", [(1 << 64) - 2, (1 << 64) - 1, (1 << 63) + 6])
def test_writer_sequence_at_the_end_of_its_range(tmp_path, wseq):
    path = str(tmp_path / "wrap.npcalls")
    t = CallTable.create(path, 4096)
    t.start_many([f"w{i}" for i in range(20)], 1)
    t.close()
    set_header_word(path, "wseq", wseq)
    r = run("snapshot_and_write", path=path, readonly=False)
    assert r == {"snapshot": 20, "written": True}, r
    t = CallTable.open(path)
    assert t.get("w3") == (1, np.iinfo(np.int64).min)
    assert len(t.snapshot()) == 1021
    assert t.check().ok
    t.close()
    set_header_word(path, "wseq", wseq)
    t = CallTable.open(path)
    rep = t.check(repair=True)
    assert rep.ok, rep
    assert header_word(path, "wseq") < 1 << 32
    assert t.start("again", 1)
    t.close()


def test_a_killed_creates_temporary_file_is_swept(tmp_path):
    path = str(tmp_path / "swept.npcalls")
    env = dict(os.environ, NPCALLS_CRASH_AT="create-built")
    p = subprocess.run([sys.executable, "-c",
                        "import sys; from npcalls import CallTable; "
                        "CallTable.create(sys.argv[1], 4096)", path],
                       env=env, timeout=60, cwd=HERE, capture_output=True)
    assert p.returncode == -signal.SIGKILL, p
    left = [n for n in os.listdir(tmp_path) if ".new-" in n]
    assert len(left) == 1
    # a temporary of a live process is left alone
    alive = tmp_path / f".swept.npcalls.new-{os.getpid()}-abcd1234"
    alive.write_bytes(b"building")
    t = CallTable.create(path, 64)
    assert sorted(n for n in os.listdir(tmp_path) if ".new-" in n) == [alive.name]
    t.close()
    # the same for an open
    dead = tmp_path / left[0]
    dead.write_bytes(b"x")
    CallTable.open(path).close()
    assert not dead.exists() and alive.exists()
    alive.unlink()
    CallTable.unlink(path)


def test_a_writer_waiting_long_for_the_lock_says_so_once(tmp_path):
    path = str(tmp_path / "wait.npcalls")
    CallTable.create(path, 64).close()
    holder = spawn("hold_lock", path=path, seconds=3.0, ready=str(tmp_path / "held"))
    wait_file(str(tmp_path / "held"))
    r = subprocess.run([sys.executable, WORKER, "open_and_start", json.dumps({"path": path})],
                       capture_output=True, text=True, timeout=60, cwd=HERE)
    rh = result(holder)
    assert r.returncode == 0 and json.loads(r.stdout) == {"started": True}, r
    lines = [ln for ln in r.stderr.splitlines() if "waiting" in ln]
    assert len(lines) == 1, r.stderr
    assert str(rh["pid"]) in lines[0] and path + ".lock" in lines[0]
