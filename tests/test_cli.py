"""The console commands (``adarts_kernels.commands``, run as ``adarts-search`` / ``adarts-retrain``
or through ``python/search.py`` / ``python/retrain.py``) and how they meet bad input.

Every refused input prints ONE line on stderr starting with ``error:`` and exits with code 2,
before any data is loaded (the ``no_data`` fixture makes loading fail the test). Runs that must
train use a few digits images, C=4, 3 cells, one epoch: a second or two each on 2 CPU cores.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adarts_kernels import distributed as D
from adarts_kernels.commands import retrain as retrain_cmd
from adarts_kernels.commands import search as search_cmd
from adarts_kernels.data import BatchLoader, ImageSet
from adarts_kernels.nas import loop_common, loops, search_loop
from adarts_kernels.utils.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"search": search_cmd, "retrain": retrain_cmd}

#: the module docstrings of python/search.py and python/retrain.py before the drivers moved into
#: the package: ``--help`` shows them, and they must read exactly as before
EXPECTED_DESCRIPTION = {
    "search": (
        "Architecture search driver: ADARTS (default), PC-DARTS or DARTS.\n\n"
        "    python python/search.py                                   # digits, embedded, no download\n"
        "    python python/search.py --dataset cifar10 --data ~/data   # docs/method.md section 4 defaults\n"
        "    python python/search.py --dataset cifar10 --data ~/data --preset pcdarts --edge pcdarts\n"
        "    python python/search.py ... --resume                      # continue an interrupted run\n"
        "    python python/search.py --dataset cifar10 --data ~/data --batch-size auto --recompute edge   # GPU\n"
        "\n"
        "The adarts edge runs on the fused kernels by default (``--kernels modules`` for the plain-PyTorch\n"
        "modules); ``--impl`` picks the backend of the fused ops (``auto``, ``reference``, ``cpp``,\n"
        "``cuda``, ``triton``; default ``$ADARTS_KERNELS_IMPL`` or ``auto``); ``--recompute edge``\n"
        "trades about a third more step time for a quarter of the memory.\n"),
    "retrain": (
        "Retrain driver: train the network of a genotype from scratch and report test accuracy.\n\n"
        "    python python/retrain.py --genotype runs/search-digits-adarts/genotype.json\n"
        "    python python/retrain.py --dataset cifar10 --data ~/data --genotype ADARTS_V1   "
        "# docs/method.md section 1\n"),
}

TINY = ["--limit", "32", "--C", "4", "--layers", "3", "--batch-size", "16", "--epochs", "1", "--no-progress",
        "--device", "cpu"]
TINY_SEARCH = TINY + ["--warmup-epochs", "0"]
TINY_RETRAIN = TINY + ["--genotype", "PC_DARTS"]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture
def no_data(monkeypatch):
    """Loading data fails the test: a refusal must come before it (and so before any model)."""
    def load(cfg):
        raise AssertionError("data was loaded before the bad input was refused")
    monkeypatch.setattr(loop_common, "_load", load)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COLUMNS")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def one_error_line(capsys) -> str:
    """The one line a refused input prints on stderr (asserted: one line, ``error:``)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ----------------------------------------------------------------------------- the commands

@pytest.mark.parametrize("name", ["search", "retrain"])
def test_description_is_the_drivers_docstring_unchanged(name):
    cmd = COMMANDS[name]
    assert cmd.__doc__ == EXPECTED_DESCRIPTION[name]
    assert cmd.build_parser().description == EXPECTED_DESCRIPTION[name]


def test_every_entry_point_returns_an_int_exit_code(tmp_path, no_data, capsys):
    from adarts_kernels.profiling.__main__ import main as memory_main
    assert search_cmd.main(TINY_SEARCH + ["--k", "0", "--out", str(tmp_path / "s")]) == 2
    assert retrain_cmd.main(TINY_RETRAIN + ["--epochs", "0", "--out", str(tmp_path / "r")]) == 2
    assert memory_main(["--C", "6", "--k", "4"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 3


@pytest.mark.parametrize("name", ["search", "retrain"])
def test_checkout_script_says_which_copy_it_imports(name, tmp_path, monkeypatch):
    """With another copy of the package importable, python/<name>.py imports the checkout's and
    says so in one stderr line; its --help is the command's, the program name aside."""
    other = tmp_path / "site" / "adarts_kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text('raise ImportError("the installed copy must not be imported")\n')
    res = subprocess.run([sys.executable, str(REPO / "python" / f"{name}.py"), "--help"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120,
                         env=_env(PYTHONPATH=str(tmp_path / "site"), COLUMNS="100"))
    assert res.returncode == 0, res.stderr
    checkout = os.path.realpath(REPO / "adarts_kernels")
    assert res.stderr.splitlines() == [f"{name}.py: using adarts_kernels from the checkout {checkout}, not the "
                                       f"installed copy at {os.path.realpath(other)}"]
    monkeypatch.setenv("COLUMNS", "100")
    parser = COMMANDS[name].build_parser()
    parser.prog = f"{name}.py"            # what argparse takes from sys.argv[0]
    assert res.stdout == parser.format_help()
    parser.prog = f"adarts-{name}"        # the console script: the program name alone differs
    installed = parser.format_help()
    assert installed.startswith(f"usage: adarts-{name} [-h]")
    assert installed.split("\n\n", 1)[1] == res.stdout.split("\n\n", 1)[1]


def test_checkout_script_is_quiet_without_another_copy(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "python" / "search.py"), "--help"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120, env=_env(PYTHONPATH=str(REPO)))
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.startswith("usage: search.py")


# ----------------------------------------------------------------------------- 1. --out

def _out_case(case: str, tmp_path: Path):
    """``(out, reason)`` of an --out that cannot be a run directory."""
    (tmp_path / "file.txt").write_text("not a directory")
    if case == "proc":
        return "/proc/adarts-no-such/run", "no such file or directory"
    if case == "sys":
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("no sysfs here")
        return "/sys/adarts-run", ""      # EPERM or EACCES or EROFS: the kernel's words, whichever
    if case == "through-a-file":
        return str(tmp_path / "file.txt" / "run"), f"{tmp_path / 'file.txt'} is a file, not a directory"
    if case == "a-file":
        return str(tmp_path / "file.txt"), f"{tmp_path / 'file.txt'} is a file, not a directory"
    if case == "long-name":
        return str(tmp_path / ("a" * 300) / "run"), "is 300 bytes long, more than the"
    if case in ("read-only-parent", "read-only-dir"):
        if os.geteuid() == 0:
            pytest.skip("root writes into a mode 0o555 directory anyway: see the /proc and /sys cases")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return str(ro / "run" if case == "read-only-parent" else ro), "permission denied"
    raise AssertionError(case)


@pytest.mark.parametrize("name", ["search", "retrain"])
@pytest.mark.parametrize("case", ["proc", "sys", "through-a-file", "a-file", "long-name", "read-only-parent",
                                  "read-only-dir"])
def test_an_out_that_cannot_be_a_directory_is_one_error_line(name, case, tmp_path, no_data, capsys):
    out, reason = _out_case(case, tmp_path)
    args = TINY_SEARCH if name == "search" else TINY_RETRAIN
    try:
        rc = COMMANDS[name].main(args + ["--out", out])
    finally:
        if case.startswith("read-only"):
            (tmp_path / "ro").chmod(0o755)
    line = one_error_line(capsys)
    assert rc == 2
    verb = "write in" if case == "read-only-dir" else "create"
    assert line.startswith(f"error: cannot {verb} the run directory {out}: "), line
    assert reason in line and "Errno" not in line, line


# ----------------------------------------------------------------------------- 2, 4. settings

SEARCH_BAD = [
    (["--k", "0"], "--k must be at least 1"),
    (["--k", "-1"], "--k must be at least 1"),
    (["--k", "3"], "--C 4 is not divisible by --k 3"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be >= 0, got -1"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--lr", "0"], "--lr must be a positive finite number"),
    (["--lr", "-0.1"], "--lr must be a positive finite number"),
    (["--device", "bogus"], "--device bogus is not a device; expected auto, cpu, cuda or cuda:N"),
    (["--device", "mps"], "expected auto, cpu, cuda or cuda:N"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--C", "0"], "--C must be at least 1"),
    (["--layers", "2"], "--layers must be at least 3"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--seed", str(10 ** 15)], "--seed must be in [0, 2**32)"),
    (["--dist-timeout", "-5"], "--dist-timeout must be a positive finite number"),
    (["--dist-timeout", "inf"], "--dist-timeout must be a positive finite number"),
    (["--check-every", "-1"], "--check-every must be >= 0"),
]

RETRAIN_BAD = [
    (["--drop-path", "-1"], "--drop-path must be in [0, 1)"),
    (["--drop-path", "2"], "--drop-path must be in [0, 1)"),
    (["--drop-path", "1"], "--drop-path must be in [0, 1)"),
    (["--drop-path", "nan"], "--drop-path must be in [0, 1)"),
    (["--lr", "nan"], "--lr must be a positive finite number"),
    (["--lr", "0"], "--lr must be a positive finite number"),
    (["--device", "bogus"], "--device bogus is not a device; expected auto, cpu, cuda or cuda:N"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--epochs", "-2"], "--epochs must be at least 1"),
    (["--C", "0"], "--C must be at least 1"),
    (["--layers", "0"], "--layers must be at least 3"),
    (["--layers", "2"], "--layers must be at least 3"),
    (["--batch-size", "0"], "--batch-size must be at least 2"),
    (["--batch-size", "-3"], "--batch-size must be at least 2"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--cutout", "-1"], "--cutout must be >= 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--dist-timeout", "-5"], "--dist-timeout must be a positive finite number"),
    (["--check-every", "-1"], "--check-every must be >= 0"),
]


def _ids(cases):
    return [" ".join(args) for args, _ in cases]


@pytest.mark.parametrize("args, message", SEARCH_BAD, ids=_ids(SEARCH_BAD))
def test_search_refuses_a_bad_setting_in_one_line(args, message, tmp_path, no_data, capsys):
    out = tmp_path / "run"
    rc = search_cmd.main(TINY_SEARCH + args + ["--out", str(out)])
    line = one_error_line(capsys)
    assert rc == 2 and message in line, line
    assert not out.exists()           # refused before the run directory was made


@pytest.mark.parametrize("args, message", RETRAIN_BAD, ids=_ids(RETRAIN_BAD))
def test_retrain_refuses_a_bad_setting_in_one_line(args, message, tmp_path, no_data, capsys):
    out = tmp_path / "run"
    rc = retrain_cmd.main(TINY_RETRAIN + args + ["--out", str(out)])
    line = one_error_line(capsys)
    assert rc == 2 and message in line, line
    assert not out.exists()


# ----------------------------------------------------------------------------- 3. a last batch of one

def _toy(n: int) -> ImageSet:
    g = torch.Generator().manual_seed(n)
    return ImageSet(torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=g),
                    torch.arange(n) % 3, 3, (0.5,) * 3, (0.25,) * 3, "toy")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_training_loader_folds_a_short_last_batch_into_the_one_before(world_size):
    """min_batch = 2 * world_size: every rank's share of every batch holds at least 2 samples,
    every sample is seen once per epoch, and the ranks' shards still concatenate bitwise to
    the one-process batch of the same loader."""
    need = 2 * world_size
    for n in range(need, 30):
        for batch_size in range(need, 12, world_size):
            ds = _toy(n)
            kw = dict(shuffle=True, augment=True, cutout=1, pad=1, seed=n, min_batch=need)
            full = BatchLoader(ds, batch_size, **kw)
            ranks = [BatchLoader(ds, batch_size, shard=(r, world_size), **kw) for r in range(world_size)]
            sizes = [full.global_batch_size(i) for i in range(len(full))]
            assert sum(sizes) == n and all(s >= need for s in sizes), (n, batch_size, sizes)
            rest = n % batch_size
            want = [batch_size] * (n // batch_size) + ([rest] if rest else [])
            if rest and rest < need and n > batch_size:
                want = want[:-2] + [batch_size + rest]
            assert sizes == want, (n, batch_size)
            whole = list(full)
            parts = [list(r) for r in ranks]
            for i, (x, y) in enumerate(whole):
                assert all(p[i][1].shape[0] >= 2 for p in parts)
                assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
                assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
            assert sorted(torch.cat([y for _, y in whole]).tolist()) == sorted(ds.labels.tolist())


def test_loader_min_batch_is_checked():
    with pytest.raises(ValueError, match="min_batch must be between 1 and batch_size=4, got 5"):
        BatchLoader(_toy(9), 4, shuffle=False, augment=False, min_batch=5)
    assert len(BatchLoader(_toy(9), 4, shuffle=False, augment=False)) == 3      # the default never folds


def test_retrain_trains_when_the_last_batch_would_hold_one_image(tmp_path, capsys):
    """65 images in batches of 64 (the auxiliary head on): one batch of 65, no BatchNorm error."""
    out = tmp_path / "r"
    rc = retrain_cmd.main(TINY_RETRAIN + ["--limit", "65", "--batch-size", "64", "--auxiliary", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert (out / "result.json").exists()


def test_search_steps_never_see_a_batch_of_one(tmp_path, monkeypatch, capsys):
    """17 images per half in batches of 16: the weight and the architecture batches of 1 are
    folded, so every step trains on all 17 images at once."""
    seen = []
    real = search_loop.search_step

    def step(model, architect, w_opt, weights, x, y, xv, yv, *a, **k):
        seen.append((x.shape[0], None if xv is None else xv.shape[0]))
        return real(model, architect, w_opt, weights, x, y, xv, yv, *a, **k)
    monkeypatch.setattr(search_loop, "search_step", step)
    rc = search_cmd.main(TINY_SEARCH + ["--limit", "17", "--epochs", "2", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert seen == [(17, 17), (17, 17)]
    assert "warning:" not in err          # warm-up 0 < 2 epochs: the architecture is searched


@pytest.mark.parametrize("name", ["search", "retrain"])
def test_a_training_split_of_one_image_is_refused(name, tmp_path, capsys):
    args = TINY_SEARCH if name == "search" else TINY_RETRAIN
    rc = COMMANDS[name].main(args + ["--limit", "1", "--out", str(tmp_path / "o")])
    line = one_error_line(capsys)
    assert rc == 2 and "too few images in digits (--limit 1)" in line and "at least 2" in line, line


def test_global_batch_must_give_every_rank_two_images():
    two_ranks = D.Context(rank=0, world_size=2, local_rank=0, backend="gloo")
    with pytest.raises(ValueError, match="--batch-size 2 is the global batch: 1 per rank over 2 ranks.*use 4 or more"):
        loops._check_batch(2, two_ranks)
    loops._check_batch(4, two_ranks)
    loops._check_batch(1, D.SINGLE)       # one process: the config asks for 2 itself


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(script: str, args, tmp_path: Path):
    """``python/<script>`` on 2 gloo ranks (torchrun's environment); the output of each rank."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(REPO / "python" / script), *args], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(PYTHONPATH=str(REPO), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outs)]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_ranks_retrain_when_the_last_batch_would_give_a_rank_one_image(tmp_path):
    """18 images, global batch 16 on 2 ranks: the last global batch of 2 would give each rank
    1 image (the auxiliary head's BatchNorm fails); folded, both ranks train on 9."""
    out = tmp_path / "r"
    ranks = _two_ranks("retrain.py", TINY_RETRAIN + ["--limit", "18", "--auxiliary", "--out", str(out)], tmp_path)
    for rc, text in ranks:
        assert rc == 0, text[-3000:]
    assert read_jsonl(out / "log.jsonl")[-1]["world_size"] == 2


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_ranks_warn_once_that_the_warmup_covers_the_search(tmp_path):
    ranks = _two_ranks("search.py", TINY + ["--warmup-epochs", "1", "--out", str(tmp_path / "s")], tmp_path)
    for rc, text in ranks:
        assert rc == 0, text[-3000:]
    lines = [line for _, text in ranks for line in text.splitlines() if line.startswith("warning:")]
    assert lines == ["warning: --warmup-epochs 1 >= --epochs 1: the architecture is never updated (alpha and "
                     "beta stay at their initial values)"]


# ----------------------------------------------------------------------------- 5. warm-up >= epochs

def test_search_warns_when_the_warmup_covers_every_epoch(tmp_path, capsys):
    """The digits preset keeps 3 warm-up epochs: a 1-epoch search never updates alpha and beta."""
    rc = search_cmd.main(TINY + ["--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        "warning: --warmup-epochs 3 >= --epochs 1: the architecture is never updated (alpha and beta stay at "
        "their initial values)"]
