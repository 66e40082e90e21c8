"""Mean-Teacher: an exponential moving average (EMA) of a student network's parameters, buffers copied."""

import copy

import torch
import torch.distributed as dist


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside DDP / DataParallel / torch.compile wrappers, so parameter names carry no wrapper prefix."""
    while True:
        if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, torch.nn.Module):
            module = module._orig_mod
        else:
            return module


def _check_same_tensors(kind: str, teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor]) -> None:
    if teacher.keys() != student.keys():
        only_teacher = sorted(teacher.keys() - student.keys())
        only_student = sorted(student.keys() - teacher.keys())
        raise ValueError(f"student and teacher {kind} names differ: only in teacher {only_teacher}, "
                         f"only in student {only_student}")
    for name, tensor in teacher.items():
        if tensor.shape != student[name].shape:
            raise ValueError(f"{kind} {name!r} has shape {tuple(student[name].shape)} in the student but "
                             f"{tuple(tensor.shape)} in the teacher")


def _broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values: one flat broadcast per (device, dtype)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        for tensor, value in zip(group, flat.split([t.numel() for t in group])):
            tensor.copy_(value.view_as(tensor))


class EMATeacher:
    """Mean-Teacher: an exponential moving average of a student network (Tarvainen & Valpola 2017).

    ``self.module`` is a deep copy of the student (unwrapped from DDP / DataParallel / torch.compile) whose parameters
    have ``requires_grad=False``. Its train/eval mode is the student's at construction; ``update`` never changes it.

    DDP: create the teacher after wrapping, from ``ddp.module``, on every rank. Parameters then stay identical on
    all ranks because DDP keeps the student's identical. Buffers (e.g. BatchNorm running stats) are computed per
    rank by the forward pass, so when ``broadcast_buffers`` is True and a default process group with more than one
    rank is initialised, ``update`` copies rank 0's buffers to every rank, as DDP does for the student at its next
    forward. ``update`` is then a collective call: call it on every rank, in the same order.

    Args:
        student: the network being trained (or its DDP / DataParallel / compiled wrapper).
        alpha: maximal EMA decay in [0, 1]; the decay ramps up as ``min(1 - 1 / (step + 1), alpha)``.
        broadcast_buffers: keyword-only; see the DDP note above. Has no effect without torch.distributed.
    """

    def __init__(self, student: torch.nn.Module, alpha: float = 0.999, *, broadcast_buffers: bool = True):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.module = copy.deepcopy(unwrap(student))
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
            # deepcopy copies .grad too; the teacher never owns gradients.
            parameter.grad = None
        self.alpha = float(alpha)
        self.step = 0
        self.broadcast_buffers = broadcast_buffers

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> float:
        """Move the teacher towards ``student``; call after every optimizer step.

        ``alpha_t = min(1 - 1 / (step + 1), alpha)`` (0 at the first call, so the teacher starts as the student,
        then 1/2, 2/3, ...); every parameter becomes ``alpha_t * teacher + (1 - alpha_t) * student``; every buffer,
        floating or not, is copied from the student; then ``step += 1``.

        Args:
            student: the network being trained (or a wrapper of it), same architecture as the teacher.

        Returns:
            ``alpha_t`` as a float.

        Raises:
            ValueError: when the parameter or buffer names (or shapes) of student and teacher differ; the teacher
                is then left unchanged.
        """
        student = unwrap(student)
        teacher_params = dict(self.module.named_parameters())
        student_params = dict(student.named_parameters())
        teacher_buffers = dict(self.module.named_buffers())
        student_buffers = dict(student.named_buffers())
        _check_same_tensors("parameter", teacher_params, student_params)
        _check_same_tensors("buffer", teacher_buffers, student_buffers)

        alpha_t = min(1.0 - 1.0 / (self.step + 1), self.alpha)
        for name, teacher_param in teacher_params.items():
            # lerp with weight 1 (first update) returns the student exactly.
            teacher_param.lerp_(student_params[name], 1.0 - alpha_t)
        for name, teacher_buffer in teacher_buffers.items():
            teacher_buffer.copy_(student_buffers[name])
        if (self.broadcast_buffers and teacher_buffers and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            _broadcast_from_rank0(list(teacher_buffers.values()))
        self.step += 1
        return alpha_t

    def state_dict(self) -> dict:
        """``{"module": teacher state_dict, "step": int, "alpha": float}``; tensors are references, as in torch."""
        return {"module": self.module.state_dict(), "step": self.step, "alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        """Restore teacher weights, step and alpha from ``state_dict()``'s output, so the alpha_t sequence continues."""
        self.module.load_state_dict(state["module"])
        self.step = int(state["step"])
        self.alpha = float(state["alpha"])
