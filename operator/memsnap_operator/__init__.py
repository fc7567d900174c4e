"""memsnap operator: PodCheckpoint and PodMigration custom resources (kopf)."""
