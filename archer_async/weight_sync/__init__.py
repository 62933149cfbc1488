"""The learner -> actor weight-sync protocol, shared by its two ends: `learner.weight_sender`
(learner rank 0) and `actors.weight_receiver` (each inference worker). `protocol` holds the
rendezvous, the control plane, the collectives and the description of one update; `buckets` the
layout, packing and chunking of the bytes."""

from archer_async.weight_sync.protocol import (
    Control, Endpoint, SyncInit, WeightSyncError, free_port, gloo_broadcast_chunks, gloo_group, make_sync_init,
    nccl_broadcast, nccl_group, receiver_rank,
)

__all__ = [
    "Control", "Endpoint", "SyncInit", "WeightSyncError", "free_port", "gloo_broadcast_chunks", "gloo_group",
    "make_sync_init", "nccl_broadcast", "nccl_group", "receiver_rank",
]
