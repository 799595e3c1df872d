"""The pipeline verbs, one module each, in pipeline order: bake → boottest → … (later: scan, sign, distribute,
promote, rollout, retire). Pure orchestration over the Store and Provider interfaces; no provider details."""
