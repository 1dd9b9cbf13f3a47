"""``scripts/kernel_registers.py``: the row kernel compiled for sm_90a without a GPU, ptxas's registers and spills
read back; a bad call name is one ``error:`` line and exit status 2."""

from __future__ import annotations

import subprocess
import sys

from _scripts import SCRIPTS, load_script

kernel_registers = load_script("kernel_registers")


def test_a_call_compiles_for_hopper_and_reports_its_registers():
    kernel = kernel_registers.compile_call("dZ", (64, 128, 64, 4, 3, False))
    regs, stores, loads = kernel_registers.registers(kernel)
    assert 16 <= regs <= 255  # Hopper's most registers a thread
    assert stores >= 0 and loads >= 0
    conversions, tanh = kernel_registers.layout_ops(kernel)
    assert tanh == 1  # GELU'(z) once a value: the chain is not duplicated across layouts
    assert conversions >= 1  # z's tile into the accumulator's layout at least


def test_an_unknown_call_is_one_error_line():
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "kernel_registers.py"), "--calls", "up", "upp"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["error: --calls: unknown upp; allowed: up, down, dZ, dX"]
    assert run.stdout == ""
