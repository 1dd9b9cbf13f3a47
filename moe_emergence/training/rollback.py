"""The last verified-good training state, kept in memory so that a bad step can be undone.

The loss of step t is computed with the weights that step t-1 produced, so step t is what *verifies* step
t-1's update. When step t passes the guard (``guard``), the trainer calls ``Snapshot.take()`` before its
optimizer step: the snapshot then holds the weights and optimizer state that a finite, spike-free loss was
just computed with. When a step fails, ``restore()`` puts them back, undoing every update since (the data
position and the learning-rate schedule move on: the undone steps count as skipped).

What is copied: every floating-point parameter and buffer of the model (router selection biases included)
and every tensor of the optimizer state. The copies live on the parameters' device (one extra copy of the
model and its AdamW moments; on an FSDP2 model, of this process's shards). The first ``take`` allocates
one flat buffer per (device, dtype) and every take fills it with one multi-tensor ``_foreach_copy_`` per
buffer (torch's batched path wants lists of one device and dtype, each source laid out as its destination:
strided sources go in a list of their own). On the H200, GPT-2-small MoE (608 tensors, 3.1 GB): 1.99 ms
of device time a take against 2.59 ms for one ``torch.cat`` per buffer, and 0.55 ms of host time for the
copy (docs/benchmarks.md, 2026-12-03 17:28). ``guard.snapshot_every`` takes it every N good steps (0 =
never: a bad step is only skipped, and the stop checkpoint is not written when the weights are known to be
bad).
"""

from __future__ import annotations

import operator

import torch


def local_data(t: torch.Tensor) -> torch.Tensor:
    """``t``, or for a DTensor (FSDP2) this process's shard of it, read from its ``_local_tensor`` rather than
    ``to_local()``: no DTensor dispatch and no autograd node (~30 us each, ~250 parameters a step: ~9 ms of
    host time measured on FSDP2, H200). Aliases ``t``'s storage; not detached (callers run under no_grad or
    need no graph)."""
    return getattr(t, "_local_tensor", t)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """``local_data(t)`` detached: for views kept beyond the call (the snapshot's live tensors)."""
    return local_data(t).detach()


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def named_state(model: torch.nn.Module, optimizer) -> dict[tuple, torch.Tensor]:
    """Every floating tensor of the model and the optimizer state, under a stable key (local shards)."""
    out: dict[tuple, torch.Tensor] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            out[("model", name)] = local_shard(t)
    opt = inner_optimizer(optimizer)
    index = {p: i for i, group in enumerate(opt.param_groups) for p in group["params"]}
    for p, state in opt.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.is_floating_point():
                out[("optim", index[p], id(p), k)] = local_shard(v)
    return out


def _modules_in_order(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``list(model.modules())``: each module once, in the same (depth-first, pre-order) order, without
    ``named_modules``' nested generators (a generator frame per level of every module it yields: ~0.5 ms a
    walk of the GPT-2-small MoE model on the GPU machine's host)."""
    seen: set[int] = set()
    out, stack = [], [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(reversed([c for c in m._modules.values() if c is not None]))
    return out


def _members(modules: list[torch.nn.Module], attr: str) -> list[torch.Tensor]:
    """The non-None ``_parameters`` or ``_buffers`` values of ``modules``, each object once (tied weights)."""
    seen: set[int] = set()
    out = []
    for m in modules:
        for t in getattr(m, attr).values():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def module_walk(
    model: torch.nn.Module,
) -> tuple[list[torch.nn.Module], list[torch.Tensor], list[torch.Tensor]]:
    """``list(model.modules())``, ``list(model.parameters())`` and ``list(model.buffers())``: the same objects in
    the same order, listed afresh at each call (a submodule swapped since the last call is seen) in one walk of
    the module tree."""
    modules = _modules_in_order(model)
    return modules, _members(modules, "_parameters"), _members(modules, "_buffers")


def params_and_buffers(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``module_walk``'s parameters and buffers."""
    _, params, buffers = module_walk(model)
    return params, buffers


def module_tensors(model: torch.nn.Module, buffers: bool = True) -> list[torch.Tensor]:
    """``params_and_buffers`` as one list: the parameters, then (``buffers``) the buffers."""
    params, bufs = params_and_buffers(model)
    return params + bufs if buffers else params


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # never a DTensor: no ``_local_tensor`` to look for


def _state_objects(
    model: torch.nn.Module, optimizer, tensors: list[torch.Tensor] | None = None
) -> tuple[list, tuple[list, list]]:
    """What ``named_state`` reads, without its names: ``tensors`` (``module_tensors(model)``, walked here when
    None) and the optimizer-state values; and the layout of their ``local_data``: the addresses and the shapes
    of the tensors among them (a non-tensor state value has none)."""
    objects = module_tensors(model) if tensors is None else list(tensors)
    objects += [v for s in inner_optimizer(optimizer).state.values() for v in s.values()]
    local = [t if type(t) in _PLAIN else local_data(t) for t in objects]
    local = [x for x in local if isinstance(x, torch.Tensor)]
    return objects, (list(map(torch.Tensor.data_ptr, local)), list(map(torch.Tensor.size, local)))


def reshard(model: torch.nn.Module) -> None:
    """FSDP2: put every unit's parameters back into their shards. A forward without a backward (an eval)
    leaves the root unit's parameters gathered, full-size tensors in the module's slots, which is what
    ``named_state`` would then read and restore into. No-op for a model without FSDP2 units."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _same_layout(saved: dict[tuple, torch.Tensor] | None, live: dict[tuple, torch.Tensor]) -> bool:
    """Do the snapshot's buffers fit the live tensors: the same keys, and each the same shape, dtype and device?"""
    if saved is None or saved.keys() != live.keys():
        return False
    return all(
        (saved[k].shape, saved[k].dtype, saved[k].device) == (t.shape, t.dtype, t.device)
        for k, t in live.items()
    )


def _copy_lists(
    saved: dict[tuple, torch.Tensor], live: dict[tuple, torch.Tensor], keys: list[tuple]
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """(views, sources) lists for ``_foreach_copy_`` of one buffer's ``keys``: the contiguous sources, laid out as
    their (contiguous) views, which torch's batched copy takes, then the others (a transposed parameter...), apart,
    since one of them in a list sends the whole list to a copy per tensor. Empty lists left out."""
    contiguous = [k for k in keys if live[k].is_contiguous()]
    strided = [k for k in keys if not live[k].is_contiguous()]
    return [([saved[k] for k in part], [live[k] for k in part]) for part in (contiguous, strided) if part]


class Snapshot:
    """``take()`` copies the live state; ``restore()`` writes the copy back (see the module docstring).

    The live tensors (``named_state``: local shards under FSDP2, whose walk costs ~11 ms a step on the
    H200) are looked up once and reused while the same parameter, buffer and optimizer-state objects are
    in place at the same addresses (no walk through DTensors); anything replaced or moved looks them up
    again."""

    def __init__(self, model: torch.nn.Module, optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.saved: dict[tuple, torch.Tensor] | None = None
        self._groups: list[list[tuple]] = []  # per flat buffer: the keys it holds
        self._objects: list = []
        self._layout: tuple[list, list] = ([], [])  # _state_objects: addresses, sizes
        self._live: dict[tuple, torch.Tensor] | None = None
        # (views, live) lists for _foreach_copy_: one or two a buffer (_copy_lists)
        self._copies: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self._sources_of: dict[tuple, torch.Tensor] | None = None  # the lookup they were made from

    def _live_state(self, tensors: list[torch.Tensor] | None = None) -> dict[tuple, torch.Tensor]:
        """``named_state`` of the model and optimizer, looked up again only when an object or its layout
        changed; ``tensors``: ``module_tensors(model)`` when the caller has walked the model already."""
        objects, layout = _state_objects(self.model, self.optimizer, tensors)
        same = self._live is not None and len(objects) == len(self._objects) and layout == self._layout
        if not (same and all(map(operator.is_, objects, self._objects))):
            self._objects, self._layout = objects, layout
            self._live = named_state(self.model, self.optimizer)
        return self._live

    @property
    def taken(self) -> bool:
        return self.saved is not None

    @torch.no_grad()
    def take(self, tensors: list[torch.Tensor] | None = None) -> None:
        """Copy the live state into the snapshot's buffers. ``tensors``: ``module_tensors(model)``, when the
        caller walked the model since it last changed (the trainer's step: one walk for the clip and this)."""
        live = self._live_state(tensors)
        if self._sources_of is not live:  # a new lookup (first take, new optimizer state, a tensor replaced)
            if not _same_layout(self.saved, live):
                self._allocate(live)
            self._copies = [part for keys in self._groups for part in _copy_lists(self.saved, live, keys)]
            self._sources_of = live
        for views, sources in self._copies:
            torch._foreach_copy_(views, sources)

    def _allocate(self, live: dict[tuple, torch.Tensor]) -> None:
        """One flat buffer per (device, dtype); ``saved[k]`` is a view of it shaped like ``live[k]``."""
        groups: dict[tuple, list[tuple]] = {}
        for k, t in live.items():
            groups.setdefault((t.device, t.dtype), []).append(k)
        self._groups, self.saved = list(groups.values()), {}
        for (device, dtype), keys in groups.items():
            flat = torch.empty(sum(live[k].numel() for k in keys), device=device, dtype=dtype)
            for k, view in zip(keys, flat.split([live[k].numel() for k in keys]), strict=True):
                self.saved[k] = view.view(live[k].shape)

    @torch.no_grad()
    def restore(self) -> None:
        if self.saved is None:
            raise RuntimeError("Snapshot.restore before any take()")
        live = self._live_state()
        keys = [k for k in live if k in self.saved]
        for k in keys:  # all or nothing: a copy into a tensor of another shape would broadcast
            if (live[k].shape, live[k].dtype) != (self.saved[k].shape, self.saved[k].dtype):
                raise RuntimeError(
                    f"Snapshot.restore: {k[1] if k[0] == 'model' else k} is {tuple(live[k].shape)} "
                    f"{live[k].dtype} now, {tuple(self.saved[k].shape)} {self.saved[k].dtype} when the snapshot "
                    "was taken; nothing was restored"
                )
        if keys:  # a model and optimizer without floating tensors: nothing to copy
            torch._foreach_copy_([live[k] for k in keys], [self.saved[k] for k in keys])
        # optimizer state created after the snapshot (AdamW creates it at its first step): drop it
        saved_params = {k[2] for k in self.saved if k[0] == "optim"}
        state = inner_optimizer(self.optimizer).state
        for p in [p for p in state if id(p) not in saved_params]:
            del state[p]

    @torch.no_grad()
    def largest_change(self) -> tuple[str, float] | None:
        """(parameter name, |w - w_snapshot| / |w_snapshot|) of the parameter that moved most since the
        snapshot, for the guard's message; None before any take()."""
        if self.saved is None:
            return None
        live = named_state(self.model, self.optimizer)
        best: tuple[str, float] | None = None
        for k, t in live.items():
            if k[0] != "model" or k not in self.saved:
                continue
            ref = self.saved[k].float()
            ratio = float((t.float() - ref).norm() / ref.norm().clamp_min(1e-12))
            if best is None or not ratio <= best[1]:  # NaN counts as the largest
                best = (k[1], ratio)
        return best


def first_nonfinite(model: torch.nn.Module, optimizer) -> str | None:
    """The first parameter (module order) or optimizer-state tensor holding a NaN/Inf, described; None
    when all are finite. One host sync per tensor: only for messages and checks before a save."""
    for k, t in named_state(model, optimizer).items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            what = f"parameter {k[1]}" if k[0] == "model" else f"optimizer state {k[3]!r} of param #{k[1]}"
            return f"{what} ({bad} non-finite of {t.numel()})"
    return None


def by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    """``tensors`` grouped by device (in order; one group when all are on one device), for one multi-tensor
    op and one stack per device instead of an op per tensor."""
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without a host sync where that is safe: a copy onto a GPU is ordered on its stream,
    a copy to the CPU is waited for (a non-blocking one could be read before it lands)."""
    return t.to(device, non_blocking=device.type != "cpu")


@torch.no_grad()
def any_nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor on device: does any of ``tensors`` (local shards; only floating and complex ones can)
    hold a NaN/Inf. No host sync; the tensors may sit on several devices (a state loaded on the CPU)."""
    # no per-tensor detach (a dispatch each): this runs under no_grad; FSDP2 may give a process an empty shard
    local = [x for x in map(local_data, tensors) if x.numel() and (x.is_floating_point() or x.is_complex())]
    if not local:
        return torch.zeros((), dtype=torch.bool)
    device = local[0].device
    found = [on_device(_count_nonfinite(group), device) for group in by_device(local).values()]
    return (found[0] if len(found) == 1 else torch.stack(found).sum()) > 0


def _count_nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-d float32 on the tensors' (one) device: > 0 iff one of them holds a NaN/Inf. On a CUDA GPU
    ``_nonfinite_in_place``; elsewhere ``_nonfinite_by_norm``, which writes nothing (on the CPU a tensor may be
    read-only memory: a memory-mapped checkpoint)."""
    if tensors[0].device.type != "cuda":
        return _nonfinite_by_norm(tensors)
    return _nonfinite_in_place(tensors)


def _nonfinite_by_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The largest |x| of each tensor (``_foreach_norm(inf)``: inf and NaN propagate, large values do not), their
    maximum not finite (mixed dtypes promote: no cast to a narrower one). One output tensor per input; writes
    nothing. ``tensors``: a non-empty list of non-empty floating or complex tensors on one device."""
    peak = torch.stack(torch._foreach_norm(tensors, float("inf"))).max()
    return (~torch.isfinite(peak)).float()


# the dtypes torch's finite-check kernel tests exactly (torch 2.11): on CUDA it has no bfloat16 version and tests
# each value as a float32, so a float64 value beyond float32's range would read as inf (found on the H200)
_EXACT_DTYPES_CUDA = (torch.float32, torch.float16)
_EXACT_DTYPES_CPU = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _nonfinite_in_place(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch's multi-tensor finite check (``_amp_foreach_non_finite_check_and_unscale_``, the GradScaler's) with
    scale 1: each value is read and written back unchanged (a NaN stays a NaN, its bits may not; no version
    counter moves); one launch per dtype and no tensor per input, where ``_foreach_norm`` allocates one output
    per tensor (~6 us of host time each on the H200 machine: ~1 ms a step for 152 parameters). Tensors it cannot
    test exactly (bfloat16 and float64 on CUDA, complex) or write back (an expanded view, whose elements surely
    share memory; a lazily negated view) go through ``_nonfinite_by_norm``. ``tensors``: a non-empty list of
    non-empty floating or complex tensors on one device, in writable memory (``_count_nonfinite`` calls it on CUDA
    only; the tests run it on the CPU too)."""
    found = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    one = torch.ones((), dtype=torch.float32, device=found.device)
    exact = _EXACT_DTYPES_CUDA if found.is_cuda else _EXACT_DTYPES_CPU
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    rest = []
    for t in tensors:  # a contiguous tensor never overlaps itself: the overlap test only for the others
        if (
            t.dtype in exact
            and not t.is_neg()
            and (t.is_contiguous() or torch._debug_has_internal_overlap(t) != 1)
        ):
            by_dtype.setdefault(t.dtype, []).append(t)
        else:
            rest.append(t)
    for group in by_dtype.values():  # one dtype a list: the kernel's multi-tensor path
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
    return found + _nonfinite_by_norm(rest) if rest else found


class VerifiedState:
    """The trainer's record of which training state is verified good (see the module docstring).

    ``unverified``: optimizer updates applied since the state was last verified (a phase starts from its
    initial or upcycled weights, as a run starts from its initial ones); ``known_bad``: a bad step found the
    state bad and could not roll it back (no snapshot: ``guard.snapshot_every: 0``, or right after a resume);
    it stays so until a good step verifies a later update. ``reduce_sum`` all-reduces a flag across processes.
    """

    def __init__(self, model, optimizer, snapshot_every: int, reduce_sum, known_bad: bool = False) -> None:
        self.model, self.optimizer, self.every, self.reduce_sum = model, optimizer, snapshot_every, reduce_sum
        self.snapshot = Snapshot(model, optimizer)
        self.unverified = 0
        self.known_bad = known_bad

    def verifies(self, good: bool) -> bool:
        """Does a step with this outcome verify the updates since the last verification (and clear
        ``known_bad``)?"""
        verified = good and self.unverified > 0
        if verified:
            self.known_bad = False
        return verified

    def before_update(self, tensors: list[torch.Tensor] | None = None) -> None:
        """A good step is about to update: snapshot the state its loss verified, when one is due
        (``tensors``: as ``Snapshot.take``)."""
        if self.every and (not self.snapshot.taken or self.unverified >= self.every):
            self.snapshot.take(tensors)
            self.unverified = 0

    def after_update(self) -> None:
        self.unverified += 1

    def describe(self, params_bad: bool, spike: bool) -> str | None:
        """The guard message's detail for a bad step: the first non-finite parameter, or the parameter that
        moved most since the snapshot (a spike)."""
        if params_bad:
            return first_nonfinite(self.model, self.optimizer)
        if spike and self.snapshot.taken and self.unverified:
            name, ratio = self.snapshot.largest_change()
            return f"{name} moved most since the last good state (|dw|/|w| = {ratio:.3g})"
        return None

    def roll_back(self) -> None:
        """Restore the snapshot if updates were applied since; if they cannot be undone, mark the state
        known bad."""
        reshard(self.model)  # after an eval, FSDP2's root would hold gathered copies, not its shards
        if self.snapshot.taken and self.unverified:
            self.snapshot.restore()
            self.unverified = 0
        elif self.unverified:
            self.known_bad = True

    def any_nonfinite(self, device) -> bool:
        """Any NaN/Inf in the parameters, buffers or optimizer state of any process (one collective)."""
        flag = any_nonfinite(list(named_state(self.model, self.optimizer).values())).float().to(device)
        return bool(self.reduce_sum(flag).item() > 0)

    def good_for_saving(self, device, print_fn, step: int) -> bool:
        """Before a checkpoint or ``final/``: never known bad, and finite (rolled back to the snapshot
        first when not, where that can be done). Saves follow evals: FSDP2 units are resharded first."""
        reshard(self.model)
        if self.known_bad:
            print_fn(f"guard: nothing saved at step {step}: the weights are known bad")
            return False
        if not self.any_nonfinite(device):
            return True
        bad = first_nonfinite(self.model, self.optimizer) or "another process's shard"
        self.roll_back()
        ok = not self.any_nonfinite(device)
        how = "rolled back to the last verified-good state before saving" if ok else "nothing saved"
        print_fn(f"guard: {bad} at step {step}; {how}")
        return ok
