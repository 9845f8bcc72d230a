"""``python -m mbssl_dist.launch [torchrun flags] -m mbssl_dist.train ...`` (``mbssl-torchrun``)

torchrun with the workers' exit status. Plain ``torchrun`` exits 1 whenever a worker fails,
so the trainer's documented codes (2 = config/data error, 3 = non-finite loss) are lost.
This launcher runs torchrun's own code (``torch.distributed.run``: same flags, same parser,
same elastic agent), catches the agent's ``ChildFailedError`` and exits with the exit code
of the *first* failed worker (earliest error-file timestamp, then lowest rank; a worker
killed by signal N gives 128 + N, as a shell would; the launcher itself stopped by SIGTERM
or SIGINT -- Slurm cancel, preemption, requeue -- exits 128 + N after torchrun has stopped
its workers). It logs which rank failed, its exit
code, its error file and, where the worker recorded one (``@record`` on ``train.main``),
its traceback -- also when that rank's console output is filtered out by
``--local-ranks-filter``.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("mbssl_dist.launch")


def exit_code_of(failure) -> int:
    """A worker's exit status as a shell reports it: its code, or 128 + signal number."""
    code = int(failure.exitcode)
    if code < 0:
        return 128 + (-code)
    return code if code > 0 else 1


def recorded_traceback(data) -> str:
    """The Python traceback torch elastic's ``@record`` wrote into a worker's error file."""
    msg = data.get("message") if isinstance(data, dict) else None
    if isinstance(msg, dict):
        return str(msg.get("extraInfo", {}).get("py_callstack", ""))
    return ""


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s [launcher] %(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = exit_code_of(failure)
        others = sorted(r for r in e.failures if r != rank)
        has_file = bool(failure.error_file) and os.path.isfile(failure.error_file)
        error_file = failure.error_file if has_file else "none"
        log.error("rank %d (local rank %d, pid %d) failed first with exit code %d%s; error file: %s%s",
                  rank, failure.local_rank, failure.pid, code,
                  f" ({failure.signal_name()})" if failure.exitcode < 0 else "", error_file,
                  f"; also failed: ranks {others}" if others else "")
        trace = recorded_traceback(failure.error_file_data) if has_file else ""
        if trace:
            log.error("rank %d traceback:\n%s", rank, trace.rstrip())
        else:
            log.error("rank %d recorded no traceback (it exited by itself or was killed): see its stderr "
                      "(--log-dir), final.json and the exit-code table in README", rank)
        print(f"worker rank {rank} failed with exit code {code} (error file: {error_file})", file=sys.stderr)
        return code
    except SignalException as e:
        # the launcher itself got SIGTERM/SIGINT (Slurm cancel, preemption, requeue; Ctrl-C):
        # torchrun has already sent its workers the signal; exit as a signalled process would
        log.error("launcher got %s: workers stopped", e.sigval.name)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
