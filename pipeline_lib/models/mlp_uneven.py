"""mlp_uneven: the mlp with dims that 2, 3 and 4 do not divide (uneven shards everywhere)."""

from pipeline_lib.models.mlp import MLP


def build() -> MLP:
    return MLP(dim=7, hidden=25, out=13)
