"""Expert parallelism alone: the experts sharded over the ``ep`` ranks on the expert dim
(DTensor ``Shard(0)``, tokens sent to their experts' ranks by all-to-all:
pipeline_lib.models._expert_parallel); every other parameter replicated on each rank, its gradients
averaged by DistributedDataParallel over the same ranks (each EP rank trains on its own slice of
the batch, as a data-parallel rank). DDP ignores the experts (each rank holds other ones); their
gradients, which the all-to-all's backward already summed over every rank's tokens, are divided
by the EP degree, the average DDP takes of the others."""

from pipeline_lib.frameworks import Framework


def parallelize(model, mesh):
    from torch.nn.parallel import DistributedDataParallel

    from pipeline_lib.models import _expert_parallel as expert_parallel

    ep_mesh = mesh[expert_parallel.EP_DIM]
    experts = expert_parallel.shard_experts(model, ep_mesh)
    degree = ep_mesh.size()
    for param in expert_parallel.expert_params(experts):
        param.register_hook(lambda grad: grad / degree)
    names = {id(p): n for n, p in model.named_parameters()}
    ignored = [names[id(p)] for p in expert_parallel.expert_params(experts)]
    # DDP's way to leave parameters out (a static method with a leading underscore, which
    # torch's own tests and Lightning call): DDP would average experts of different ranks.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=ep_mesh.get_group())


FRAMEWORK = Framework(name="ep", mesh_dims=("ep",), parallelize=parallelize)
