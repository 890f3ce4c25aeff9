"""Crash-safe output: atomic checkpoints/text, checkpoint loading, JSON-lines logs, progress bars."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from adarts_kernels.utils import (
    CheckpointError,
    JsonlLogger,
    atomic_torch_save,
    atomic_write_text,
    load_checkpoint,
    progress,
    read_jsonl,
    set_postfix,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _temp_files(directory):
    return sorted(n for n in os.listdir(directory) if ".tmp" in n)


def _state(version):
    g = torch.Generator().manual_seed(version)
    return {"version": version, "w": torch.randn(64, 32, generator=g), "step": 10 * version}


def _assert_state(obj, version):
    ref = _state(version)
    assert obj["version"] == version and obj["step"] == ref["step"]
    assert torch.equal(obj["w"], ref["w"])


# ----------------------------------------------------------------------------- atomic save
def test_atomic_torch_save_round_trip(tmp_path):
    path = tmp_path / "ckpt.pt"
    assert atomic_torch_save(_state(1), path) == str(path)
    _assert_state(load_checkpoint(path), 1)
    atomic_torch_save(_state(2), str(path))  # overwrite
    _assert_state(load_checkpoint(str(path)), 2)
    assert _temp_files(tmp_path) == []


def test_atomic_write_text_round_trip(tmp_path):
    path = tmp_path / "notes.txt"
    atomic_write_text("first\n", path)
    atomic_write_text("second ünïcode\n", path)
    assert path.read_text(encoding="utf-8") == "second ünïcode\n"
    assert _temp_files(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_crash_inside_torch_save_keeps_previous_checkpoint(tmp_path, monkeypatch, exc):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save(_state(1), path)
    real_save = torch.save

    def half_save(obj, f, *a, **kw):
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise exc

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(type(exc)):
        atomic_torch_save(_state(2), path)
    monkeypatch.undo()
    _assert_state(load_checkpoint(path), 1)
    assert _temp_files(tmp_path) == []


def test_failed_rename_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save(_state(1), path)
    atomic_write_text("old", tmp_path / "t.txt")

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_torch_save(_state(2), path)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text("new", tmp_path / "t.txt")
    monkeypatch.undo()
    _assert_state(load_checkpoint(path), 1)
    assert (tmp_path / "t.txt").read_text() == "old"
    assert _temp_files(tmp_path) == []


def test_failed_save_to_new_path_creates_nothing(tmp_path, monkeypatch):
    def failing_save(obj, f, *a, **kw):
        f.write(b"PK\x03\x04partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError):
        atomic_torch_save(_state(1), tmp_path / "new.pt")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- SIGKILL mid-write
_CHILD = textwrap.dedent("""
    import io, os, sys, time
    import torch
    from adarts_kernels.utils import io as uio

    path, where = sys.argv[1], sys.argv[2]

    def ready():
        print("READY", flush=True)
        time.sleep(60)  # the parent kills us here

    if where == "before_rename":
        real_replace = os.replace
        def slow_replace(src, dst):
            ready()
            real_replace(src, dst)
        os.replace = slow_replace
    elif where == "mid_write":
        real_save = torch.save
        def slow_save(obj, f, *a, **kw):
            buf = io.BytesIO()
            real_save(obj, buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            ready()
            f.write(data[len(data) // 2:])
        torch.save = slow_save
    else:
        print("READY", flush=True)

    big = {"version": 2, "w": torch.ones(int(sys.argv[3]), dtype=torch.float32)}
    uio.atomic_torch_save(big, path)
    print("DONE", flush=True)
""")


def _start_child(path, where, numel):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(path), where, str(numel)],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _readline(proc, timeout=60.0):
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        return proc.stdout.readline().strip()
    finally:
        timer.cancel()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("where", ["mid_write", "before_rename"])
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, where):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save(_state(1), path)
    proc = _start_child(path, where, 1 << 20)
    try:
        assert _readline(proc) == "READY"
        leftovers = _temp_files(tmp_path)
        assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.pt.tmp-")
        assert os.path.getsize(tmp_path / leftovers[0]) > 0  # the new data really were being written
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    _assert_state(load_checkpoint(path), 1)
    # the next save still works and replaces v1 completely
    atomic_torch_save(_state(3), path)
    _assert_state(load_checkpoint(path), 3)


def _tmp_has_data(directory):
    for name in _temp_files(directory):
        try:
            if os.path.getsize(os.path.join(directory, name)) > 0:
                return True
        except OSError:  # renamed meanwhile
            return True
    return False


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_at_an_arbitrary_moment_never_leaves_a_partial_checkpoint(tmp_path):
    """No hooks: kill a real large write as soon as data start reaching its temp file."""
    path = tmp_path / "ckpt.pt"
    atomic_torch_save(_state(1), path)
    proc = _start_child(path, "none", 32 << 20)  # 128 MiB of float32
    try:
        assert _readline(proc) == "READY"
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and not _tmp_has_data(tmp_path):
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        proc.kill()
        proc.wait(timeout=30)
    obj = load_checkpoint(path)  # whole old or whole new, never a part
    if obj["version"] == 1:
        _assert_state(obj, 1)
    else:
        assert obj["version"] == 2 and obj["w"].numel() == 32 << 20


# ----------------------------------------------------------------------------- load_checkpoint
def test_load_checkpoint_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.5, 0.99])
def test_load_checkpoint_truncated_file(tmp_path, keep):
    good = tmp_path / "good.pt"
    atomic_torch_save(_state(1), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert isinstance(info.value, RuntimeError)
    assert str(bad) in str(info.value)
    assert info.value.path == str(bad)


def test_load_checkpoint_garbage_file(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(bad)


def test_load_checkpoint_map_location(tmp_path):
    path = tmp_path / "c.pt"
    atomic_torch_save({"t": torch.arange(3)}, path)
    out = load_checkpoint(path, map_location=torch.device("cpu"))
    assert out["t"].device.type == "cpu" and out["t"].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- JSON lines
def test_jsonl_logger_converts_values(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlLogger(path, append=False) as log:
        log.log({"step": 1, "loss": torch.tensor(0.5), "acc": np.float32(0.25), "n": np.int64(7),
                 "vec": torch.tensor([1.0, 2.0]), "arr": np.arange(3), "lr": 1.0,
                 "nested": {"a": [torch.tensor(3), np.float64(1.5)]}})
        # each line is on disk as soon as it is logged
        assert read_jsonl(path)[0]["step"] == 1
    (rec,) = read_jsonl(path)
    assert rec == {"step": 1, "loss": 0.5, "acc": 0.25, "n": 7, "vec": [1.0, 2.0], "arr": [0, 1, 2],
                   "lr": 1.0, "nested": {"a": [3, 1.5]}}
    assert isinstance(rec["lr"], float) and isinstance(rec["loss"], float) and isinstance(rec["n"], int)
    assert '"lr": 1.0' in path.read_text()


def test_jsonl_logger_append_and_truncate(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlLogger(path, append=False) as log:
        log.log({"i": 0})
    with JsonlLogger(path, append=True) as log:
        log.log({"i": 1})
    assert [r["i"] for r in read_jsonl(path)] == [0, 1]
    with JsonlLogger(path, append=False) as log:
        log.log({"i": 2})
    assert [r["i"] for r in read_jsonl(path)] == [2]


def test_read_jsonl_ignores_trailing_partial_line(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlLogger(path, append=False) as log:
        for i in range(3):
            log.log({"i": i, "loss": 1.0 / (i + 1)})
    with open(path, "ab") as f:
        f.write(b'{"i": 3, "loss": 0.2')  # the process died here
    assert [r["i"] for r in read_jsonl(path)] == [0, 1, 2]
    # resuming the log drops the torn fragment, so new lines stay readable
    with JsonlLogger(path, append=True) as log:
        log.log({"i": 3, "loss": 0.25})
    assert [r["i"] for r in read_jsonl(path)] == [0, 1, 2, 3]


def test_read_jsonl_keeps_complete_last_line_without_newline(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"i": 0}\n{"i": 1}')
    assert [r["i"] for r in read_jsonl(path)] == [0, 1]
    with JsonlLogger(path, append=True) as log:
        log.log({"i": 2})
    assert [r["i"] for r in read_jsonl(path)] == [0, 1, 2]


def test_read_jsonl_partial_multibyte_tail_and_corrupt_middle(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes('{"s": "ok"}\n{"s": "\u00e9'.encode("utf-8")[:-1])
    assert read_jsonl(path) == [{"s": "ok"}]
    path.write_text('{"i": 0}\n{"i": 1\n{"i": 2}\n')
    with pytest.raises(ValueError, match=":2"):
        read_jsonl(path)


# ----------------------------------------------------------------------------- progress
def test_progress_disabled_returns_iterable():
    items = [1, 2, 3]
    assert progress(items, enable=False) is items
    set_postfix(items, loss=1.0)  # no-op, no error


def test_progress_bar(capsys):
    from tqdm import tqdm

    bar = progress(range(5), total=5, desc="search")
    assert isinstance(bar, tqdm)
    out = []
    for i in bar:
        set_postfix(bar, loss=torch.tensor(0.5), acc=np.float32(0.9), phase="w")
        out.append(i)
    assert out == list(range(5))
    assert bar.postfix is not None and "loss=0.5" in bar.postfix
    assert capsys.readouterr().out == ""  # the bar goes to stderr


def test_progress_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` fail
    items = (1, 2)
    assert progress(items, desc="x") is items
    set_postfix(items, a=1)


# ----------------------------------------------------------------------------- checksum, stale temporaries
def test_checkpoint_checksum_detects_a_flipped_bit(tmp_path):
    path = tmp_path / "c.pt"
    atomic_torch_save(_state(1), path)
    data = path.read_bytes()
    assert data.endswith(b"\n") and b"#adarts-checkpoint sha256=" in data[-100:]
    _assert_state(torch.load(path, weights_only=False), 1)   # plain torch.load ignores the footer
    for where in (10, len(data) // 2, len(data) - 200):
        bad = bytearray(data)
        bad[where] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError, match=r"c\.pt.*corrupt: its sha256") as info:
            load_checkpoint(path)
        assert info.value.path == str(path)


def test_checkpoint_without_footer_still_loads(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(_state(2), path)       # written by plain torch.save: no checksum to check
    _assert_state(load_checkpoint(path), 2)


def test_remove_stale_tmp_removes_only_leftover_temporaries(tmp_path):
    from adarts_kernels.utils.io import remove_stale_tmp
    stale = [tmp_path / ".checkpoint.pt.tmp-123-0", tmp_path / ".result.json.tmp-9-17"]
    keep = [tmp_path / "checkpoint.pt", tmp_path / "x.tmp-1-2", tmp_path / ".hidden", tmp_path / ".a.tmp-x-1"]
    for p in stale + keep:
        p.write_bytes(b"x")
    (tmp_path / ".dir.tmp-1-1").mkdir()
    removed = remove_stale_tmp(tmp_path)
    assert sorted(removed) == sorted(str(p) for p in stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert (tmp_path / ".dir.tmp-1-1").is_dir()
    assert remove_stale_tmp(tmp_path / "missing") == []
