"""cli.py, the edge every script shares: which errors become one line and which exit code, the path and seed
checks of the command line, atomic folders. (Each script's own refusals, under real conditions, are tested
with the script; atomic_write's disk-full behaviour with the study's storage in test_results.py.)"""
import errno

import pytest

import cli

# what torch 2's CPU allocator raises when an allocation fails (a plain RuntimeError; test_cnn.py makes it fail
# for real under a memory limit)
CPU_ALLOCATOR = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 70368744177664 bytes. Error code 12 (Cannot allocate memory)")


def run_raising(exc: BaseException, capsys) -> tuple[int, list[str]]:
    def main(argv):
        raise exc
    code = cli.run(main, "prog.py", [], oom_hint="; use a smaller --batch-size", on_interrupt="nothing saved")
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("exc, code, line", [
    (cli.UserError("bad value"), 1, "prog.py: error: bad value"),
    (cli.Diverged("the loss blew up"), 3, "prog.py: error: the loss blew up"),
    (KeyboardInterrupt(), 130, "prog.py: interrupted (Ctrl-C); nothing saved"),
    (OSError(errno.ENOSPC, "No space left on device", "/x/y.npz"), 1,
     "prog.py: error: /x/y.npz: No space left on device"),
    (MemoryError(), 1, "prog.py: error: out of memory (MemoryError); use a smaller --batch-size"),
    (RuntimeError(CPU_ALLOCATOR), 1, f"prog.py: error: out of memory ({CPU_ALLOCATOR}); use a smaller --batch-size"),
])
def test_the_closed_list_of_errors_is_one_line_and_an_exit_code(capsys, exc, code, line):
    assert run_raising(exc, capsys) == (code, [line])


@pytest.mark.parametrize("exc", [RuntimeError("shape mismatch"), OSError(errno.ECONNRESET, "reset"), KeyError("x")])
def test_any_other_error_is_a_bug_and_keeps_its_traceback(capsys, exc):
    with pytest.raises(type(exc)):
        run_raising(exc, capsys)


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], f"argument --seed: must be an integer in [0, {cli.MAX_SEED}], got '-1'"),
    (["--seed", str(cli.MAX_SEED + 1)], "argument --seed: must be an integer in [0, "),
    (["--seed", "1.5"], "argument --seed: must be an integer in [0, "),
    (["--out", " "], "argument --out: must not be empty"),
])
def test_a_bad_flag_is_one_usage_line_and_exit_2(capsys, args, message):
    parser = cli.ArgumentParser(prog="prog.py")
    parser.add_argument("--seed", type=cli.seed_arg, default=0)
    parser.add_argument("--out", type=cli.path_arg)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith(f"prog.py: error: {message}")
    assert parser.parse_args(["--seed", str(cli.MAX_SEED)]).seed == cli.MAX_SEED


def test_cannot_write_says_what_is_in_the_way(tmp_path):
    (tmp_path / "a_file").write_text("")
    assert cli.cannot_write(tmp_path / "a_file", folder=True) == f"{tmp_path / 'a_file'} is a file, not a folder"
    assert cli.cannot_write(tmp_path / "a_file" / "x" / "y.json", folder=False) == \
        f"{tmp_path / 'a_file'} is a file, not a folder"
    assert cli.cannot_write(tmp_path, folder=False) == f"{tmp_path} is a folder, not a file"
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert cli.cannot_write(tmp_path / "link", folder=True) == f"{tmp_path / 'link'} is a broken link, not a folder"
    assert cli.cannot_write("/proc/no/such", folder=True).startswith("cannot write in /proc/no/such")


def test_cannot_write_makes_the_missing_folders_of_a_writable_path(tmp_path):
    assert cli.cannot_write(tmp_path / "a" / "b.npz", folder=False) is None and (tmp_path / "a").is_dir()
    assert cli.cannot_write(tmp_path / "c" / "d", folder=True) is None and (tmp_path / "c" / "d").is_dir()
    assert not list((tmp_path / "c" / "d").iterdir())  # the probe leaves nothing behind


def test_atomic_folder_replaces_a_folder_whole_or_not_at_all(tmp_path, monkeypatch):
    dest = tmp_path / "model"
    cli.atomic_folder(dest, {"a.pt": b"old a", "b.npz": b"old b"})
    cli.atomic_folder(dest, {"a.pt": b"new a"})
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {"a.pt": b"new a"}
    written = []

    def full_disk_on_the_second_file(path, data):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        path.write_bytes(data)
    monkeypatch.setattr(cli, "atomic_write", full_disk_on_the_second_file)
    with pytest.raises(OSError):
        cli.atomic_folder(dest, {"a.pt": b"newer a", "b.npz": b"newer b"})
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {"a.pt": b"new a"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no partial copy, no hidden leftover
