#!/usr/bin/env python
"""Issue 23's SIGSEGV, reproduced with OpenVINO alone (no torch, no onnxruntime, no vdeploy): a report-ready script.

    python benchmarks/openvino_altstack.py            # every case, each in a fresh child process
    python benchmarks/openvino_altstack.py --case two-cores-in-creation-order --child   # one case, in this process

OpenVINO's CPU plugin (one per ``ov.Core``, created by the Core's first CPU call) gives the thread that creates it
a new signal stack (``sigaltstack``; ``SigAltStackSetup`` in the plugin's ``sigstack_manager``, sized for AMX state),
and when the plugin is destroyed it unmaps that stack and restores the stack it found, on whatever thread
destroys it. So:

* ``two-cores-in-creation-order``: two Cores on one thread, the first destroyed first. The second's destructor
  restores the first's stack, which is already unmapped.
* ``core-freed-on-another-thread``: a Core used on the main thread, its last reference dropped on another thread.
  The main thread keeps a signal stack that no longer exists.
* ``one-core-kept`` (the control, vdeploy's fix): one Core for the process, never destroyed.

Each case then sends SIGUSR1 to the process, which has a Python handler (CPython installs every handler with
``SA_ONSTACK``): the kernel cannot write the signal frame onto the unmapped stack and kills the process with
SIGSEGV (si_code SI_KERNEL, in whatever syscall the thread was in: in the test suite, the main thread's
``time.sleep`` inside ``subprocess.run`` when the child's SIGCHLD came, with torch's DataLoader SIGCHLD handler
installed). The script prints each case's signal-stack address before and after, whether it is still mapped, and
how the child ended.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import signal
import subprocess
import sys
import threading


class _Stack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def signal_stack() -> tuple[int, bool]:
    """This thread's signal stack address (0: none) and whether that address is mapped in the process."""
    ss = _Stack()
    ctypes.CDLL(None).sigaltstack(None, ctypes.byref(ss))
    sp = ss.ss_sp or 0
    with open("/proc/self/maps") as f:
        mapped = any(lo <= sp < hi for lo, hi in ((int(a, 16), int(b, 16)) for a, b in
                                                  (line.split()[0].split("-") for line in f)))
    return sp, mapped or sp == 0


def _cpu_call(core) -> None:
    core.get_property("CPU", "FULL_DEVICE_NAME")  # creates the Core's CPU plugin (as a compile_model does)


def case_two_cores_in_creation_order(ov) -> None:
    a = ov.Core()
    _cpu_call(a)
    b = ov.Core()
    _cpu_call(b)
    del a
    gc.collect()
    del b
    gc.collect()


def case_core_freed_on_another_thread(ov) -> None:
    box = [ov.Core()]
    _cpu_call(box[0])
    t = threading.Thread(target=box.clear)
    t.start()
    t.join()
    gc.collect()


KEPT = []


def case_one_core_kept(ov) -> None:
    for _ in range(2):  # every use goes through the one Core
        if not KEPT:
            KEPT.append(ov.Core())
        _cpu_call(KEPT[0])
    t = threading.Thread(target=lambda: _cpu_call(KEPT[0]))
    t.start()
    t.join()


CASES = {"two-cores-in-creation-order": case_two_cores_in_creation_order,
         "core-freed-on-another-thread": case_core_freed_on_another_thread,
         "one-core-kept": case_one_core_kept}


def child(case: str) -> int:
    import openvino as ov

    signal.signal(signal.SIGUSR1, lambda *_: print("SIGUSR1 handled", flush=True))
    before = signal_stack()
    CASES[case](ov)
    sp, mapped = signal_stack()
    print(f"openvino {ov.__version__}: signal stack {before[0]:#x} -> {sp:#x}, "
          f"{'mapped' if mapped else 'UNMAPPED'}", flush=True)
    os.kill(os.getpid(), signal.SIGUSR1)
    print("survived", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="a case (default: every one)")
    parser.add_argument("--child", action="store_true", help="run the one --case in this process")
    args = parser.parse_args(argv)
    if args.child:
        if not args.case or len(args.case) != 1:
            parser.error("--child takes exactly one --case")
        return child(args.case[0])
    crashed = {}
    for case in args.case or CASES:
        run = subprocess.run([sys.executable, __file__, "--child", "--case", case], capture_output=True, text=True,
                             timeout=120)
        how = f"killed by {signal.Signals(-run.returncode).name}" if run.returncode < 0 else f"exit {run.returncode}"
        crashed[case] = run.returncode != 0
        print(f"{case}: {how}; {run.stdout.strip()}" + (f"; {run.stderr.strip()[-300:]}" if run.stderr.strip() else ""))
    # exit 0 when the report is as described: the two hazards crash, the control does not
    return 0 if crashed == {c: c != "one-core-kept" for c in crashed} else 1


if __name__ == "__main__":
    raise SystemExit(main())
