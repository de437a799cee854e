"""Expert parallelism with FSDP2, as torchtitan combines them (its ``dp_shard`` = ``dp`` x ``ep``;
transformers 5.x lays out its ``fsdp``/``efsdp``/``ep`` meshes alike): the experts sharded over
``ep`` on the expert dim (pipeline_lib.models._expert_parallel) and then ``fully_shard``-ed over
``dp`` (torchtitan's ``dp_shard_mod_ep``: ``Shard(0)``, or ``Shard(1)`` where dp x ep exceeds the
experts), every other parameter ``fully_shard``-ed over all dp x ep ranks (a 1-D mesh over every
rank: the dense mesh). Each rank trains on its own slice of the batch.

Expert gradients: the all-to-all's backward sums every rank's tokens, FSDP sums over ``dp``; the
experts' FSDP modules divide by dp x ep (``set_gradient_divide_factor``, torchtitan's
``gradient_divide_factor``), as transformers 5.x does it: where ``dp`` has more than one rank,
with a sum reduction and a local division (``set_force_sum_reduction_for_comms``; FSDP2 applies
a factor other than its group size with ``ReduceOp.PREMUL_SUM``, which gloo refuses), and
without it on one rank (there FSDP2 would divide twice). Both torch findings:
docs/torch-notes.md, scripts/repro/fsdp2_divide_factor_gloo.py."""

from pipeline_lib.frameworks import Framework, fsdp2


def parallelize(model, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from pipeline_lib.models import _expert_parallel as expert_parallel

    ep_mesh, dp_mesh = mesh[expert_parallel.EP_DIM], mesh["dp"]
    experts = expert_parallel.shard_experts(model, ep_mesh)
    data_parallel = mesh.size()
    for module in experts:
        num_experts = next(module.parameters()).shape[0]
        placement = Shard(1) if data_parallel > num_experts else Shard(0)
        fully_shard(module, mesh=dp_mesh, shard_placement_fn=lambda _, p=placement: p)
        module.set_gradient_divide_factor(float(data_parallel))
        module.set_force_sum_reduction_for_comms(dp_mesh.size() > 1)
    dense = expert_parallel.dense_mesh(mesh.device_type, mesh.size())
    return fsdp2.shard(model, dense["dense"])


FRAMEWORK = Framework(name="fsdp2_ep", mesh_dims=("dp", "ep"), parallelize=parallelize)
