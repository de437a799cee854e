"""A DDP rank can hang forever when its DistributedDataParallel module is freed after
``destroy_process_group`` (pytorch #56297, open).

A finding (docs/torch-notes.md). The Reducer holds the last reference to the gloo process
group once ``destroy_process_group`` has dropped the others; freeing the module (here: the
function that made it returns) runs ``ProcessGroupGloo``'s destructor with the GIL held, and it
joins the gloo worker threads. A worker thread still dropping the last reference to a work of
the DDP step (``~AsyncAllreduceWork``: its ThreadLocalState holds a Python object) waits for
the GIL: neither thread moves again. Timing decides, so it takes repetition: each run starts
``--world`` rank processes that each do ``--cycles`` rounds of init (gloo, CPU), a DDP step, a
barrier, destroy, return; a run not finished within ``--timeout`` seconds hung (with gdb on
PATH, the hung rank's native stacks are shown), and is killed with its whole process group.
``--free before`` frees the module before destroy instead: the control, which does not hang.
Torch only, no pipeline_lib: ``python scripts/repro/ddp_hang_at_exit.py``. Exits 0 when a run
hung (the finding holds), 1 when none did. On torch 2.13.0+cpu here every run of 20-30 cycles hung
(15 of 15), a first cycle never (45 seen), the control never (300 cycles).
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta


def one_cycle(store, cycle: int, rank: int, world: int, free_first: bool) -> None:
    """As a training script ends: init, a DDP step, barrier, destroy, return (DDP freed);
    ``free_first``: the DDP module freed before destroy (the control: no hang)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    prefixed = dist.PrefixStore(f"cycle-{cycle}", store)
    dist.init_process_group("gloo", store=prefixed, rank=rank, world_size=world)
    model = DistributedDataParallel(torch.nn.Linear(8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    dist.barrier()
    if free_first:
        del model, optimizer
    dist.destroy_process_group()


def rank_main(args) -> None:
    import torch.distributed as dist

    store = dist.TCPStore(
        "127.0.0.1", args.port, args.world, is_master=args.rank == 0,
        timeout=timedelta(seconds=args.timeout),
    )  # fmt: skip
    for cycle in range(args.cycles):
        one_cycle(store, cycle, args.rank, args.world, args.free == "before")
        print(f"rank {args.rank}: cycle {cycle} ended", flush=True)
        store.add(f"done-{cycle}", 1)  # every rank ends the cycle before the next one's init
        while store.add(f"done-{cycle}", 0) < args.world:
            time.sleep(0.01)
    print(f"rank {args.rank}: {args.cycles} cycles", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def native_stacks(pid: int) -> str:
    """The native stacks (gdb) of a process's main thread and of any thread waiting for the
    GIL (``take_gil``), function names only."""
    if not shutil.which("gdb"):
        return "    (no gdb on PATH: no native stacks)"
    out = subprocess.run(
        ["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 30"],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    shown = []
    for thread in out.split("\nThread ")[1:]:
        lines = thread.splitlines()
        frames = [re.sub(r"^#\d+\s+(0x\w+ in )?", "", line).split(" (")[0]
                  for line in lines if line.startswith("#")]  # fmt: skip
        if thread.startswith("1 ") or "take_gil" in frames:
            shown.append(f"  thread {lines[0].split(' (')[0]}:")
            shown += [f"    {frame}" for frame in frames[:14]]
    return "\n".join(shown)


def start_rank(args, rank: int, port: int) -> subprocess.Popen:
    """Rank ``rank`` of a run: this script with --rank, in a process group of its own."""
    options = {"--rank": rank, "--world": args.world, "--port": port, "--cycles": args.cycles,
               "--timeout": args.timeout, "--free": args.free}  # fmt: skip
    command = [sys.executable, __file__, *(str(x) for kv in options.items() for x in kv)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def one_run(args, run: int) -> bool:
    """One run of ``--world`` ranks; True when it hung (then killed)."""
    port = free_port()
    ranks = [start_rank(args, rank, port) for rank in range(args.world)]
    deadline = time.monotonic() + args.timeout
    for proc in ranks:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
    hung = [r for r, proc in enumerate(ranks) if proc.poll() is None]
    stacks = {r: native_stacks(ranks[r].pid) for r in hung}
    for proc in ranks:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for r, proc in enumerate(ranks):
        out = proc.stdout.read()
        ended = out.count("cycle ")
        if r in hung and "join" in stacks[r]:
            print(f"run {run}: rank {r} hung in cycle {ended} (did not exit within "
                  f"{args.timeout:g} s):\n{stacks[r]}", flush=True)  # fmt: skip
        elif r in hung:
            print(f"run {run}: rank {r} waits for its peers after cycle {ended - 1}")
        elif proc.returncode != 0:
            print(f"run {run}: rank {r} exited with {proc.returncode}:\n{out[-2000:]}")
    return bool(hung)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="launches of --world ranks")
    parser.add_argument("--cycles", type=int, default=20, help="init/step/destroy per rank")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per run")
    parser.add_argument(
        "--free", choices=("after", "before"), default="after",
        help="free the DDP module after destroy_process_group (hangs) or before (the control)",
    )  # fmt: skip
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        return rank_main(args)
    import torch

    hung = sum(one_run(args, run) for run in range(1, args.runs + 1))
    print(
        f"torch {torch.__version__}: {hung} of {args.runs} runs hung "
        f"({args.cycles} cycles of {args.world} ranks each, DDP freed {args.free} destroy)"
    )
    sys.exit(0 if hung else 1)


if __name__ == "__main__":
    main()
