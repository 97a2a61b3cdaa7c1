"""Local lm-evaluation-harness tasks shipped with the project (YAML beside its JSON-lines data)."""
