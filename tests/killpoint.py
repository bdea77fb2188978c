"""Run a script and SIGKILL it just before its N-th file replacement (tests/test_crash.py's kill-point harness).

    python tests/killpoint.py N COUNT_FILE -m package.module [args ...]
    python tests/killpoint.py N COUNT_FILE script.py [args ...]
    python tests/killpoint.py N COUNT_FILE --only SUBSTRING ...   (count only replacements whose target has it)

Every ``os.replace`` and ``os.rename`` of the main process (each atomic file write, each temp folder's final rename,
each swap of an old folder aside) is counted; the N-th kills the process with SIGKILL before it happens, exactly as a
power cut or the OOM killer would at that point. N = 0 never kills. The count so far is kept in COUNT_FILE, so a run
with N = 0 tells how many kill points a stage has. Loader worker processes (forked children) are not counted.
"""
import os
import runpy
import signal
import sys


def install(n, count_file, only=None):
    pid, state = os.getpid(), {"n": 0}

    def hook(real):
        def counted(src, dst, *args, **kwargs):
            if os.getpid() == pid and (only is None or only in os.fspath(dst)):
                state["n"] += 1
                if state["n"] == n:
                    os.kill(pid, signal.SIGKILL)
                with open(count_file, "w") as f:
                    f.write(str(state["n"]))
            return real(src, dst, *args, **kwargs)
        return counted
    os.replace, os.rename = hook(os.replace), hook(os.rename)


if __name__ == "__main__":
    n, count_file, *argv = sys.argv[1:]
    only = None
    if argv[0] == "--only":
        only, argv = argv[1], argv[2:]
    with open(count_file, "w") as f:
        f.write("0")
    install(int(n), count_file, only)
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
