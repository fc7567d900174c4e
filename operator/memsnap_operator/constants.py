"""Names shared by the operator's layers: the API group, finalizer, annotations and phases."""
from __future__ import annotations

GROUP, VERSION = "memsnap.io", "v1alpha1"
MIGRATIONS, CHECKPOINTS = "podmigrations", "podcheckpoints"

FINALIZER = "memsnap.io/rollback"  # deleting a PodMigration mid-flight rolls back before it goes
ANNOTATION_PREFIX = "memsnap.io"  # kopf's own progress/diff-base annotations
RESTORE_FROM = "memsnap.io/restore-from"  # on a target pod: the migration id the wrapper restores
MIGRATED_FROM = "memsnap.io/migrated-from"  # on a target pod: the source pod it replaces
LOCK = "memsnap.io/migration"  # on a source pod: the PodMigration that holds it (one at a time)
RUNTIME_CLASS = "memsnap"

# PodMigration phases. Pending: accepted, being checked; Scheduling: target chosen, target pod
# being prepared (conditions PreparingTarget/TargetReady); then the agent's phases.
PENDING, SCHEDULING = "Pending", "Scheduling"
PRECOPYING, FINALIZING, RESTORING = "PreCopying", "Finalizing", "Restoring"
SUCCEEDED, FAILED, ROLLED_BACK = "Succeeded", "Failed", "RolledBack"
FINAL = frozenset({SUCCEEDED, FAILED, ROLLED_BACK})
AGENT_RUNNING = {"PreCopying": PRECOPYING, "Finalizing": FINALIZING, "Restoring": RESTORING}
