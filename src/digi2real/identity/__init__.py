"""The paper's embedding math (section 3): prototypes, similarity filtering, SLERP variation, the generation plan.

Library API::

    from digi2real.identity import slerp, prototypes, select_distinct
    protos = prototypes(embeddings, labels)            # unit-norm class means
    keep = select_distinct(protos.vectors, n=20000)   # least similar to any other identity first
    z = slerp(mu, e, t)                                # a point on the great circle from mu toward e
"""

from digi2real.identity.plan import derive_seed, make_plan, plan_latents, read_plan, write_plan
from digi2real.identity.select import (
    Prototypes,
    max_similarity,
    prototypes,
    select_distinct,
    select_greedy,
    select_identities,
)
from digi2real.identity.sphere import angle, l2_normalize, sample_t, slerp
from digi2real.identity.store import EmbeddingStore, read_store, write_store

__all__ = [
    "EmbeddingStore",
    "Prototypes",
    "angle",
    "derive_seed",
    "l2_normalize",
    "make_plan",
    "max_similarity",
    "plan_latents",
    "prototypes",
    "read_plan",
    "read_store",
    "sample_t",
    "select_distinct",
    "select_greedy",
    "select_identities",
    "slerp",
    "write_plan",
    "write_store",
]
