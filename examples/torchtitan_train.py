"""Train torchtitan's own debug models a few steps with torchtitan's own code and leave each step
folder exactly as torchtitan's ``CheckpointManager`` (DCP backend) writes it. No dcp-matrix code
runs here (the end of ``main`` checks): this is another tool's job, whose checkpoints the matrix
loads through the config key ``checkpoints`` (configs/torchtitan.yaml).

    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        examples/torchtitan_train.py checkpoints/torchtitan

writes ``<out>/<name>/checkpoint/step-<steps>`` (torchtitan's own folder names: dump folder,
``checkpoint.folder``, ``step-N``) and ``<out>/<name>/writer.json`` (this job's manifest:
versions, model, what ran as torchtitan ships it and what stood in for a piece that cannot run
on CPU, and why) for each entry of ``MODELS``. Needs the optional extra
(``bash scripts/setup.sh --torchtitan``) and 2 gloo ranks.

torchtitan's pieces, on CPU with gloo (torchtitan 0.3.0, torch 2.13.0):

- run as shipped: the model classes and configs (``model_registry``), ``init_states``,
  ``apply_fsdp_to_decoder`` (FSDP2 on a data-parallel mesh), ``OptimizersContainer`` (one
  explicit AdamW param group, ``implementation: for-loop``), ``LRSchedulersContainer``,
  ``ParallelAwareDataloader``, ``CrossEntropyLoss`` with the global token count,
  ``clip_grad_norm_``, ``CheckpointManager`` (DCP, synchronous);
- stand-ins (``STAND_INS``): the attention, the gradient reduction, the meshes.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from functools import partial

STEPS = 2
SEQ_LEN = 16
BATCH = 2  # per data-parallel rank
SEED = 0
# What could not run as torchtitan ships it on CPU/gloo, what ran instead (the record carries it).
STAND_INS = {
    "attention": (
        "torchtitan's language-model backends need a GPU here: flex compiles a forward on CPU but "
        "has no backward, varlen needs CUDA, and get_attention_config refuses sdpa for language "
        "models; every layer's inner attention is torchtitan's own ScaledDotProductAttention "
        "(causal; each sample is one document, so block-causal and causal are the same mask)"
    ),
    "parallelize": (
        "parallelize_llama / parallelize_qwen3 need ParallelDims.build_mesh, which builds its "
        "meshes on device 'cuda' when no accelerator is visible (torchtitan.tools.utils); the "
        "FSDP step they call, apply_fsdp_to_decoder, runs on a CPU mesh built here"
    ),
    "gradient_reduction": (
        "apply_fsdp_to_decoder sets FSDP's gradient divide factor to 1.0 (the loss is divided by "
        "the global token count), which FSDP2 reduces with ReduceOp.PREMUL_SUM(1.0); gloo refuses "
        "PREMUL_SUM, so every FSDP module is set to force_sum_reduction_for_comms (SUM, times 1.0)"
    ),
    "moe_load_balancing": (
        "register_moe_load_balancing_hook reads ParallelDims' loss mesh (cuda, above): not "
        "registered, so the MoE layers' expert_bias_E stays at its init (zeros)"
    ),
}


@dataclass(frozen=True)
class TitanModel:
    """One checkpoint: torchtitan's model (``torchtitan.models.<model>``), its flavor, and what
    is changed: fewer layers or experts (an MoE debug flavor is too big for a CPU test),
    separate wq/wk/wv projections instead of the fused one (``fuse_qkv``)."""

    name: str
    model: str  # llama3 | qwen3
    flavor: str
    fuse_qkv: bool = True
    n_layers: int | None = None
    num_experts: int | None = None
    top_k: int | None = None


MODELS = (
    TitanModel("llama3_debug", "llama3", "debugmodel"),
    TitanModel("llama3_debug_unfused", "llama3", "debugmodel", fuse_qkv=False),
    TitanModel("qwen3_moe_debug", "qwen3", "debugmodel_moe", n_layers=2, num_experts=4, top_k=2),
    TitanModel(
        "qwen3_moe_debug_unfused",
        "qwen3",
        "debugmodel_moe",
        fuse_qkv=False,
        n_layers=2,
        num_experts=4,
        top_k=2,
    ),
)


def model_config(spec: TitanModel):
    """torchtitan's config of the flavor, changed as ``spec`` says, with the CPU attention."""
    import importlib

    from torchtitan.models.common.attention import ScaledDotProductAttention

    registry = importlib.import_module(f"torchtitan.models.{spec.model}").model_registry
    config = registry(spec.flavor).model
    if spec.n_layers is not None:
        config.layers = config.layers[: spec.n_layers]
    for layer in config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
        if not spec.fuse_qkv:
            layer.attention.qkv_linear = unfused(layer.attention)
        if spec.num_experts is not None:
            layer.moe = fewer_experts(layer.moe, spec.num_experts, spec.top_k)
    return config


def unfused(attention):
    """torchtitan's separate wq/wk/wv (QKVLinear) of the attention's shapes, as its
    make_gqa_config builds them for fuse_qkv=False; init: trunc_normal std 0.02 (llama3's)."""
    import torch
    from torchtitan.models.common.attention import QKVLinear
    from torchtitan.models.common.linear import Linear

    n_kv = attention.n_kv_heads or attention.n_heads
    head_dim = attention.head_dim or attention.dim // attention.n_heads
    init = {"weight": partial(torch.nn.init.trunc_normal_, std=0.02)}
    return QKVLinear.Config(
        head_dim=head_dim,
        wq=Linear.Config(in_features=attention.dim, out_features=attention.n_heads * head_dim,
                         param_init=init),
        wkv=Linear.Config(in_features=attention.dim, out_features=n_kv * head_dim,
                          param_init=init),
    )  # fmt: skip


def fewer_experts(moe, num_experts: int, top_k: int):
    """The MoE layer's config with ``num_experts`` experts, ``top_k`` per token (torchtitan's
    own config builders; everything else as the flavor has it)."""
    from torchtitan.models.common.config_utils import (
        make_moe_config,
        make_routed_experts_config,
        make_router_config,
    )

    inner, router = moe.routed_experts.inner_experts, moe.router
    return make_moe_config(
        num_experts=num_experts,
        load_balance_coeff=moe.load_balance_coeff,
        router=make_router_config(
            dim=inner.dim, num_experts=num_experts, gate_param_init=router.gate.param_init,
            top_k=top_k, score_func=router.score_func, route_norm=router.route_norm,
            route_scale=router.route_scale,
        ),
        routed_experts=make_routed_experts_config(
            dim=inner.dim, hidden_dim=inner.hidden_dim, num_experts=num_experts, top_k=top_k,
            param_init=inner.param_init, comm_backend="standard",
        ),
    )  # fmt: skip


class Tokens:
    """A data set of random token sequences, one stream per data-parallel rank (a torchtitan
    data loader takes any IterableDataset): ``({"input": tokens}, labels)`` as its loaders
    yield."""

    def __init__(self, vocab: int, rank: int):
        import torch

        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                gen = torch.Generator().manual_seed(1000 + rank)
                while True:
                    ids = torch.randint(vocab, (SEQ_LEN + 1,), generator=gen)
                    yield {"input": ids[:-1]}, ids[1:]

        self.dataset = Stream()


class TrainState:
    """The trainer's own state as torchtitan's Trainer saves it (``train_state``)."""

    def __init__(self):
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.ntokens_seen = state["step"], state["ntokens_seen"]


def build(spec: TitanModel, mesh):
    """torchtitan's model on the meta device, FSDP2 by its apply_fsdp_to_decoder, then
    materialized and initialized by its init_states (the trainer's order)."""
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.distributed.fsdp import apply_fsdp_to_decoder

    with torch.device("meta"):
        model = model_config(spec).build()
    apply_fsdp_to_decoder(
        model, mesh, param_dtype=torch.float32, reduce_dtype=torch.float32, pp_enabled=False
    )
    for module in model.modules():  # STAND_INS["gradient_reduction"]
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    torch.manual_seed(SEED)
    model.init_states()
    return model


def train(spec: TitanModel, out: str, rank: int, world: int, mesh) -> int:
    """Train ``STEPS`` steps the way torchtitan's Trainer does, saving at the last; the
    number of entries saved."""
    import torch
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.dataloader import ParallelAwareDataloader
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.components.optimizer import (
        LRSchedulersContainer,
        OptimizersContainer,
        ParamGroupConfig,
    )
    from torchtitan.distributed import utils as dist_utils

    model = build(spec, mesh)
    adamw = {"lr": 8e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    group = ParamGroupConfig(pattern=r".*", optimizer_name="AdamW", optimizer_kwargs=adamw)
    optimizers = OptimizersContainer.Config(param_groups=[group], implementation="for-loop").build(
        model_parts=[model]
    )
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(
        optimizers=optimizers, training_steps=10
    )
    loader = ParallelAwareDataloader(
        Tokens(model.config.vocab_size, rank).dataset, dp_rank=rank, dp_world_size=world,
        batch_size=BATCH,
    )  # fmt: skip
    state = TrainState()
    checkpoints = CheckpointManager(
        CheckpointManager.Config(enable=True, folder="checkpoint", interval=STEPS),
        dataloader=loader, model_parts=[model], optimizers=optimizers,
        lr_schedulers=schedulers, states={"train_state": state}, sd_adapter=None,
        base_folder=os.path.join(out, spec.name),
    )  # fmt: skip
    loss_fn = CrossEntropyLoss.Config().build()
    batches = iter(loader)
    for step in range(1, STEPS + 1):
        state.step = step
        optimizers.zero_grad()
        inputs, labels = next(batches)
        tokens = dist_utils.dist_sum_tensor(torch.tensor(labels.numel()), mesh)
        loss, _ = loss_fn(model(inputs["input"]), labels, tokens)
        loss.backward()
        dist_utils.clip_grad_norm_(list(model.parameters()), 1.0, foreach=True)
        optimizers.step()
        schedulers.step()
        state.ntokens_seen += int(tokens)
        checkpoints.save(step)
    checkpoints.close()
    folder = os.path.join(out, spec.name, "checkpoint", f"step-{STEPS}")
    return len(os.listdir(folder))


def manifest(spec: TitanModel, world: int) -> dict:
    """This job's account of the checkpoint (the import record carries it: writer_manifest)."""
    from importlib.metadata import version

    ran_moe = spec.num_experts is not None
    stand_ins = {k: v for k, v in STAND_INS.items() if ran_moe or k != "moe_load_balancing"}
    return {
        "writer": "examples/torchtitan_train.py",
        "torchtitan": version("torchtitan"),
        "torch": version("torch"),
        "model": spec.model,
        "flavor": spec.flavor,
        "changed": {k: v for k, v in vars(spec).items() if k not in ("name", "model", "flavor")},
        "steps": STEPS,
        "world_size": world,
        "mesh": {"fsdp": world},
        "folder": f"{spec.name}/checkpoint/step-{STEPS}",
        "ran_as_shipped": [
            "model classes and configs (model_registry)",
            "init_states",
            "apply_fsdp_to_decoder",
            "OptimizersContainer (AdamW, for-loop)",
            "LRSchedulersContainer",
            "ParallelAwareDataloader",
            "CrossEntropyLoss",
            "clip_grad_norm_",
            "CheckpointManager (DCP, synchronous)",
        ],
        "stand_ins": stand_ins,
    }


def main() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    out = sys.argv[1]
    wanted = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else {m.name for m in MODELS}
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    for spec in (m for m in MODELS if m.name in wanted):
        train(spec, out, rank, world, mesh)
        if rank == 0:
            with open(os.path.join(out, spec.name, "writer.json"), "w") as f:
                json.dump(manifest(spec, world), f, indent=1)
    ours = sorted(m for m in sys.modules if m.startswith("pipeline_lib"))
    assert not ours, f"dcp-matrix code ran in the writer: {ours}"
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
