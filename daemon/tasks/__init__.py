"""Tasks: the per-task actor, the registry, the journal and the broadcast of snapshots."""
