"""Expert parallelism (frameworks with an ``ep`` mesh dim): the experts of a mixture-of-experts
model sharded over the EP ranks on the expert dim, and the tokens sent to their experts' ranks.

A model with experts names how to shard them in ``ep_plan()``: ``{module name: ParallelStyle}``
for ``parallelize_module`` on the EP mesh, as ``tp_plan()`` does for TP. Its experts modules hold
packed weights ``[num_experts, ...]``; the style turns each into a DTensor ``Shard(0)`` on the
EP mesh (whole experts per rank) and moves the tokens. ``ExpertParallel`` is torchtitan's
(``torchtitan/distributed/expert_parallel.py``, v0.2): before the experts run, each rank sends
every (token, expert) pair it routed to the rank holding that expert with one all-to-all
(uneven splits: ``all_to_all_single`` on gloo supports them), the receiver regroups them by
local expert; after, a second all-to-all brings the outputs back in the sender's order. The
built-in ``moe`` model uses it; ``hf_models`` mixtures of experts use transformers' own expert
parallelism (pipeline_lib.models._hf).

The all-to-all with autograd is ``torch.distributed._functional_collectives.
all_to_all_single_autograd`` (a private module: torch deprecates the public
``torch.distributed.nn.functional.all_to_all_single`` in its favour; torchtitan and transformers
call it). Imports torch.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from pipeline_lib.common.errors import Incompatible

EP_DIM = "ep"


def expert_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """The model's ``ep_plan()``; Incompatible (a skip) for a model without experts."""
    plan = model.ep_plan() if hasattr(model, "ep_plan") else None
    if not plan:
        raise Incompatible("the model has no experts to shard over EP ranks (no ep_plan)")
    return plan


def shard_experts(model: nn.Module, ep_mesh: DeviceMesh) -> list[nn.Module]:
    """Apply the model's ``ep_plan`` on ``ep_mesh``; the experts modules it sharded.
    Incompatible (a skip) when the EP degree does not divide a module's number of experts
    (the token dispatch gives each rank a whole number of experts)."""
    plan = expert_plan(model)
    experts = [model.get_submodule(key) for key in plan]
    degree = ep_mesh.size()
    for key, module in zip(plan, experts, strict=True):
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() == 0 or param.shape[0] % degree:
                raise Incompatible(
                    f"EP degree {degree} does not divide the "
                    f"{param.shape[0] if param.dim() else 0} experts of {key}.{param_name}"
                )
    parallelize_module(model, ep_mesh, plan)
    return experts


def expert_params(experts: list[nn.Module]) -> list[nn.Parameter]:
    return [p for module in experts for p in module.parameters()]


@cache
def dense_mesh(device_type: str, world_size: int) -> DeviceMesh:
    """A 1-D mesh over every rank, for the parameters that are not experts (torchtitan's and
    transformers' dense mesh beside the experts' one); its second dim of size 1 is the TP mesh
    transformers' expert parallelism wants (``tp``). Made once per job (its process groups)."""
    return init_device_mesh(device_type, (world_size, 1), mesh_dim_names=("dense", "tp"))


def is_expert_entry(value) -> bool:
    """A state-dict value that holds experts: a DTensor sharded on dim 0 over an ``ep`` dim."""
    if not isinstance(value, DTensor):
        return False
    names = value.device_mesh.mesh_dim_names or ()
    return EP_DIM in names and value.placements[names.index(EP_DIM)] == Shard(0)


# --- torchtitan's ExpertParallel (token dispatch by all-to-all) --------------------------------
def permute_indices(received: torch.Tensor, ranks: int, local: int) -> torch.Tensor:
    """Where each row of the expert-major order lies in the rank-major order the all-to-all
    delivers (``received``: [ranks * local] tokens per (sending rank, local expert)): the rows of
    local expert 0 from every rank, then expert 1's, ... (torchtitan's ``_permute``)."""
    counts = received.view(ranks, local)
    starts = (received.cumsum(0) - received).view(ranks, local)
    lengths, starts = counts.t().reshape(-1), starts.t().reshape(-1)
    segment = torch.arange(lengths.numel()).repeat_interleave(lengths)
    out_starts = lengths.cumsum(0) - lengths
    return starts[segment] + torch.arange(int(lengths.sum())) - out_starts[segment]


class ExpertParallel(ParallelStyle):
    """Shard(0) of every parameter of an experts module on the EP mesh, and its tokens moved:
    the module's forward takes ``(tokens sorted by expert, tokens per expert [num_experts])``
    and gets ``(tokens sorted by local expert, tokens per local expert)``."""

    def __init__(self):
        super().__init__()
        self.input_splits: list[int] = []
        self.output_splits: list[int] = []
        self.shape: torch.Size | None = None
        self.order: torch.Tensor | None = None

    def _partition(self, name, module, mesh):
        for param_name, param in module.named_parameters(recurse=False):
            sharded = nn.Parameter(distribute_tensor(param, mesh, [Shard(0)]))
            module.register_parameter(param_name, sharded)

    def _dispatch(self, module, inputs, mesh):
        tokens, per_expert = inputs
        ranks, group = mesh.size(), mesh.get_group()
        local = per_expert.numel() // ranks
        received = torch.empty_like(per_expert)
        dist.all_to_all_single(received, per_expert, group=group)
        self.input_splits = per_expert.view(ranks, local).sum(1).tolist()
        self.output_splits = received.view(ranks, local).sum(1).tolist()
        tokens = all_to_all_single_autograd(tokens, self.output_splits, self.input_splits, group)
        self.order = permute_indices(received.cpu(), ranks, local).to(tokens.device)
        self.shape = tokens.shape
        return tokens[self.order], received.view(ranks, local).sum(0)

    def _combine(self, module, output, mesh):
        unpermuted = output.new_empty(self.shape)
        unpermuted[self.order] = output
        return all_to_all_single_autograd(
            unpermuted, self.input_splits, self.output_splits, mesh.get_group()
        )

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module,
            device_mesh,
            partition_fn=self._partition,
            input_fn=self._dispatch,
            output_fn=self._combine,
        )


def local(param: torch.Tensor) -> torch.Tensor:
    """This rank's experts of a parameter: the local tensor of a DTensor, else the tensor."""
    return param.to_local() if isinstance(param, DTensor) else param
