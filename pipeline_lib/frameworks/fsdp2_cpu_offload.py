"""FSDP2 with CPUOffloadPolicy: sharded parameters, gradients and optimizer state kept on the
CPU (pinned memory on a CUDA machine), the optimizer step run there."""

from pipeline_lib.frameworks import Framework
from pipeline_lib.frameworks.fsdp2 import shard


def parallelize(model, mesh):
    from torch.distributed.fsdp import CPUOffloadPolicy

    from pipeline_lib.common.errors import Incompatible

    if mesh.device_type == "cpu":
        # torch 2.13: fully_shard asks for the accelerator to offload from and raises.
        raise Incompatible("CPUOffloadPolicy offloads from an accelerator; this job runs on cpu")
    return shard(model, mesh, offload_policy=CPUOffloadPolicy())


FRAMEWORK = Framework(
    name="fsdp2_cpu_offload", mesh_dims=("shard",), parallelize=parallelize, shards_meta_model=True
)
