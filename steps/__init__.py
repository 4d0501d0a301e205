"""ZenML steps, one per file: artifacts in → one kdpipe core call → log → artifacts out.

All ZenML-specific code lives here (and in pipelines/): materializers, the step
context, MLflow run resolution (:mod:`steps.tracking_context`). The core (src/kdpipe)
never imports zenml. Import steps from their modules, e.g.
``from steps.ingest_data import ingest_data``.
"""
