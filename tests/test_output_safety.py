"""Output safety: nothing is ever lost. Outputs are written atomically and never over an input; a refused
destination is one sentence; an interrupted run says what it wrote and leaves no half-written file.

Each test names the defect it covers (its ``Defect:`` line); each failed on the tree before its fix.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from rlsubnet.io import InputError
from rlsubnet.io.atomic import write_text
from rlsubnet.io.guard import MARKER, check_outputs

from conftest import EXE, TRAIN, clean_error, run, snapshot


def test_train_out_dot_does_not_empty_the_working_directory(tmp_path, tiny_model):
    """Defect: `--out .` emptied the working directory (model and unrelated files) and crashed."""
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    import shutil

    shutil.copytree(tiny_model, work / "model")
    before = snapshot(work)
    r = run(*TRAIN, "--model", "model", "--out", ".", cwd=work)
    clean_error(r, "refusing")
    assert snapshot(work) == before


@pytest.mark.parametrize("where", ["parent", "same", "inside"])
def test_train_out_never_lands_on_the_model(tmp_path, tiny_model, where):
    """Defect: `--out` = the model's parent deleted the model; `--out` = `--model` overwrote it."""
    import shutil

    holder = tmp_path / "holder"
    shutil.copytree(tiny_model, holder / "model")
    before = snapshot(holder)
    out = {"parent": holder, "same": holder / "model", "inside": holder / "model" / "sub"}[where]
    r = run(*TRAIN, "--model", holder / "model", "--out", out)
    clean_error(r, "refusing")
    assert snapshot(holder) == before


def test_train_out_refuses_unrelated_folder_and_file(tmp_path, tiny_model):
    """Defect: an existing unrelated folder was silently wiped."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    clean_error(run(*TRAIN, "--model", tiny_model, "--out", other), "not written by rlsubnet")
    assert (other / "keep.txt").read_text() == "precious"
    f = tmp_path / "file"
    f.write_text("x")
    clean_error(run(*TRAIN, "--model", tiny_model, "--out", f), "not a folder")
    assert f.read_text() == "x"


@pytest.mark.slow
def test_train_replaces_its_own_output_atomically_and_cleans_after_kill(tmp_path, tiny_model):
    """Defects: non-atomic replacement (a kill left config + log but no weights, previous result gone);
    `.NAME.work` leftovers never cleaned; two runs with one --out collided with a traceback; SIGTERM
    was not handled like SIGINT."""
    out = tmp_path / "run"
    r = run(*TRAIN, "--model", tiny_model, "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / MARKER).is_file() and (out / "model.safetensors").is_file()
    first = snapshot(out)
    # a second run, killed with SIGKILL mid-way: the first result stays whole
    p = subprocess.Popen([*EXE, *TRAIN, "--steps", "100000", "--model", str(tiny_model), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list(tmp_path.glob(".run.*.work")) and time.time() - t0 < 120:
        time.sleep(0.2)
    assert list(tmp_path.glob(".run.*.work")), "the run never started"
    # meanwhile, a third run with the same --out is refused in one sentence
    clean_error(run(*TRAIN, "--model", tiny_model, "--out", out), "another rlsubnet train")
    p.kill()
    p.wait(timeout=60)
    assert snapshot(out) == first
    # SIGTERM: handled like Ctrl-C, the run says nothing was written and leaves no temporary behind
    p = subprocess.Popen([*EXE, *TRAIN, "--steps", "100000", "--model", str(tiny_model), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list(tmp_path.glob(f".run.{p.pid}.*.work")) and time.time() - t0 < 120:  # its own work folder
        time.sleep(0.2)
    time.sleep(3)  # inside trainer.train()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "terminated" in err and "nothing was written" in err and "Traceback" not in err
    assert snapshot(out) == first
    # the next run cleans the SIGKILL leftover and replaces the old result as a whole
    r = run(*TRAIN, "--model", tiny_model, "--out", out, "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]
    assert json.loads((out / "train_log.json").read_text())["config"]["seed"] == 1


def test_replace_dir_swaps_in_one_step(tmp_path):
    from rlsubnet.io.atomic import exchange, replace_dir

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("new")
    (b / "y").write_text("old")
    if not exchange(a, b):
        pytest.skip("renameat2 unavailable")
    assert (b / "x").exists() and (a / "y").exists()
    replace_dir(b, a)
    assert (a / "x").read_text() == "new" and not b.exists()


def test_outputs_never_overwrite_inputs(pair, tmp_path):
    """Defect: `diff A B --json A` replaced checkpoint A with JSON (exit 0); same for every output option."""
    a, b = pair
    before = {p: snapshot(p) for p in (a, b)}
    for opt in ("--json", "--csv", "--markdown", "--mask-out"):
        clean_error(run("diff", a, b, opt, a, "-q"), "refusing")
        clean_error(run("diff", a, b, opt, b / "model.safetensors", "-q"), "refusing")
    clean_error(run("diff", a, b, "--plot", a, "-q"), "refusing")
    clean_error(run("mask", a, b, "-o", b / "model.safetensors", "-q"), "refusing")
    m = tmp_path / "m.safetensors"
    assert run("mask", a, b, "-o", m, "-q").returncode == 0
    mb = m.read_bytes()
    clean_error(run("overlap", m, m, "--json", m), "refusing")
    clean_error(run("closeness", a, a, b, "--json", b, "-q"), "refusing")
    clean_error(run("verify-frozen", a, b, m, "--json", m, "-q"), "refusing")
    clean_error(run("rank", a, b, "--json", a / "model.safetensors", "-q"), "refusing")
    assert {p: snapshot(p) for p in (a, b)} == before and m.read_bytes() == mb


def test_check_outputs_rules(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"x")
    check_outputs({"--json": tmp_path / "out.json"}, [tmp_path / "ck"])  # a sibling is fine
    with pytest.raises(InputError, match="same output"):
        check_outputs({"--json": tmp_path / "o", "--csv": tmp_path / "o"}, [])
    with pytest.raises(InputError, match="would contain"):
        check_outputs({"--out": tmp_path}, [tmp_path / "ck"], folder_outputs=["--out"])
    os.symlink(tmp_path / "ck" / "model.safetensors", tmp_path / "link.json")
    with pytest.raises(InputError, match="refusing"):  # through a symbolic link, too
        check_outputs({"--json": tmp_path / "link.json"}, [tmp_path / "ck"])


def test_outputs_honour_the_umask(pair, tmp_path):
    """Defect: outputs were created 0600 and --out folders 0700 whatever the umask."""
    old = os.umask(0o002)
    try:
        write_text(tmp_path / "f.txt", "x")
        from rlsubnet.io.atomic import atomic_dir

        with atomic_dir(tmp_path / "d") as t:
            (t / "x").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.txt").st_mode) == 0o664
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o775
    a, b = pair
    r = subprocess.run(["sh", "-c", "umask 022 && exec \"$@\"", "sh", *EXE, "diff", str(a), str(b), "--json",
                        str(tmp_path / "j.json"), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "j.json").st_mode) == 0o644


def test_stale_temporaries_are_cleaned(tmp_path):
    """Defect: after a kill, `.NAME.*.tmp` files stayed behind and nothing cleaned them."""
    dead = 2**22 + 12345  # above the default pid_max of small systems; checked to be free below
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    stale = tmp_path / f".out.json.{dead}.0123abcd.tmp"
    stale.write_text("half")
    alive = tmp_path / f".out.json.{os.getpid()}.0123abcd.tmp"
    alive.write_text("someone is writing")
    foreign = tmp_path / ".out.json.tmp"
    foreign.write_text("not ours")
    write_text(tmp_path / "out.json", "{}")
    assert not stale.exists() and alive.exists() and foreign.exists()


@pytest.mark.parametrize("dest,needle", [("folder", "it is a folder"), ("under-file", "is a file, not a folder"),
                                         ("too-long", "too long")])
def test_bad_destinations_one_sentence(pair, tmp_path, dest, needle):
    """Defect: output destinations that are a folder, under a file or too long gave tracebacks."""
    a, b = pair
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    path = {"folder": tmp_path / "folder", "under-file": tmp_path / "file" / "x.json",
            "too-long": tmp_path / ("x" * 300 + ".json")}[dest]
    clean_error(run("diff", a, b, "--json", path, "-q"), needle)


def test_full_disk_and_readonly_are_one_sentence(tmp_path):
    """The errors a root user cannot provoke on a tmp folder, checked on the conversion itself."""
    import errno

    from rlsubnet.io.atomic import _os_error

    for code, needle in [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")]:
        e = _os_error(tmp_path / "x.json", OSError(code, os.strerror(code)))
        assert needle in e.message and str(tmp_path / "x.json") in e.message
    if Path("/dev/full").exists():
        r = run("diff", "nope-a", "nope-b", "--json", "/dev/full/x")
        clean_error(r)


def test_interruption_says_what_was_written(tmp_path, capsys):
    """Defect: "interrupted: nothing was written." was printed after some outputs had been written."""
    import typer

    from rlsubnet.cli import clean_errors

    @clean_errors
    def job():
        write_text(tmp_path / "first.json", "{}")
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as e:
        job()
    assert e.value.exit_code == 130
    err = capsys.readouterr().err
    assert "first.json" in err and "nothing else was written" in err and "nothing was written" not in err
