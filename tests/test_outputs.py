"""No input or output is ever lost: deltacodec.outputs, and encode/decode/`sld apply` through it.

Each class of path that must be refused is tested over its spellings (relative, absolute, `./`,
`..`, doubled and trailing slashes, a symlinked directory, a symlink or hard link to the file),
with and without force. Atomicity is tested by failing the write at each step (an exception in
the body, ENOSPC/EACCES/EDQUOT/EIO at open, fsync or rename) and by SIGKILLing a real run at a
point it announces, never by timing.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys

import numpy as np
import pytest

import deltacodec
from deltacodec import DeltacodecWarning, OutputError, outputs
from deltacodec.cli_apply import apply_checkpoint
from deltacodec.outputs import TEMP_PREFIX, atomic_file, check_output, clean_leftovers, staged_directory, write_bytes

from test_codec import make_adapter

PY = sys.executable


def temps(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(".sld-"))


def listing(d) -> dict[str, bytes | None]:
    """Every path under d with its bytes (None for a directory), symlinks not followed."""
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs:
            out[os.path.relpath(os.path.join(root, n), d)] = None
        for n in files:
            p = os.path.join(root, n)
            out[os.path.relpath(p, d)] = os.readlink(p) if os.path.islink(p) else open(p, "rb").read()
    return out


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """tmp/A/{adapter_model.safetensors, adapter_config.json}, linkA -> A, alias -> the weights,
    hard = a hard link to the weights, D/F.sld; cwd is tmp."""
    monkeypatch.chdir(tmp_path)
    make_adapter(tmp_path / "A")
    os.symlink("A", tmp_path / "linkA")
    os.symlink("A/adapter_model.safetensors", tmp_path / "alias.safetensors")
    os.link(tmp_path / "A" / "adapter_model.safetensors", tmp_path / "hard.safetensors")
    (tmp_path / "D").mkdir()
    deltacodec.encode(str(tmp_path / "A"), bits=3, out=str(tmp_path / "D" / "F.sld"))
    os.symlink("D", tmp_path / "linkD")
    return tmp_path


# ----------------------------------------------------------------------------------------------
# Classes of refused outputs, over spellings

SAME_FILE = [
    "A/adapter_model.safetensors",
    "./A/adapter_model.safetensors",
    "A//adapter_model.safetensors",
    "A/./adapter_model.safetensors",
    "A/../A/adapter_model.safetensors",
    "A/adapter_model.safetensors/",
    "linkA/adapter_model.safetensors",
    "linkA/../A/adapter_model.safetensors",
    "alias.safetensors",
    "hard.safetensors",
    "{abs}/A/adapter_model.safetensors",
    "{abs}/linkA/adapter_model.safetensors",
]


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("spelling", SAME_FILE)
def test_encode_onto_its_own_weights_file_is_refused_whatever_the_spelling(tree, spelling, force):
    out = spelling.format(abs=tree)
    before = listing(tree / "A")
    with pytest.raises(OutputError) as exc:
        deltacodec.encode("A/adapter_model.safetensors", bits=2, out=out, force=force)
    msg = str(exc.value)
    assert msg.startswith(out) and "input" in msg and TEMP_PREFIX not in msg
    assert listing(tree / "A") == before and temps(tree) == [] and temps(tree / "A") == []


INSIDE_DIR = ["A/x.sld", "./A/x.sld", "A/sub/../x.sld", "linkA/x.sld", "linkA/./x.sld", "{abs}/A/x.sld",
              "A/adapter_config.json", "A"]


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("spelling", INSIDE_DIR)
def test_encode_into_its_input_directory_is_refused(tree, spelling, force):
    out = spelling.format(abs=tree)
    before = listing(tree / "A")
    with pytest.raises(OutputError, match="input"):
        deltacodec.encode("A", bits=2, out=out, force=force)
    assert listing(tree / "A") == before


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("spelling", ["A/adapter_config.json", "linkA/adapter_config.json", "{abs}/A/adapter_config.json"])
def test_encode_of_a_weights_file_never_writes_over_the_config_beside_it(tree, spelling, force):
    with pytest.raises(OutputError, match="input"):
        deltacodec.encode("linkA/adapter_model.safetensors", bits=2, out=spelling.format(abs=tree), force=force)


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("spelling", ["D/F.sld", "./D/F.sld", "linkD/F.sld", "D/../D/F.sld", "{abs}/D/F.sld"])
def test_decode_onto_the_sld_itself_is_refused(tree, spelling, force):
    # kind mismatch for a directory output, or "is the input": refused either way, F.sld intact
    before = (tree / "D" / "F.sld").read_bytes()
    for out in (spelling.format(abs=tree), spelling.format(abs=tree).replace("F.sld", "F.sld/")):
        with pytest.raises(OutputError):
            deltacodec.decode("D/F.sld", out, force=force)
    assert (tree / "D" / "F.sld").read_bytes() == before


@pytest.mark.parametrize("spelling", ["D", "D/", "./D", "linkD", "linkD/", "D/sub/..", "{abs}/D", "{abs}/linkD/.", "."])
def test_decode_into_a_directory_containing_the_sld_is_refused_even_with_force(tree, spelling):
    out = spelling.format(abs=tree)
    before = listing(tree / "D")
    with pytest.raises(OutputError, match="contains the input|is the input|lies inside") as exc:
        deltacodec.decode("D/F.sld", out, force=True)
    assert "even with --force" in str(exc.value)
    assert listing(tree / "D") == before


@pytest.mark.parametrize("spelling", ["dec", "dec/", "./dec", "{abs}/dec", "linkdec"])
def test_decode_over_an_existing_adapter_directory_needs_force(tree, spelling):
    deltacodec.decode("D/F.sld", "dec")
    os.symlink("dec", tree / "linkdec")
    (tree / "dec" / "mine.txt").write_text("keep")
    before = listing(tree / "dec")
    out = spelling.format(abs=tree)
    with pytest.raises(OutputError, match="already exists.*--force") as exc:
        deltacodec.decode("D/F.sld", out)
    assert str(exc.value).startswith(out)
    assert listing(tree / "dec") == before
    deltacodec.decode("D/F.sld", "dec", dtype="fp16", force=True)  # replaces the whole directory
    assert sorted(os.listdir(tree / "dec")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_an_empty_directory_takes_a_directory_output_without_force(tree):
    (tree / "empty").mkdir()
    deltacodec.decode("D/F.sld", "empty")
    assert sorted(os.listdir(tree / "empty")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_an_output_of_the_other_kind_is_refused_even_with_force(tree):
    # -o models/ for a file, or -o notes.txt for a directory, would delete what is there
    for d in ("adir", "adir.safetensors"):
        (tree / d).mkdir()
        (tree / d / "x").write_text("x")
    (tree / "plain.txt").write_text("p")
    before = listing(tree)
    for force in (False, True):
        with pytest.raises(OutputError, match="is a directory"):
            deltacodec.encode("A", bits=2, out="adir", force=force)
        with pytest.raises(OutputError, match="is a directory"):
            deltacodec.decode("D/F.sld", "adir.safetensors", force=force)
        with pytest.raises(OutputError, match="not a directory"):
            deltacodec.decode("D/F.sld", "plain.txt", force=force)
    assert listing(tree) == before


@pytest.mark.parametrize("force", [False, True])
def test_a_file_output_with_a_trailing_slash_is_refused(tree, force):
    with pytest.raises(OutputError, match="names a directory"):
        deltacodec.encode("A", bits=2, out="new/", force=force)
    assert not (tree / "new").exists()


def test_existing_output_is_refused_without_force_and_replaced_with_it(tree):
    (tree / "o.sld").write_bytes(b"old")
    with pytest.raises(OutputError, match=r"^o.sld: already exists \(use --force"):
        deltacodec.encode("A", bits=2, out="o.sld")
    assert (tree / "o.sld").read_bytes() == b"old"
    deltacodec.encode("A", bits=2, out="o.sld", force=True)
    assert deltacodec.load("o.sld").modules


@pytest.mark.parametrize("spelling", ["P", "P/", "./P", "P/base/..", "linkP", "{abs}/P", "."])
def test_an_output_containing_an_input_is_refused(tree, spelling):
    (tree / "P" / "base").mkdir(parents=True)
    (tree / "P" / "base" / "w").write_text("w")
    os.symlink("P", tree / "linkP")
    with pytest.raises(OutputError, match="contains the input"):
        with staged_directory(spelling.format(abs=tree), inputs=["P/base/w"], force=True):
            pass
    assert (tree / "P" / "base" / "w").read_text() == "w"


# ----------------------------------------------------------------------------------------------
# Atomicity: failures at each step leave OUT as it was and nothing else behind


class Boom(Exception):
    pass


def _write(kind, out, force, fail_in_body=None):
    if kind == "file":
        with atomic_file(out, force=force) as fh:
            fh.write(b"new")
            if fail_in_body:
                raise fail_in_body
    else:
        with staged_directory(out, force=force) as st:
            with st.open("a/b.bin") as fh:
                fh.write(b"new")
            if fail_in_body:
                raise fail_in_body


def _prepare(tmp_path, kind, existing):
    out = tmp_path / "out"
    if existing:
        if kind == "file":
            out.write_bytes(b"old")
        else:
            out.mkdir()
            (out / "old.txt").write_text("old")
    return out, listing(tmp_path)


@pytest.mark.parametrize("kind", ["file", "dir"])
@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("exc", [Boom("x"), KeyboardInterrupt(), OSError(errno.EIO, "Input/output error")])
def test_an_exception_while_writing_leaves_out_as_it_was(tmp_path, kind, existing, exc):
    out, before = _prepare(tmp_path, kind, existing)
    with pytest.raises((type(exc), OutputError)):
        _write(kind, str(out), True, fail_in_body=exc)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("kind", ["file", "dir"])
@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EDQUOT, errno.EIO])
@pytest.mark.parametrize("step", ["create", "fsync", "rename"])
def test_os_errors_while_writing_are_output_errors_naming_the_users_path(tmp_path, monkeypatch, kind, existing, code, step):
    out, before = _prepare(tmp_path, kind, existing)
    err = OSError(code, os.strerror(code))
    real_open, real_mkdir = os.open, os.mkdir

    def failing(*a, **k):
        raise err

    if step == "create":
        monkeypatch.setattr(os, "open", lambda p, *a, **k: failing() if TEMP_PREFIX in str(p) else real_open(p, *a, **k))
        monkeypatch.setattr(os, "mkdir", lambda p, *a, **k: failing() if TEMP_PREFIX in str(p) else real_mkdir(p, *a, **k))
    elif step == "fsync":
        monkeypatch.setattr(os, "fsync", failing)
    else:
        monkeypatch.setattr(outputs, "_RENAMEAT2", False)
        for name in ("rename", "replace"):
            monkeypatch.setattr(os, name, failing)
    with pytest.raises(OutputError) as exc_info:
        _write(kind, str(out), True)
    msg = str(exc_info.value)
    assert msg.startswith(str(out)) and os.strerror(code) in msg and TEMP_PREFIX not in msg
    monkeypatch.undo()
    assert listing(tmp_path) == before


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_force_replaces_the_old_output_whole_with_and_without_an_atomic_exchange(tmp_path, monkeypatch, exchange, kind):
    if not exchange:
        monkeypatch.setattr(outputs, "_RENAMEAT2", False)
    out, _ = _prepare(tmp_path, kind, True)
    _write(kind, str(out), True)
    got = listing(tmp_path)
    want = {"out": b"new"} if kind == "file" else {"out": None, "out/a": None, "out/a/b.bin": b"new"}
    assert got == want


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_get_the_permissions_of_a_plain_open_and_mkdir(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_bytes(tmp_path / "f", b"x")
        with staged_directory(tmp_path / "d") as st:
            with st.open("sub/g") as fh:
                fh.write(b"y")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f").st_mode & 0o777 == 0o666 & ~mask
    for p in ("d", "d/sub"):
        assert os.stat(tmp_path / p).st_mode & 0o777 == 0o777 & ~mask, p
    assert os.stat(tmp_path / "d" / "sub" / "g").st_mode & 0o777 == 0o666 & ~mask


def test_parent_directories_are_created(tmp_path):
    write_bytes(tmp_path / "a" / "b" / "f", b"x")
    assert (tmp_path / "a" / "b" / "f").read_bytes() == b"x"


def test_check_output_needs_no_file_system_writes(tmp_path):
    t = check_output(tmp_path / "nowhere" / "x.sld", [tmp_path / "in.bin"])
    assert not t.exists and not (tmp_path / "nowhere").exists()


# ----------------------------------------------------------------------------------------------
# Leftovers of killed runs


def _dead_pid() -> int:
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_runs_are_removed_and_reported_live_ones_kept(tmp_path):
    host = outputs._host_tag()
    other = "0" * 8 if host != "0" * 8 else "1" * 8
    dead = _dead_pid()
    sleeper = subprocess.Popen([PY, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        names = {
            "dead_file": f"{TEMP_PREFIX}{dead}-{host}-0123abcd",
            "dead_dir": f"{TEMP_PREFIX}{dead}-{host}-89abcdef",
            "live": f"{TEMP_PREFIX}{sleeper.pid}-{host}-00000000",
            "self": f"{TEMP_PREFIX}{os.getpid()}-{host}-11111111",
            "other_host": f"{TEMP_PREFIX}{dead}-{other}-22222222",
            "old": f"{TEMP_PREFIX}{dead}-{host}-33333333.old",
            "legacy": ".sld-abcd1234.tmp",
            "unrelated": ".sld-tmp-notours",
        }
        for key, n in names.items():
            if key in ("dead_dir", "old"):
                (tmp_path / n).mkdir()
                (tmp_path / n / "w.safetensors").write_bytes(b"x" * 100)
            else:
                (tmp_path / n).write_bytes(b"x")
        with pytest.warns(DeltacodecWarning) as rec:
            write_bytes(tmp_path / "out.sld", b"data")
        text = " ".join(str(w.message) for w in rec)
        left = set(os.listdir(tmp_path))
        for key in ("dead_file", "dead_dir"):
            assert names[key] not in left and names[key] in text
        for key in ("live", "self", "other_host", "old", "legacy", "unrelated"):
            assert names[key] in left, key
        for key in ("old", "legacy"):
            assert names[key] in text  # reported, not removed
        for key in ("live", "self", "other_host", "unrelated"):
            assert names[key] not in text
        with pytest.warns(DeltacodecWarning, match="kept"):  # a second pass removes nothing more
            assert clean_leftovers(tmp_path) == []
    finally:
        sleeper.kill()
        sleeper.wait()


# a child process that says "ready" at its first fsync and then waits there, for the test to kill
_FSYNC_HOOK = r"""
import os, sys
real = os.fsync
def fsync(fd):
    real(fd)
    sys.stdout.write("ready\n"); sys.stdout.flush()
    sys.stdin.read()  # the test kills this process (SIGKILL or SIGTERM) while it waits here
os.fsync = fsync
"""
_BLOCK_AT_FIRST_FSYNC = _FSYNC_HOOK + r"""
import deltacodec
from deltacodec.cli_apply import apply_checkpoint
exec(sys.argv[1])
"""


def _run_until_first_fsync_then_kill(stmt: str, parent) -> int:
    p = subprocess.Popen([PY, "-c", _BLOCK_AT_FIRST_FSYNC, stmt], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # A generous cap for a slow machine; the test waits for the run's own signal, not a time.
        ready, _, _ = select.select([p.stdout], [], [], 300)
        line = p.stdout.readline() if ready else b""
        assert line == b"ready\n", p.stderr.read().decode() if p.poll() is not None else "no signal in 300 s"
        assert any(n.startswith(f"{TEMP_PREFIX}{p.pid}-") for n in os.listdir(parent)), os.listdir(parent)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        p.stderr.close()
        p.stdin.close()
    return p.pid


def _small_checkpoint(d):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    d.mkdir()
    save_file({"layers.0.q_proj.weight": rng.normal(size=(32, 48)).astype(np.float32),
               "layers.0.down_proj.weight": rng.normal(size=(48, 64)).astype(np.float32)},
              str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")


COMMANDS = {
    "encode": ("deltacodec.encode('A', bits=3, out=OUT, force=FORCE)", "file"),
    "decode-dir": ("deltacodec.decode('D/F.sld', OUT, force=FORCE)", "dir"),
    "decode-file": ("deltacodec.decode('D/F.sld', OUT + '.safetensors', force=FORCE)", "file"),
    "apply": ("apply_checkpoint('base', 'D/F.sld', OUT, force=FORCE)", "dir"),
}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_kill_9_mid_write_leaves_out_whole_and_the_next_run_cleans_up(tree, command, existing):
    stmt, kind = COMMANDS[command]
    _small_checkpoint(tree / "base")
    out = str(tree / "out" / "o")
    final = out + ".safetensors" if command == "decode-file" else out
    os.makedirs(tree / "out")
    if existing:
        if kind == "file":
            open(final, "wb").write(b"old")
        else:
            os.mkdir(final)
            open(os.path.join(final, "old.txt"), "w").write("old")
    before = listing(tree / "out")
    code = stmt.replace("OUT", repr(out)).replace("FORCE", repr(existing))
    pid = _run_until_first_fsync_then_kill(code, tree / "out")
    leftovers = [n for n in os.listdir(tree / "out") if n.startswith(f"{TEMP_PREFIX}{pid}-")]
    assert leftovers  # the killed run's temporary is there...
    after_kill = {k: v for k, v in listing(tree / "out").items() if not k.startswith(TEMP_PREFIX)}
    assert after_kill == before  # ...and OUT is as it was: absent, or the old whole
    # the next run into the same directory succeeds, removes the leftover and says so
    with pytest.warns(DeltacodecWarning, match="leftover") as rec:
        exec(code, {"deltacodec": deltacodec, "apply_checkpoint": apply_checkpoint})
    assert any(leftovers[0] in str(w.message) for w in rec)
    assert temps(tree / "out") == []
    if kind == "dir":
        assert "old.txt" not in os.listdir(final)
    else:
        assert open(final, "rb").read() != b"old"


def test_sld_decode_after_a_kill_reports_the_removed_leftover_on_stderr(tree):
    pid = _run_until_first_fsync_then_kill("deltacodec.decode('D/F.sld', 'dec')", tree)
    assert not (tree / "dec").exists()
    res = subprocess.run([PY, "-m", "deltacodec.cli", "decode", "D/F.sld", "-o", "dec", "-q"],
                         capture_output=True, text=True, cwd=tree)
    assert res.returncode == 0, res.stderr
    assert f"{TEMP_PREFIX}{pid}-" in res.stderr and "leftover" in res.stderr
    assert temps(tree) == [] and sorted(os.listdir(tree / "dec")) == ["adapter_config.json", "adapter_model.safetensors"]


# ----------------------------------------------------------------------------------------------
# The examples through the command line: exit 1, one line naming the user's path


def sld(*args, cwd):
    return subprocess.run([PY, "-m", "deltacodec.cli", *args], capture_output=True, text=True, cwd=cwd)


def one_line_error(res, *fragments):
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    errs = [ln for ln in res.stderr.splitlines() if ln.startswith("sld: error:")]
    assert len(errs) == 1, res.stderr
    for f in fragments:
        assert f in errs[0], errs[0]
    assert TEMP_PREFIX not in res.stderr


def _cli_has_force(verb: str, cwd) -> bool:
    return "--force" in sld(verb, "--help", cwd=cwd).stdout


def test_cli_examples_of_lost_inputs_exit_1(tree):
    before_a, before_d = listing(tree / "A"), listing(tree / "D")
    one_line_error(sld("encode", "A/adapter_model.safetensors", "-o", "A/adapter_model.safetensors", cwd=tree),
                   "A/adapter_model.safetensors")
    deltacodec.decode("D/F.sld", "dec")
    one_line_error(sld("decode", "D/F.sld", "-o", "dec", cwd=tree), "dec", "--force")
    one_line_error(sld("decode", "D/F.sld", "-o", "D/F.sld", cwd=tree), "D/F.sld")
    if _cli_has_force("encode", tree):  # the --force flags of encode/decode come with the CLI work
        one_line_error(sld("encode", "A/adapter_model.safetensors", "-o", "A/adapter_model.safetensors", "--force",
                           cwd=tree), "input")
        one_line_error(sld("decode", "D/F.sld", "-o", "D", "--force", cwd=tree), "contains the input")
    (tree / "P").mkdir()
    _small_checkpoint(tree / "P" / "base")
    before_p = listing(tree / "P")
    for out in ("P", "P/", "./P", "P/base/.."):
        one_line_error(sld("apply", "P/base", "D/F.sld", "-o", out, "--force", cwd=tree), out, "contains the input")
    one_line_error(sld("apply", "P/base", "D/F.sld", "-o", "P/base", "--force", cwd=tree), "is the input")
    one_line_error(sld("apply", "P/base", "D/F.sld", "-o", "D", "--force", cwd=tree), "contains the input")
    assert listing(tree / "A") == before_a and listing(tree / "D") == before_d and listing(tree / "P") == before_p
    assert temps(tree) == []


_CLI_BLOCK_AT_FIRST_FSYNC = _FSYNC_HOOK + r"""
from deltacodec.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("verb", ["encode", "decode"])
def test_sigterm_mid_write_removes_the_temporary_and_exits_130(tmp_path, verb):
    src = str(tmp_path / "a")
    make_adapter(src)
    sld = deltacodec.encode(src, bits=3, out=str(tmp_path / "a.sld"))
    out = tmp_path / "out" / ("x.sld" if verb == "encode" else "dec")
    out.parent.mkdir()
    args = ["encode", src, "-o", out, "-q"] if verb == "encode" else ["decode", sld, "-o", out, "-q"]
    p = subprocess.Popen([PY, "-c", _CLI_BLOCK_AT_FIRST_FSYNC, *map(str, args)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([p.stdout], [], [], 300)
        assert ready and p.stdout.readline() == b"ready\n", "no signal in 300 s"
        assert any(n.startswith(TEMP_PREFIX) for n in os.listdir(out.parent))
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=300)
        err = p.stderr.read().decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for fh in (p.stdout, p.stderr, p.stdin):
            fh.close()
    assert rc == 130 and err == "sld: interrupted\n", (rc, err)
    assert os.listdir(out.parent) == []  # no temporary, no partial output
