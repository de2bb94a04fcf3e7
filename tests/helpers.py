"""Plain helpers the tests import (fixtures live in the conftest.py of the folder that uses them): the
repository's root, one comparison of a fast path against its reference (`assert_close`, `errors`), and the
processes a test's own Ray left behind (`processes_under`, `stop_processes`)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent   # the repository's root: configs/, scripts/, docker/

MEASURES = ("abs", "rel", "elem", "norm")


def errors(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """The distance from `out` to `ref` in each of the MEASURES, computed in float64 (0 for empty tensors).

    abs:  max |out - ref|
    rel:  max |out - ref| / max |ref|: the error on the reference's scale
    elem: max over elements of |out - ref| / (1 + |ref|): below tol exactly when every element passes
          torch.testing.assert_close(atol=tol, rtol=tol), for results whose elements span magnitudes
    norm: ||out - ref|| / ||ref||: the whole tensor's relative error, for GPU comparisons of every
          parameter gradient, where a few of millions of elements may stray without the result being wrong
    """
    if ref.numel() == 0:
        return dict.fromkeys(MEASURES, 0.0)
    ref, out = ref.detach().double(), out.detach().double()
    diff = (out - ref).abs()
    return {
        "abs": diff.max().item(),
        "rel": (diff.max() / ref.abs().max().clamp_min(1e-30)).item(),
        "elem": (diff / (1 + ref.abs())).max().item(),
        "norm": (diff.norm() / ref.norm().clamp_min(1e-30)).item(),
    }


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float, *, measure: str = "abs") -> None:
    """Fails unless `out` matches `ref`: the error in `measure` (see `errors`) is below `tol`, or is 0.

    Both tensors must be finite and agree in shape, dtype and device. tol=0 asks for bit-equality. The
    message names the comparison, its max abs and max rel errors, and the tolerance with its measure.
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    for role, t in (("reference", ref), ("result", out)):
        if not torch.isfinite(t).all():
            raise AssertionError(f"{name}: the {role} holds {int((~torch.isfinite(t)).sum())} NaN or inf values")
    if ref.shape != out.shape or ref.dtype != out.dtype or ref.device != out.device:
        raise AssertionError(f"{name}: result is {tuple(out.shape)} {out.dtype} on {out.device}, "
                             f"reference {tuple(ref.shape)} {ref.dtype} on {ref.device}")
    err = errors(ref, out)
    if not (err[measure] < tol or err[measure] == 0):
        also = "" if measure in ("abs", "rel") else f", {measure} error {err[measure]:.3g}"
        raise AssertionError(f"{name}: max abs error {err['abs']:.3g}, max rel error {err['rel']:.3g}{also}; "
                             f"tolerance {tol:.3g} on the {measure} error")


def processes_under(marker: str) -> list[int]:
    """PIDs of our own processes whose command line names `marker` (a unique temp dir), and their children.

    Used instead of `ray stop`, which would stop every Ray on this shared machine, not only ours."""
    parents, found = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[int(entry.name)] = ppid
        if marker in cmdline:
            found.add(int(entry.name))
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    found.discard(os.getpid())
    return sorted(found)


def stop_processes(marker: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = processes_under(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while pids and time.time() < deadline and processes_under(marker):
            time.sleep(0.2)
    assert not processes_under(marker), "Ray processes left behind"
