"""The model and its checkpoints: devices, eval mode, and running a checkpoint functionally.

The module the caller passes is never modified: a checkpoint's tensors are applied with
``torch.func.functional_call`` (:func:`model_fn`), and :func:`eval_mode` restores every
submodule's own train/eval flag afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.utils import _pytree as pytree

Batch = Any
Device = Union[str, torch.device]


def compute_device(model: torch.nn.Module, device: Optional[Device]) -> torch.device:
    """``device`` (or the model's), refused with a clear message when nothing can run there."""
    if device is None:
        resolved = model_device(model)
        if resolved.type == "meta":
            raise ValueError("the model's parameters are on the meta device (they hold no values) "
                             "and device=None; pass device='cpu' or 'cuda' (the checkpoints "
                             "supply the values)")
        return resolved
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from exc
    if resolved.type == "meta":
        raise ValueError("device='meta' computes nothing (meta tensors hold no values); "
                         "pass device='cpu' or 'cuda'")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None else
                   f"this torch (CUDA {torch.version.cuda}) sees no NVIDIA GPU or driver")
            raise ValueError(f"device={device!r} needs a CUDA GPU, but torch.cuda.is_available() "
                             f"is False ({why}); pass device='cpu'")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device={device!r} names GPU {resolved.index}, but torch sees "
                             f"{count} GPU(s): cuda:0 to cuda:{count - 1}")
    return resolved


def model_device(model: torch.nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Puts every submodule in eval mode and restores each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def checkpoint_tensors(model: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor],
                       device: torch.device, where: str = "checkpoint"
                       ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """The checkpoint's ``(parameters, buffers)`` for ``functional_call``, on ``device``, detached.

    Checks the state_dict the way ``load_state_dict(strict=True)`` would (every parameter and
    persistent buffer present, nothing unexpected, shapes equal) and says what is wrong.
    Buffers the module does not save (non-persistent) are taken from the module.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"{where} must be a state_dict (a mapping of names to tensors), "
                        f"got {type(checkpoint).__name__}")
    own_params = dict(model.named_parameters())
    all_param_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    own_buffers = dict(model.named_buffers())
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(checkpoint))
    unexpected = sorted(set(checkpoint) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{where} does not fit the model: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    params: Dict[str, torch.Tensor] = {}
    buffers: Dict[str, torch.Tensor] = {}
    for name, own in list(own_params.items()) + list(own_buffers.items()):
        value = checkpoint[name] if name in checkpoint else own
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}[{name!r}] must be a tensor, got {type(value).__name__}")
        if value.shape != own.shape:
            raise ValueError(f"{where}[{name!r}] has shape {tuple(value.shape)}, the model's "
                             f"{name} has shape {tuple(own.shape)}")
        target = params if name in all_param_names else buffers
        target[name] = value.detach().to(device=device, dtype=own.dtype)
    return params, buffers


def model_fn(model: torch.nn.Module, checkpoint: Mapping[str, torch.Tensor],
             device: torch.device) -> Callable[..., Any]:
    """``model`` run with ``checkpoint``'s tensors on ``device`` (the checkpoint is copied once)."""
    params, buffers = checkpoint_tensors(model, checkpoint, device)

    def run(*args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(model, (params, buffers), args, kwargs)
    return run


def to_device(batch: Batch, device: torch.device) -> Batch:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, batch)


def grad_param_names(model: torch.nn.Module, grad_wrt: Optional[Iterable[str]]) -> List[str]:
    """The names of the differentiated parameters, in the model's parameter order."""
    names = [name for name, _ in model.named_parameters()]
    if grad_wrt is None:
        return names
    if isinstance(grad_wrt, str):
        raise TypeError(f"grad_wrt must be a list of parameter names, got the string {grad_wrt!r}")
    wanted = list(grad_wrt)
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ValueError(f"grad_wrt names parameters the model does not have: {unknown}; "
                         f"its parameters are {names[:8]}{' ...' if len(names) > 8 else ''}")
    if not wanted:
        raise ValueError("grad_wrt must name at least one parameter, got an empty list")
    return [name for name in names if name in set(wanted)]


def num_grad_params(model: torch.nn.Module, grad_wrt: Optional[Sequence[str]] = None) -> int:
    """``p``: the number of differentiated parameters (all, or those named in ``grad_wrt``)."""
    params = dict(model.named_parameters())
    return sum(params[name].numel() for name in grad_param_names(model, grad_wrt))
