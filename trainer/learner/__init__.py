"""The learner: everything that touches the policy's parameters. The DeepSpeed engine and one optimizer step
(`engine`), samples to micro-batches (`batch`), per-token log-probs (`logprobs`), the GRPO/DAPO losses
(`losses`), LoRA adapters (`lora`), the learning-rate schedule (`lr_schedule`) and the RNG streams a
checkpoint keeps (`rng_state`).
"""
