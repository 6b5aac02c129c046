"""Per-layer inputs and output gradients from one ordinary batched backward pass.

The hook path differentiates ``F = sum_b f(z_b)`` once for the whole batch. Because examples
do not interact in the forward pass (eval mode; no module that mixes the batch, such as
batch norm in training mode or attention across examples), ``dF / d y_b = d f(z_b) / d y_b``
for every layer output ``y``: the batched backward pass hands each supported layer exactly the
per-example output gradients ``delta`` that per-example gradients are built from.

How the pass is driven. A forward hook on every tracked module records the module's input
and wraps its output in :class:`_Tap`, an identity whose backward calls back with the output
gradient. The taps also tie every output to one zero scalar ``anchor`` that requires grad, and
the backward pass is ``torch.autograd.grad(F, anchor)``. No parameter requires grad, so
autograd never computes a weight gradient of the batch: the pass costs the forward plus the
input-gradient half of an ordinary backward pass. A callback fires as soon as its layer's
gradient is known (in reverse layer order), so only that layer's per-example gradients need
to exist at any time. A module called several times in one forward (a shared layer) fires
once per call; the contributions add up, as gradients do.

What the hooks cannot see: a tracked module's weight used *outside* the module's own forward
(e.g. ``F.linear(x, self.fc.weight)`` elsewhere, or ``nn.MultiheadAttention``, which reads
``out_proj.weight`` itself). Parameters registered in several modules are therefore only
tracked when every registration is a supported module (see :func:`hookable_parameters`);
a functional use of a weight that is not registered anywhere else is the caller's to avoid.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, NamedTuple, Tuple

import torch

from .layers import LayerAdapter, adapter_for

#: Called during the forward pass with (module input) -> per-call state, and during the
#: backward pass with (state, output gradient).
OnInput = Callable[[torch.Tensor], object]
OnGrad = Callable[[object, torch.Tensor], None]


class Use(NamedTuple):
    """One registration of a parameter: ``module.<role>`` with ``role`` "weight" or "bias"."""

    module_name: str
    module: torch.nn.Module
    role: str


def parameter_uses(model: torch.nn.Module) -> Dict[str, List[Use]]:
    """Every registration of every parameter, keyed by its canonical name.

    The canonical name is the one ``model.named_parameters()`` gives (the first of tied
    names, e.g. ``transformer.wte.weight`` for GPT-2's tied ``lm_head.weight``).
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    uses: Dict[str, List[Use]] = {name: [] for name in canonical.values()}
    seen = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        for role, param in module._parameters.items():
            if param is None or (id(module), role) in seen:
                continue
            seen.add((id(module), role))
            uses[canonical[id(param)]].append(Use(module_name, module, role))
    return uses


def hookable_parameters(model: torch.nn.Module) -> Dict[str, List[Use]]:
    """Parameters whose every registration is the weight or bias of a supported module."""
    hookable = {}
    for name, uses in parameter_uses(model).items():
        if uses and all(u.role in ("weight", "bias") and adapter_for(u.module) is not None
                        for u in uses):
            hookable[name] = uses
    return hookable


class _Tap(torch.autograd.Function):
    """Identity on ``output`` whose backward reports the output gradient to ``callback``."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, output: torch.Tensor, callback) -> torch.Tensor:
        ctx.callback = callback
        # A copy, not a view: the model may modify the output in place (ReLU(inplace=True)).
        return output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.callback(grad)
        return torch.zeros((), dtype=grad.dtype, device=grad.device), grad, None


def position_chunks(tap: "LayerTap", chunks: int) -> "LayerTap":
    """``tap`` with each example's positions cut into ``chunks`` consecutive chunks, each its
    own row: the backward callback sees ``[B * chunks, ceil(T / chunks), ...]`` (row
    ``b * chunks + c`` holds chunk ``c`` of example ``b``; the last chunk zero-padded, which
    adds nothing) instead of ``[B, T, ...]``, so its per-row features are per (example,
    chunk). For sequence layers (inputs ``[B, T]`` ids or ``[B, T, d]``) only."""
    if chunks == 1:
        return tap

    def cut(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or (x.dim() == 2 and x.is_floating_point()):
            raise ValueError(
                f"Fisher rows per chunk of positions (fisher_chunks={chunks}) need sequence "
                f"layers, inputs [B, T] of ids or [B, T, d]; {type(tap.module).__name__} gave "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}: use a "
                "task with fisher_chunks=1")
        length = -(-x.shape[1] // chunks) * chunks
        if length != x.shape[1]:
            pad = x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])
            x = torch.cat([x, pad], dim=1)
        return x.reshape(x.shape[0] * chunks, length // chunks, *x.shape[2:])

    def on_grad(state, grad: torch.Tensor) -> None:
        tap.on_grad(cut(state), cut(grad))
    return tap._replace(on_grad=on_grad)


class LayerTap(NamedTuple):
    """A tracked module and what to do with its input (forward) and output gradient (backward)."""

    module: torch.nn.Module
    adapter: LayerAdapter
    on_input: OnInput
    on_grad: OnGrad


@contextlib.contextmanager
def tapped(taps: List[LayerTap], device: torch.device, batch_size: int
           ) -> Iterator[Tuple[torch.Tensor, List[torch.nn.Module]]]:
    """Registers the forward hooks for the duration of the block; yields ``(anchor, skipped)``.

    The hooks are removed on exit, exceptions included; the modules are otherwise untouched.
    Differentiate a function of the model's outputs with respect to the anchor (see
    :func:`backward_through_taps`) to run the callbacks.

    Which calls are measured:

    - only calls made with gradients enabled: a forward under ``torch.no_grad()`` (the
      task's ``out_to_loss``, which :meth:`~trak_fast.Task.outputs_and_out_to_loss` runs so)
      is not part of ``f`` and is ignored, however it calls the model;
    - a call on the batch (input and output with ``batch_size`` rows in dimension 0, input of
      at least 2 dimensions) is tapped as it is;
    - a call on an input **shared by the batch**, one row where the batch has ``B > 1``
      (GPT-2's ``wpe`` and BERT's position table look up ``[1, T]`` positions; their output
      ``[1, T, d]`` is added to the batch's ``[B, T, d]`` by broadcasting), is tapped with its
      input and output expanded to ``B`` rows. The model then receives the expanded output,
      which it combines with the batch as it would the broadcast one, and the tap receives the
      per-example output gradients ``[B, T, d]`` instead of their sum over the batch: exact
      per-example gradients, as long as the model uses that output by broadcasting it against
      the batch (elementwise with ``[B, ...]`` tensors; not e.g. ``out[0]``);
    - any other call (an input with another first dimension, or of fewer than 2 dimensions,
      where one row per example cannot be told from a sequence) is not tapped, and the module
      is appended to ``skipped``: its parameters need the vmap path.
    """
    anchor = torch.zeros((), device=device, requires_grad=True)
    handles = []
    skipped: List[torch.nn.Module] = []

    def make_hook(tap: LayerTap):
        def hook(module, args, kwargs, output):
            if not torch.is_grad_enabled():
                return None              # not part of the differentiated function
            inputs = args[0] if args else next(iter(kwargs.values()))
            if not isinstance(output, torch.Tensor) or not isinstance(inputs, torch.Tensor):
                raise TypeError(f"hooked {type(module).__name__} returned or received a "
                                f"non-tensor; cannot take per-example gradients from it")
            shared = (batch_size > 1 and inputs.dim() >= 2 and output.dim() >= 1
                      and inputs.shape[0] == 1 and output.shape[0] == 1)
            if shared:
                inputs = inputs.expand(batch_size, *inputs.shape[1:])
                output = output.expand(batch_size, *output.shape[1:])
            elif inputs.dim() < 2 or inputs.shape[0] != batch_size or \
                    output.shape[0] != batch_size:
                if all(m is not module for m in skipped):
                    skipped.append(module)
                return None
            state = tap.on_input(inputs.detach())
            return _Tap.apply(anchor, output, lambda grad: tap.on_grad(state, grad))
        return hook

    try:
        for tap in taps:
            handles.append(tap.module.register_forward_hook(make_hook(tap), with_kwargs=True))
        yield anchor, skipped
    finally:
        for handle in handles:
            handle.remove()


def backward_through_taps(total: torch.Tensor, anchor: torch.Tensor) -> None:
    """Runs the backward pass of ``total`` (a scalar) that fires every tap's callback."""
    if total.requires_grad:
        torch.autograd.grad(total, anchor, allow_unused=True)
