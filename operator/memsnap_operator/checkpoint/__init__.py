"""PodCheckpoint: scheduled incremental checkpoints of a pod, taken by its node's agent."""
