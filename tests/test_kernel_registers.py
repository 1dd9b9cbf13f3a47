"""``scripts/kernel_registers.py``: the row kernel compiled for sm_90a without a GPU, ptxas's registers and spills
read back; a bad call name is one ``error:`` line and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _scripts import SCRIPTS, load_script

from moe_emergence.kernels.triton_launch import INTERPRET

kernel_registers = load_script("kernel_registers")
pytestmark = pytest.mark.skipif(INTERPRET, reason="compiles for the GPU: not under TRITON_INTERPRET")


def test_a_call_compiles_for_hopper_and_reports_its_registers():
    kernel = kernel_registers.compile_call("dZ", (64, 128, 64, 4, 3, False))
    regs, stores, loads = kernel_registers.registers(kernel)
    assert 16 <= regs <= 255  # Hopper's most registers a thread
    assert stores >= 0 and loads >= 0
    conversions, tanh = kernel_registers.layout_ops(kernel)
    # GELU'(z) once a value: the chain is not duplicated across layouts. Only Triton 3.6 (the GPU machines') made
    # two of the form before bd53fb4; with 3.9 (pip on the CPU machines) this is a smoke test
    assert tanh == 1
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
