"""One error path for the command-line tools: every error ends in a line or two naming the file, field or
flag and what to do; exit status 2 for a user's mistake (config, data, paths, a refused resume), 1 for a
failure (disk full, a corrupt checkpoint, a diverged run, anything unexpected), 130 for Ctrl-C. No
traceback unless RMFAST_DEBUG=1 (read here, and only here)."""

import argparse
import errno
import os
import sys

USAGE = 2
FAILURE = 1
INTERRUPTED = 130


class UserError(ValueError):
    """A user's mistake (a flag, a path, data, a refused request): exit status 2, the message says what to do.
    Any other exception, a ValueError from inside a library included, is a failure: exit status 1, its type
    named, the traceback with RMFAST_DEBUG=1."""


class Failure(RuntimeError):
    """A failure whose message says all a person needs (exit status 1, no traceback)."""


class RankLost(Failure):
    """Another rank stopped answering (frozen past the collective timeout, or dead): every live rank says so,
    not only rank 0, since rank 0 may be the one that is gone."""


class Stopped(Failure):
    """The process was told to stop (SIGTERM) before its work was done."""


def lost_rank(exc):
    """What a collective's error says of the other ranks ('timed out' or 'died'), or None when it is not one."""
    text = str(exc)
    if not isinstance(exc, RuntimeError):
        return None
    if "Timed out" in text or "timed out" in text or "Timeout" in text:
        return "another rank stopped answering (no collective within train.collective_timeout)"
    if any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                               "NCCL communicator was aborted")):
        return "another rank died"
    return None


class CheckpointError(Failure):
    """A checkpoint could not be written or read: the message names it and what is still intact."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with an error of two lines: what is wrong, and where every option is listed (not the
    whole usage block, which for rmfast-train is some sixty lines of options)."""

    def error(self, message):
        self.exit(USAGE, f"{self.prog}: {message}\n(`{self.prog} --help` lists every option)\n")


def debugging():
    return os.environ.get("RMFAST_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def describe(exc):
    """(exit status, message) for an exception that reached a command-line tool."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return FAILURE, f"no space left on device{where}; free some space and run again"
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("unexpected pos", "PytorchStreamWriter",
                                                                     "file write failed")):
        return FAILURE, f"writing a file failed, most likely a full disk (torch: {_first_line(exc)})"
    if isinstance(exc, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return USAGE, str(exc)
    if isinstance(exc, (Failure, OSError)):
        return FAILURE, str(exc)
    return FAILURE, f"{type(exc).__name__}: {_first_line(exc)} (RMFAST_DEBUG=1 shows where)"


def run(prog, body, interrupted=None, rank=0):
    """Run a tool's body; returns its exit status. interrupted(): what to say after Ctrl-C (e.g. how to
    resume). rank: of a distributed run. Rank 0 says everything; another rank says its own failures,
    prefixed with its rank (a failure on rank 5 alone would otherwise look like rank 0 hanging), and keeps
    quiet on a user's mistake and on Ctrl-C, which every rank meets alike and rank 0 reports."""
    quiet = rank != 0
    try:
        return body() or 0
    except KeyboardInterrupt:
        if debugging():
            raise
        if not quiet:
            print(f"\n{prog}: interrupted" + (f"; {interrupted()}" if interrupted else ""), file=sys.stderr)
        return INTERRUPTED
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 — the one place every error of a tool is turned into a message
        if debugging():
            raise
        status, message = describe(exc)
        if isinstance(exc, (RankLost, Stopped)):
            # a lost rank: every rank speaks (rank 0 may be the one gone); then out at once: the process
            # group cannot be left (a collective would hang), and a gloo group alive at interpreter exit
            # aborts the process after the message
            if not quiet or isinstance(exc, RankLost):
                print(f"{prog}: {message}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(status)
        if not quiet:
            print(f"{prog}: {message}", file=sys.stderr)
        elif status == FAILURE:
            print(f"{prog}: rank {rank}: {message}", file=sys.stderr, flush=True)
        return status


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
