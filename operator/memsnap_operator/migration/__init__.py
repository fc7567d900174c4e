"""The PodMigration's domain: checks, target choice, the target pod, the flow and its rollback."""
