"""Flat parameter buffers: a module's parameters as views into one contiguous buffer per
dtype, so that whole-model passes (teacher EMA, fused AdamW+EMA, gradient norm) are one
kernel launch over one buffer instead of a Python loop over ~200 tensors.

    student = FlatParams(student_module)                            # grads=True
    teacher = FlatParams(teacher_module, like=student, grads=False)  # same layout
    ...
    loss.backward()                      # gradients land in student.grad[dtype]
    optimizer.step(); ema_flat_(teacher, student, momentum)
    student.zero_grad()                  # not optimizer.zero_grad(): see below

Layout. Per dtype (first-appearance order), parameters are grouped into contiguous
*segments* by `group_fn(name, param)` (default `default_group`: "decay" / "no_decay" by
the official iBOT rule, "frozen" for parameters that do not require grad), segments in
first-appearance order, parameters in module order inside a segment. Every parameter
starts on a 64-byte boundary (vectorised loads in Triton and in torch's multi-tensor
kernels); the padding is zero and stays zero under AdamW and the EMA. Segments tile the
buffer, so a per-group optimizer pass is one launch per segment.

Parameters. Each `nn.Parameter` keeps its identity (the optimizer, DDP and hooks see the
same objects) but its `.data` is set to a view of the buffer. `named_parameters()` and
`state_dict()` are unchanged, keyed by name: `load_state_dict` copies in place, so a
checkpoint saved from an ordinary module loads into a flattened one and back. (Do not use
`load_state_dict(assign=True)`, `module.to(...)` or `.half()` after flattening: they
replace `.data` and break the aliasing; flatten after moving the module. `check()` says
whether the aliasing is intact. `safetensors` refuses tensors that share memory: clone
the state dict before saving with it.)

Gradients (`grads=True`). `p.grad` is pre-set to a view of a flat gradient buffer for
every parameter that requires grad. Autograd's AccumulateGrad adds into an existing
`.grad` in place (`grad += new`, outside create_graph), so `loss.backward()` fills the
flat buffer. `optimizer.zero_grad()` sets `.grad = None` by default, which would detach
the views: call `FlatParams.zero_grad()` instead (it zeroes the buffers and re-attaches
any view that was dropped, e.g. by the official last-layer freezing `p.grad = None`).

DDP. Flatten before wrapping in `DistributedDataParallel` and keep its default
`gradient_as_bucket_view=False`: DDP then copies the all-reduced buckets back into the
existing `.grad` tensors in place (our views), and broadcasts the initial parameters in
place too. (`gradient_as_bucket_view=True` replaces `.grad` with its own bucket views.)
FSDP shards parameters itself: use `ibot_fast.kernels.foreach_ema_` there instead.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch
from torch import Tensor, nn

ALIGN_BYTES = 64


def no_weight_decay(name: str, param: Tensor) -> bool:
    """The official iBOT rule: no weight decay on biases and 1-D parameters."""
    return name.endswith(".bias") or param.ndim <= 1


def default_group(name: str, param: Tensor) -> str:
    """'frozen' (never updated by the optimizer), 'no_decay' or 'decay'."""
    if not param.requires_grad:
        return "frozen"
    return "no_decay" if no_weight_decay(name, param) else "decay"


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives: `buffers[dtype][offset : offset + numel].view(shape)`."""
    name: str
    dtype: torch.dtype
    group: Hashable
    offset: int
    shape: Tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Segment:
    """A contiguous run of one buffer holding the parameters of one group."""
    dtype: torch.dtype
    group: Hashable
    start: int
    end: int
    names: Tuple[str, ...]

    def of(self, buffers: Dict[torch.dtype, Tensor]) -> Tensor:
        """This segment's 1-D view of a per-dtype buffer dict (`data`, `grad`, moments)."""
        return buffers[self.dtype][self.start:self.end]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _build_layout(named: List[Tuple[str, Tensor]], group_fn):
    """Slots, segments and buffer sizes for named parameters (see the module docstring)."""
    order: Dict[torch.dtype, Dict[Hashable, List[Tuple[str, Tensor]]]] = {}
    for name, p in named:
        order.setdefault(p.dtype, {}).setdefault(group_fn(name, p), []).append((name, p))
    slots, segments, sizes = [], [], {}
    for dtype, groups in order.items():
        align = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        offset = 0
        for group, members in groups.items():
            start = offset
            for name, p in members:
                slots.append(Slot(name, dtype, group, offset, tuple(p.shape)))
                offset += _round_up(p.numel(), align)
            segments.append(Segment(dtype, group, start, offset, tuple(n for n, _ in members)))
        sizes[dtype] = offset
    return tuple(slots), tuple(segments), sizes


class FlatParams:
    """A module's parameters as views into one flat buffer per dtype (see module doc).

    Attributes:
        data:     {dtype: 1-D buffer} holding every parameter (and zero padding).
        grad:     {dtype: 1-D buffer} of gradients, or None when built with grads=False.
        slots:    one `Slot` per parameter (name, dtype, group, offset, shape).
        segments: the per-(dtype, group) runs that tile each buffer.
    Two FlatParams built with `like=` share `slots`, so their buffers line up element by
    element (teacher and student: one EMA launch per dtype).
    """

    def __init__(self, module: nn.Module,
                 group_fn: Callable[[str, Tensor], Hashable] = default_group, *,
                 grads: bool = True, like: Optional["FlatParams"] = None):
        named = list(module.named_parameters())
        if not named:
            raise ValueError("the module has no parameters to flatten")
        devices = {p.device for _, p in named}
        if len(devices) != 1:
            raise ValueError(f"parameters on several devices {sorted(map(str, devices))}: "
                             "move the module to one device before flattening")
        device = devices.pop()
        if like is None:
            self.slots, self.segments, sizes = _build_layout(named, group_fn)
        else:
            self._check_like(named, like)
            self.slots, self.segments = like.slots, like.segments
            sizes = {dtype: t.numel() for dtype, t in like.data.items()}
        self.module = module
        self.data = {dt: torch.zeros(n, dtype=dt, device=device) for dt, n in sizes.items()}
        self.grad = ({dt: torch.zeros(n, dtype=dt, device=device) for dt, n in sizes.items()}
                     if grads else None)
        params = dict(named)
        self._params: List[Tuple[nn.Parameter, Slot]] = [(params[s.name], s) for s in self.slots]
        with torch.no_grad():
            for p, slot in self._params:
                view = self._view(self.data, slot)
                view.copy_(p)
                p.data = view
                if grads and p.requires_grad:
                    g = self._view(self.grad, slot)
                    if p.grad is not None:
                        g.copy_(p.grad)
                    p.grad = g

    @staticmethod
    def _view(buffers: Dict[torch.dtype, Tensor], slot: Slot) -> Tensor:
        return buffers[slot.dtype][slot.offset:slot.offset + slot.numel].view(slot.shape)

    @staticmethod
    def _check_like(named, like: "FlatParams"):
        mine = {name: (p.dtype, tuple(p.shape)) for name, p in named}
        theirs = {s.name: (s.dtype, s.shape) for s in like.slots}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()), key=str)[:4]
            raise ValueError(f"module does not match the layout it should copy; first "
                             f"differences (name, (dtype, shape)): {diff}")

    def same_layout(self, other: "FlatParams") -> bool:
        return self.slots is other.slots or self.slots == other.slots

    def zeros_like(self) -> Dict[torch.dtype, Tensor]:
        """Zero buffers with this layout (optimizer moments, EMA state, ...)."""
        return {dt: torch.zeros_like(t) for dt, t in self.data.items()}

    def param_groups(self) -> List[dict]:
        """One torch-optimizer group per segment, parameters that require grad only
        (as the official `get_params_groups`); each dict carries the segment's `group`
        key and parameter `names` so the caller can set weight decay and freezing."""
        by_name = {s.name: p for p, s in self._params}
        groups = []
        for seg in self.segments:
            names = [n for n in seg.names if by_name[n].requires_grad]
            if names:
                groups.append({"params": [by_name[n] for n in names], "group": seg.group,
                               "names": names})
        return groups

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero the flat gradient buffers and re-attach every `.grad` view."""
        if self.grad is None:
            raise RuntimeError("this FlatParams was built with grads=False")
        for g in self.grad.values():
            g.zero_()
        for p, slot in self._params:
            if p.requires_grad and (p.grad is None or
                                    p.grad.data_ptr() != self._ptr(self.grad, slot)):
                p.grad = self._view(self.grad, slot)

    @staticmethod
    def _ptr(buffers, slot: Slot) -> int:
        t = buffers[slot.dtype]
        return t.data_ptr() + slot.offset * t.element_size()

    def check(self) -> None:
        """Raise if a parameter (or, with grads, its `.grad`) no longer lives in the buffer."""
        current = dict(self.module.named_parameters())
        for p, slot in self._params:
            if current.get(slot.name) is not p:
                raise RuntimeError(f"parameter {slot.name} was replaced after flattening")
            if p.data_ptr() != self._ptr(self.data, slot) or tuple(p.shape) != slot.shape:
                raise RuntimeError(f"parameter {slot.name} no longer views the flat buffer "
                                   "(module.to / .half / load_state_dict(assign=True)?)")
            if self.grad is not None and p.requires_grad and p.grad is not None and \
                    p.grad.data_ptr() != self._ptr(self.grad, slot):
                raise RuntimeError(f"{slot.name}.grad no longer views the flat gradient "
                                   "buffer (call FlatParams.zero_grad, not optimizer.zero_grad)")


@torch.no_grad()
def ema_flat_(teacher: FlatParams, student: FlatParams, momentum) -> None:
    """`teacher <- m * teacher + (1 - m) * student` over every parameter: one
    `ibot_fast.kernels.ema_` launch per dtype buffer (one in total for an fp32 model)."""
    from ibot_fast.kernels.ema import ema_  # lazy: importing flat.py needs no Triton

    if not teacher.same_layout(student):
        raise ValueError("teacher and student buffers have different layouts: build the "
                         "teacher with FlatParams(teacher_module, like=student)")
    for dtype, buffer in teacher.data.items():
        ema_(buffer, student.data[dtype], momentum)
