"""The rollout replica (`rpo serve rollout`): vLLM behind FastAPI. See docs/rollout.md.

Importing `services.rollout.client` needs neither torch nor vLLM (they load when a push or an engine needs them).
"""
