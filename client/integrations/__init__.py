"""One-line hooks for the frameworks people train with: Lightning
(``lrpilot.integrations.lightning.LRPilotCallback``) and Hugging Face
transformers (``lrpilot.integrations.transformers.LRPilotCallback``).
Accelerate needs none: ``lrpilot.attach(accelerator.prepare(optimizer))``.

Each module imports its framework when it is imported; ``import lrpilot``
imports none of them (docs/integrations.md)."""
