"""The rollout replica (`rpo serve rollout`): vLLM behind FastAPI. See docs/rollout.md.

`app` builds the service and holds its state; `routes` is the HTTP API; `engine` and `vllm_worker` wrap vLLM;
`generation`, `rollouts` and `scoring` decode and score; `weight_plane` (the weight port), `weight_receive`,
`weight_updater` and `policy_gate` take weight pushes.
"""
